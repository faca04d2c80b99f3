"""The model-set folder: find it, read its manifest and configs, load components, write new ones.

Layout:
  model.json                     manifest: name, components, CLIP identity, default sampling settings
  clip/                          open_clip local-dir layout (open_clip_config.json + open_clip_model.safetensors)
  prior/ decoder/ upsampler-256/ upsampler-1024/   config.json + model.safetensors each
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unclip_cli.errors import UserError
from unclip_cli.io import atomic_write, load_state_dict, read_safetensors_header, save_weights
from unclip_cli.models.configs import (
    SMALL_CLIP_CONFIG,
    TINY_CLIP_CONFIG,
    ARPriorConfig,
    DecoderConfig,
    DiffusionConfig,
    PriorConfig,
    UNetConfig,
    UpsamplerConfig,
    config_from_dict,
    config_to_dict,
)

MANIFEST = "model.json"
MANIFEST_FORMAT = "unclip-modelset"
COMPONENTS = ("clip", "prior", "prior-ar", "decoder", "upsampler-256", "upsampler-1024")
CONFIG_TYPES = {
    "prior": PriorConfig,
    "prior-ar": ARPriorConfig,
    "decoder": DecoderConfig,
    "upsampler-256": UpsamplerConfig,
    "upsampler-1024": UpsamplerConfig,
}
DEFAULT_SAMPLING = {
    "prior": {"steps": 25, "guidance": 4.0},
    "prior-ar": {"guidance": 2.0, "temperature": 1.0, "top_p": 0.9, "similarity_percentile": 50.0},
    "decoder": {"steps": 25, "guidance": 8.0},
    "upsampler-256": {"steps": 7},
    "upsampler-1024": {"steps": 7},
}
ENV_VAR = "UNCLIP_MODEL"


def shipped_weights_dirs() -> list[Path]:
    """Where shipped model sets live: weights/ in the source tree (editable installs), or
    unclip_cli/weights inside a regular install (pyproject maps weights/ there)."""
    here = Path(__file__).resolve().parent
    return [here.parent / "weights", here / "weights"]


def default_model_dir() -> Path | None:
    """The shipped default model set: the one named in weights/DEFAULT, else the only one present."""
    for root in shipped_weights_dirs():
        if not root.is_dir():
            continue
        named = root / "DEFAULT"
        if named.is_file():
            candidate = root / named.read_text().strip()
            if (candidate / MANIFEST).is_file():
                return candidate
        sets = sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))
        if len(sets) == 1:
            return sets[0]
    return None


def resolve_model_dir(option: str | None) -> Path:
    """--model DIR, else $UNCLIP_MODEL, else the shipped default."""
    if option:
        return Path(option)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    found = default_model_dir()
    if found is None:
        raise UserError(
            "no model set: pass --model DIR or set UNCLIP_MODEL (make one with `unclip model init -o DIR`)"
        )
    return found


def clip_identity(clip_dir: Path, name: str) -> str:
    """A CLIP's identity: its name and the hash of its weights, so stage files can't be mixed across CLIPs.

    The hash covers the tensors (names, dtypes, shapes, data), not the file's header: safetensors
    writes the metadata in no fixed order, so the same weights saved twice differ in their bytes.
    """
    path = clip_dir / "open_clip_model.safetensors"
    header = read_safetensors_header(path)
    tensors = sorted((k, v["dtype"], v["shape"], v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    h = hashlib.sha256(json.dumps(tensors).encode())
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{name}@{h.hexdigest()[:16]}"


@dataclass
class ModelSet:
    path: Path
    manifest: dict
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, option: str | None = None) -> "ModelSet":
        path = resolve_model_dir(option)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise UserError(f"{path}: model set folder not found")
        if not manifest_path.is_file():
            raise UserError(f"{path}: not a model set (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{manifest_path}: damaged manifest ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise UserError(f"{manifest_path}: not an unclip model-set manifest")
        return cls(path=path, manifest=manifest)

    # ------------------------------------------------------------------ manifest facts

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name)

    @property
    def clip_identity(self) -> str:
        return self.manifest["clip"]["identity"]

    @property
    def clip_dim(self) -> int:
        return int(self.manifest["clip"]["embed_dim"])

    def has(self, component: str) -> bool:
        return component in self.manifest.get("components", [])

    def require(self, component: str) -> Path:
        if not self.has(component):
            hint = " (Karlo has no 256->1024 upsampler)" if component == "upsampler-1024" else ""
            raise UserError(f"model set {self.name!r} has no {component} component{hint}")
        folder = self.path / component
        if not folder.is_dir():
            raise UserError(f"{folder}: component folder missing")
        return folder

    def sampling(self, component: str) -> dict:
        merged = dict(DEFAULT_SAMPLING.get(component, {}))
        merged.update(self.manifest.get("sampling", {}).get(component, {}))
        return merged

    def check_clip(self, stage_clip: str | None, stage_dim: int, name: str) -> None:
        """Refuse a stage file made with another CLIP (identity or dimension)."""
        if stage_dim != self.clip_dim:
            raise UserError(
                f"{name}: embedding dimension {stage_dim}, but model set {self.name!r} uses {self.clip_dim}"
            )
        if stage_clip is not None and stage_clip != self.clip_identity:
            raise UserError(
                f"{name}: made with CLIP {stage_clip}, but model set {self.name!r} uses {self.clip_identity}"
            )

    # ------------------------------------------------------------------ loading

    def load_config(self, component: str):
        folder = self.require(component)
        try:
            data = json.loads((folder / "config.json").read_text())
            return config_from_dict(CONFIG_TYPES[component], data)
        except FileNotFoundError:
            raise UserError(f"{folder}: config.json missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as e:
            raise UserError(f"{folder}/config.json: invalid ({e})") from None

    def load(self, component: str, device: torch.device | str = "cpu") -> torch.nn.Module:
        """Build a component's network from its config and load its weights (cached per device)."""
        key = (component, str(device))
        if key in self._cache:
            return self._cache[key]
        if component == "clip":
            from unclip_cli.models.clip import ClipEncoder

            folder = self.require("clip")
            try:
                module = ClipEncoder.load(folder, device)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"{folder}: cannot load CLIP ({str(e).splitlines()[0]})") from None
        else:
            cfg = self.load_config(component)
            module = build_component(component, cfg)
            state = load_state_dict(self.path / component / "model.safetensors")
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise UserError(f"{self.path / component}: weights do not fit its config ({_first_line(e)})") from None
            module.eval().to(device)
        self._cache[key] = module
        return module


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300]


def build_component(component: str, cfg) -> torch.nn.Module:
    """A freshly initialized network for a component config."""
    if component == "prior":
        from unclip_cli.models.prior import DiffusionPrior

        return DiffusionPrior(cfg)
    if component == "prior-ar":
        from unclip_cli.models.ar_prior import ARPrior

        return ARPrior(cfg)
    if component == "decoder":
        from unclip_cli.models.decoder import Decoder

        return Decoder(cfg)
    if component.startswith("upsampler"):
        from unclip_cli.models.upsampler import Upsampler

        return Upsampler(cfg)
    raise ValueError(f"unknown component {component}")


def _seeded_component(component: str, cfg, seed: int, index: int) -> torch.nn.Module:
    """build_component seeded by (seed, the component's place in its preset), the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + index + 1)
        return build_component(component, cfg)


def save_component(root: Path, component: str, cfg, module: torch.nn.Module | dict[str, torch.Tensor]) -> None:
    """Write config.json + model.safetensors (config also in the weights' metadata); module: a network or its state dict."""
    folder = root / component
    folder.mkdir(parents=True, exist_ok=True)
    cfg_dict = config_to_dict(cfg)
    atomic_write(folder / "config.json", (json.dumps(cfg_dict, indent=2) + "\n").encode())
    state = module if isinstance(module, dict) else module.state_dict()
    state = {k: v.detach().float() for k, v in state.items()}
    save_weights(folder / "model.safetensors", state, {"component": component, "config": json.dumps(cfg_dict)})


def write_manifest(root: Path, name: str, components: list[str], clip_name: str, sampling: dict, **extra) -> None:
    from unclip_cli.models.clip import ClipEncoder

    clip = ClipEncoder.load(root / "clip")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "name": name,
        "components": [c for c in COMPONENTS if c in components],
        "clip": {
            "identity": clip_identity(root / "clip", clip_name),
            "embed_dim": clip.embed_dim,
            "text_width": clip.text_width,
            "context_length": clip.context_length,
            "image_size": clip.image_size,
            "vision": clip.has_vision,  # False: text-only CLIP (encode-image refuses)
        },
        "sampling": sampling,
        **extra,
    }
    atomic_write(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


# ---------------------------------------------------------------------- presets


def _tiny_configs(embed_dim: int, text_width: int, context_length: int = 77) -> dict:
    up = dict(
        in_channels=6, out_channels=3, layers_per_block=1, attention=(False, False), mid_attention=False,
        context_dim=None, add_embed=False, scale_shift=False,
    )
    return {
        "prior": PriorConfig(
            embed_dim=embed_dim, text_width=text_width, num_text_tokens=context_length, width=64, num_layers=2,
            num_heads=4,
        ),
        "decoder": DecoderConfig(
            unet=UNetConfig(
                in_channels=3, out_channels=6, channels=(32, 64), layers_per_block=1, attention=(False, True),
                mid_attention=True, head_dim=16, context_dim=64, time_embed_dim=128, add_embed=True,
                scale_shift=True, num_groups=8, sample_size=64,
            ),
            clip_embed_dim=embed_dim,
            text_width=text_width,
        ),
        "upsampler-256": UpsamplerConfig(
            first=UNetConfig(channels=(16, 32), time_embed_dim=64, num_groups=8, sample_size=256, **up),
            last=UNetConfig(channels=(16, 32), time_embed_dim=64, num_groups=8, sample_size=256, **up),
            low_res=64, size=256,
        ),
        "upsampler-1024": UpsamplerConfig(
            first=UNetConfig(channels=(8, 16), time_embed_dim=32, num_groups=4, sample_size=1024, **up),
            last=None, low_res=256, size=1024,
        ),
        "prior-ar": ARPriorConfig(
            embed_dim=embed_dim, text_width=text_width, num_text_tokens=context_length, width=64, num_layers=2,
            num_heads=4, num_buckets=256, num_sim_buckets=16,
        ),
    }


def _small_configs(embed_dim: int, text_width: int, context_length: int = 77) -> dict:
    """The shipped default's shapes: sized to train on a CPU in an hour or two and sample in seconds.

    The decoder keeps few channels at 64 and 32 px (convolutions there dominate the cost on a CPU)
    and attends only at 16 and 8 px; the upsamplers are the tiny preset's networks.

    The decoder and the upsamplers predict x0 with a fixed variance, not eps (with the decoder's
    learned variance) as Karlo's do: an eps model must cancel x_t almost exactly to get an image's
    flat colors right at high t (its eps error is amplified by 1 / sqrt(SNR) into x0), which a small
    network trained briefly does not; predicting x0 it gets the background and the low-res input's
    colors right within a few hundred steps (measured in the shipped set's model card).
    """
    configs = _tiny_configs(embed_dim, text_width, context_length)
    x0 = DiffusionConfig(prediction="x0", variance="fixed_small_log", clip_range=1.0)
    for name in ("upsampler-256", "upsampler-1024"):
        configs[name] = dataclasses.replace(configs[name], diffusion=x0)
    configs["prior"] = PriorConfig(
        embed_dim=embed_dim, text_width=text_width, num_text_tokens=context_length, width=128, num_layers=4,
        num_heads=4,
    )
    configs["prior-ar"] = ARPriorConfig(
        embed_dim=embed_dim, text_width=text_width, num_text_tokens=context_length, width=128, num_layers=4,
        num_heads=4, num_buckets=1024, num_sim_buckets=32,
    )
    configs["decoder"] = DecoderConfig(
        unet=UNetConfig(
            in_channels=3, out_channels=3, channels=(16, 32, 64, 128), layers_per_block=1,
            attention=(False, False, True, True), mid_attention=True, head_dim=16, context_dim=64,
            time_embed_dim=128, add_embed=True, scale_shift=True, num_groups=8, sample_size=64,
        ),
        clip_embed_dim=embed_dim,
        text_width=text_width,
        diffusion=x0,
    )
    return configs


PRESETS = {
    "small": {
        "clip": SMALL_CLIP_CONFIG,
        "configs": _small_configs,
        "sampling": {
            "prior": {"steps": 25, "guidance": 2.0},
            "prior-ar": {"guidance": 2.0, "temperature": 1.0, "top_p": 0.9, "similarity_percentile": 50.0},
            "decoder": {"steps": 25, "guidance": 3.0},
            "upsampler-256": {"steps": 7},
            "upsampler-1024": {"steps": 4},
        },
    },
    "tiny": {
        "clip": TINY_CLIP_CONFIG,
        "configs": _tiny_configs,
        "sampling": {
            "prior": {"steps": 10, "guidance": 4.0},
            "prior-ar": {"guidance": 2.0, "temperature": 1.0, "top_p": 0.9, "similarity_percentile": 50.0},
            "decoder": {"steps": 10, "guidance": 8.0},
            "upsampler-256": {"steps": 4},
            "upsampler-1024": {"steps": 3},
        },
    },
}


def init_model_set(out: Path, preset: str, seed: int = 0, name: str | None = None, clip: str | None = None) -> None:
    """Write a randomly initialized model set from a named preset (atomically: built aside, then renamed).

    clip: an open_clip folder (`local-dir:PATH`, `PATH`, or a model set) to use instead of the
    preset's random CLIP; the networks are sized to its embedding and text widths.
    """
    from unclip_cli.models.clip import DEFAULT_PREPROCESS_CFG, write_clip_dir

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"{parent}: folder does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        if clip is None:
            clip_cfg = PRESETS[preset]["clip"]
            write_clip_dir(tmp / "clip", clip_cfg, DEFAULT_PREPROCESS_CFG, seed=seed)
            clip_name, dims = f"{preset}-clip", (clip_cfg["embed_dim"], clip_cfg["text_cfg"]["width"], 77)
        else:
            from unclip_cli.convert.open_clip_dir import import_open_clip_dir, resolve_clip_source

            source = resolve_clip_source(clip)
            enc = import_open_clip_dir(source.folder, tmp / "clip")
            clip_name, dims = source.name, (enc.embed_dim, enc.text_width, enc.context_length)
        configs = PRESETS[preset]["configs"](*dims)
        for i, (component, cfg) in enumerate(configs.items()):
            save_component(tmp, component, cfg, _seeded_component(component, cfg, seed, i))
        write_manifest(
            tmp, name or f"{preset}-random", ["clip", *configs], clip_name=clip_name,
            sampling=PRESETS[preset]["sampling"], preset=preset, seed=seed,
        )
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def add_component(path: Path, component: str, preset: str, seed: int = 0, replace: bool = False) -> None:
    """Add a freshly initialized component, sized from `preset` to the set's CLIP, to an existing set
    (for example an AR prior beside an imported Karlo set's diffusion prior)."""
    ms = ModelSet.open(str(path))
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    if component not in CONFIG_TYPES:
        raise UserError(f"cannot add {component!r} (components: {', '.join(CONFIG_TYPES)})")
    if ms.has(component) and not replace:
        raise UserError(f"model set {ms.name!r} already has {component} (--replace to start it over)")
    clip = ms.manifest["clip"]
    configs = PRESETS[preset]["configs"](clip["embed_dim"], clip["text_width"], clip.get("context_length", 77))
    module = _seeded_component(component, configs[component], seed, list(configs).index(component))
    save_component(ms.path, component, configs[component], module)
    manifest = dict(ms.manifest)
    manifest["components"] = [c for c in COMPONENTS if c in set(manifest.get("components", [])) | {component}]
    default = PRESETS[preset]["sampling"].get(component)
    if default is not None:
        manifest.setdefault("sampling", {})[component] = default
    atomic_write(ms.path / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
