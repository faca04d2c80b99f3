"""A diffusers-format unCLIP snapshot (Karlo v1 alpha, or its image-variations sibling) -> a model set.

Snapshot layout (what `UnCLIPPipeline.save_pretrained` writes; `kakaobrain/karlo-v1-alpha`):
  model_index.json, prior/, prior_scheduler/, text_proj/, decoder/, decoder_scheduler/,
  super_res_first/, super_res_last/, super_res_scheduler/, text_encoder/, tokenizer/
The image-variations snapshot (`UnCLIPImageVariationPipeline`) has no prior/ or prior_scheduler/
and adds image_encoder/ and feature_extractor/.

Each folder is converted by its own module (diffusers_prior, diffusers_unet, diffusers_clip, which
hold the key maps and assert that every source tensor is used once with the right shape); this
module checks the snapshot, reads the weights (safetensors, or `.bin` through
`torch.load(weights_only=True)`), turns the scheduler configs into `DiffusionConfig`s, ties the
components' sizes together, and writes the set atomically: built in a hidden folder beside the
target, then renamed. The model set gets the pipeline's default sampling settings.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch

from unclip_cli.convert.open_clip_dir import import_open_clip_dir, resolve_clip_source
from unclip_cli.errors import UserError
from unclip_cli.io import load_state_dict, read_json_object
from unclip_cli.models.configs import DiffusionConfig, UpsamplerConfig
from unclip_cli.modelset.components import save_component
from unclip_cli.modelset.create import new_set_folder
from unclip_cli.modelset.manifest import write_manifest

# Folders each pipeline needs (the layout; model_index.json names the pipeline).
PIPELINES = {
    "UnCLIPPipeline": (
        "prior", "prior_scheduler", "text_proj", "decoder", "decoder_scheduler",
        "super_res_first", "super_res_last", "super_res_scheduler", "text_encoder", "tokenizer",
    ),
    "UnCLIPImageVariationPipeline": (
        "text_proj", "decoder", "decoder_scheduler", "super_res_first", "super_res_last",
        "super_res_scheduler", "text_encoder", "tokenizer", "image_encoder", "feature_extractor",
    ),
}
# UnCLIPPipeline.__call__ / UnCLIPImageVariationPipeline.__call__ defaults (diffusers 0.33.1)
SAMPLING = {
    "prior": {"steps": 25, "guidance": 4.0},
    "decoder": {"steps": 25, "guidance": 8.0},
    "upsampler-256": {"steps": 7},
}
WEIGHTS_STEM = "diffusion_pytorch_model"
VIT_L_14_TEXT = {"width": 768, "layers": 12, "heads": 12, "context_length": 77}  # OpenAI CLIP ViT-L/14 text tower

Report = Callable[[str], None]


# --------------------------------------------------------------------------- schedulers

# UnCLIPScheduler.__init__ defaults (diffusers 0.33.1; scheduler_config.json may omit any)
_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "variance_type": "fixed_small_log",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "beta_schedule": "squaredcos_cap_v2",
}
_PREDICTION = {"epsilon": "eps", "sample": "x0"}
_VARIANCE = {"fixed_small_log": "fixed_small_log", "learned_range": "learned_range"}


def diffusion_config_from_scheduler(config: dict) -> DiffusionConfig:
    """UnCLIPScheduler scheduler_config.json dict -> DiffusionConfig (how the component must be sampled)."""
    name = config.get("_class_name", "UnCLIPScheduler")
    if name != "UnCLIPScheduler":
        raise ValueError(f"scheduler _class_name={name!r}, expected 'UnCLIPScheduler'")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _SCHEDULER_DEFAULTS)
    if unknown:
        raise ValueError(f"scheduler config: unknown field(s) {unknown}")
    c = {**_SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for field, table in (("prediction_type", _PREDICTION), ("variance_type", _VARIANCE)):
        if c[field] not in table:
            raise ValueError(f"scheduler config: unsupported {field}={c[field]!r} (supported: {sorted(table)})")
    if c["beta_schedule"] != "squaredcos_cap_v2":
        raise ValueError(f"scheduler config: unsupported beta_schedule={c['beta_schedule']!r}")
    return DiffusionConfig(
        num_timesteps=int(c["num_train_timesteps"]),
        schedule="cosine",
        prediction=_PREDICTION[c["prediction_type"]],
        variance=_VARIANCE[c["variance_type"]],
        clip_range=float(c["clip_sample_range"]) if c["clip_sample"] else None,
    )


# --------------------------------------------------------------------------- reading the snapshot


class _Snapshot:
    """The source folder: JSON files and weights, every failure a one-line UserError naming the file."""

    def __init__(self, root: Path):
        self.root = root
        if not root.is_dir():
            raise UserError(f"{root}: no such folder")
        index = root / "model_index.json"
        if not index.is_file():
            raise UserError(f"{root}: not a diffusers unCLIP snapshot: no model_index.json")
        self.index = self.json(index)
        self.pipeline = self.index.get("_class_name")
        if self.pipeline not in PIPELINES:
            raise UserError(
                f"{root}: not a diffusers unCLIP snapshot: model_index.json names {self.pipeline!r} "
                f"(expected {' or '.join(PIPELINES)})"
            )
        for folder in PIPELINES[self.pipeline]:
            if not (root / folder).is_dir():
                raise UserError(
                    f"{root}: not a diffusers unCLIP snapshot: no {folder}/ (model_index.json says {self.pipeline})"
                )

    def has(self, folder: str) -> bool:
        return folder in PIPELINES[self.pipeline]

    def json(self, path: Path) -> dict:
        if not path.is_file():
            raise UserError(f"{self.root}: incomplete snapshot: no {path.relative_to(self.root)}")
        return read_json_object(path, "snapshot file")

    def config(self, folder: str, name: str = "config.json") -> dict:
        return self.json(self.root / folder / name)

    @contextlib.contextmanager
    def converting(self, *folders: str) -> Iterator[None]:
        """Turn a converter's ValueError into a UserError naming the snapshot and its folder(s)."""
        try:
            yield
        except ValueError as e:
            where = " + ".join(f"{f}/" for f in folders)
            raise UserError(f"{self.root}: {where}: {str(e).splitlines()[0][:500]}") from None

    def weights(self, folder: str) -> dict[str, torch.Tensor]:
        """A diffusers model folder's state dict: safetensors, .bin, an fp16 variant, or shards."""
        d = self.root / folder
        for suffix in (".safetensors", ".bin", ".fp16.safetensors", ".fp16.bin"):
            if (d / (WEIGHTS_STEM + suffix)).is_file():
                return load_state_dict(d / (WEIGHTS_STEM + suffix))
        for suffix in (".safetensors", ".bin"):
            index = d / f"{WEIGHTS_STEM}{suffix}.index.json"
            if index.is_file():
                weight_map = self.json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise UserError(f"{index}: no weight_map")
                state: dict[str, torch.Tensor] = {}
                for shard in sorted(set(weight_map.values())):
                    state.update(load_state_dict(d / shard))
                return state
        raise UserError(f"{d}: no {WEIGHTS_STEM}.safetensors or {WEIGHTS_STEM}.bin")


# --------------------------------------------------------------------------- tokenizer


def _check_tokenizer(snap: _Snapshot) -> None:
    """The snapshot's CLIPTokenizer must be CLIP's BPE, since prompts are tokenized by open_clip's."""
    import gzip

    import open_clip

    d = snap.root / "tokenizer"
    vocab_path, merges_path = d / "vocab.json", d / "merges.txt"
    vocab = snap.json(vocab_path)
    if not merges_path.is_file():
        raise UserError(f"{d}: no merges.txt")
    n = 49152 - 256 - 2 + 1  # both tokenizers skip the header line and read 48894 merges
    ours = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")[1:n]
    theirs = merges_path.read_text(encoding="utf-8").strip().split("\n")[1:n]
    tok = open_clip.tokenizer.SimpleTokenizer()
    expected = {k: v for k, v in tok.encoder.items() if k not in ("<start_of_text>", "<end_of_text>")}
    expected.update({"<|startoftext|>": tok.sot_token_id, "<|endoftext|>": tok.eot_token_id})
    if [m.split() for m in theirs] != [m.split() for m in ours] or vocab != expected:
        raise UserError(
            f"{d}: not CLIP's BPE vocabulary (open_clip's tokenizer, which encode-text uses, would give other ids)"
        )


# --------------------------------------------------------------------------- CLIP


def _clip_name(model_cfg: dict) -> str:
    t = model_cfg["text_cfg"]
    if {k: t.get(k) for k in VIT_L_14_TEXT} == VIT_L_14_TEXT and model_cfg["embed_dim"] == 768:
        return "karlo-v1-alpha-ViT-L-14"
    return f"diffusers-clip-{model_cfg['embed_dim']}d-{t['width']}w-{t['layers']}l"


def _convert_clip(snap: _Snapshot, out: Path, clip: str | None, report: Report):
    """text_encoder/ (+ image_encoder/, feature_extractor/) -> out/clip; or --clip, checked against them.

    Returns (ClipEncoder, CLIP name).
    """
    from unclip_cli.convert import diffusers_clip as dc
    from unclip_cli.models.clip import ClipEncoder

    root = snap.root
    vision = snap.has("image_encoder")
    if clip is None:
        report("converting text_encoder/" + (" + image_encoder/" if vision else "") + " -> clip/ (open_clip)")
        with snap.converting(*(["text_encoder", "image_encoder"] if vision else ["text_encoder"])):
            model_cfg = dc.convert_hf_clip(
                root / "text_encoder", root / "image_encoder" if vision else None, out / "clip",
                root / "feature_extractor" if vision else None,
            )
        return ClipEncoder.load(out / "clip"), _clip_name(model_cfg)

    source = resolve_clip_source(clip)
    report(f"copying the CLIP of {clip} -> clip/, checking it against text_encoder/" + (" + image_encoder/" if vision else ""))
    enc = import_open_clip_dir(source.folder, out / "clip")
    with snap.converting(*(["text_encoder", "image_encoder"] if vision else ["text_encoder"])):
        text_config, text_state = dc._read_hf_folder(root / "text_encoder", "CLIPTextModelWithProjection")
        vision_config, vision_state = (
            dc._read_hf_folder(root / "image_encoder", "CLIPVisionModelWithProjection") if vision else (None, None)
        )
        projection_dim = text_config.get("projection_dim", dc._TEXT_DEFAULTS["projection_dim"])
        model_cfg = dc.open_clip_config_from_hf(text_config, vision_config, projection_dim)
        expected = dc.open_clip_state_from_hf(text_state, vision_state, model_cfg)
    got = enc.model.state_dict()
    # the towers that make the embeddings (logit_scale / logit_bias only serve CLIP's training loss)
    compare = [k for k in expected if (vision or not k.startswith("visual.")) and not k.startswith("logit_")]
    differ = [
        k for k in compare
        if k not in got or got[k].shape != expected[k].shape
        or (got[k].float() - expected[k].float()).abs().max() > 1e-3 * expected[k].float().abs().max() + 1e-6
    ]
    if differ:
        towers = "text and vision towers" if vision else "text tower"
        raise UserError(
            f"--clip {clip}: its {towers} differ from the snapshot's ({len(differ)} tensors, e.g. {differ[0]}); "
            "the prior and decoder only work with the CLIP they were trained on"
        )
    return enc, source.name


# --------------------------------------------------------------------------- components


def _convert_prior(snap: _Snapshot, clip, report: Report):
    from unclip_cli.convert.diffusers_prior import prior_config_from_diffusers, prior_state_from_diffusers

    report("converting prior/")
    with snap.converting("prior"):
        cfg = prior_config_from_diffusers(snap.config("prior"), text_width=clip.text_width)
    with snap.converting("prior_scheduler"):
        cfg.diffusion = diffusion_config_from_scheduler(snap.config("prior_scheduler", "scheduler_config.json"))
    if cfg.embed_dim != clip.embed_dim or cfg.num_text_tokens != clip.context_length:
        raise UserError(
            f"{snap.root}: prior/: embedding {cfg.embed_dim} over {cfg.num_text_tokens} text tokens, but the CLIP "
            f"gives {clip.embed_dim} over {clip.context_length}"
        )
    with snap.converting("prior"):
        state = prior_state_from_diffusers(snap.weights("prior"), cfg)
    return cfg, state


def _convert_decoder(snap: _Snapshot, clip, report: Report):
    from unclip_cli.convert.diffusers_unet import decoder_config_from_diffusers, decoder_state_from_diffusers

    report("converting decoder/ + text_proj/")
    with snap.converting("decoder", "text_proj"):
        cfg = decoder_config_from_diffusers(snap.config("decoder"), snap.config("text_proj"), text_width=clip.text_width)
    with snap.converting("decoder_scheduler"):
        cfg.diffusion = diffusion_config_from_scheduler(snap.config("decoder_scheduler", "scheduler_config.json"))
    unet = cfg.unet
    learned = cfg.diffusion.variance == "learned_range"
    if unet.out_channels != unet.in_channels * (2 if learned else 1):
        raise UserError(
            f"{snap.root}: decoder/: out_channels={unet.out_channels} with in_channels={unet.in_channels} and "
            f"variance_type={cfg.diffusion.variance!r} in decoder_scheduler/"
        )
    if cfg.clip_embed_dim != clip.embed_dim:
        raise UserError(f"{snap.root}: text_proj/: clip_embeddings_dim={cfg.clip_embed_dim}, the CLIP gives {clip.embed_dim}")
    with snap.converting("decoder", "text_proj"):
        state = decoder_state_from_diffusers(snap.weights("decoder"), snap.weights("text_proj"), cfg)
    return cfg, state


def _convert_upsampler(snap: _Snapshot, low_res: int, report: Report):
    from unclip_cli.convert.diffusers_unet import unet_config_from_diffusers, unet_state_from_diffusers

    report("converting super_res_first/ + super_res_last/")
    nets = {}
    for part, folder in (("first", "super_res_first"), ("last", "super_res_last")):
        with snap.converting(folder):
            cfg = unet_config_from_diffusers(snap.config(folder))
            if (cfg.in_channels, cfg.out_channels) != (6, 3) or cfg.context_dim is not None or cfg.add_embed:
                raise ValueError(
                    f"in_channels={cfg.in_channels}, out_channels={cfg.out_channels}: a super-res UNet takes 6 channels "
                    "(noisy image + upsampled low-res image) and predicts 3, without conditioning"
                )
            nets[part] = (cfg, unet_state_from_diffusers(snap.weights(folder), cfg))
    (first, first_state), (last, last_state) = nets["first"], nets["last"]
    if first.sample_size != last.sample_size:
        raise UserError(
            f"{snap.root}: super_res_first/ is {first.sample_size}px but super_res_last/ {last.sample_size}px"
        )
    with snap.converting("super_res_scheduler"):
        diffusion = diffusion_config_from_scheduler(snap.config("super_res_scheduler", "scheduler_config.json"))
    if diffusion.variance == "learned_range":
        raise UserError(f"{snap.root}: super_res_scheduler/: variance_type='learned_range', but super-res predicts 3 channels")
    cfg = UpsamplerConfig(first=first, last=last, low_res=low_res, size=first.sample_size, diffusion=diffusion)
    state = {f"first.{k}": v for k, v in first_state.items()}
    state.update({f"last.{k}": v for k, v in last_state.items()})
    return cfg, state


# --------------------------------------------------------------------------- the model set


def import_snapshot(
    src: Path, out: Path, *, name: str | None = None, clip: str | None = None, report: Report | None = None
) -> dict:
    """Convert the diffusers unCLIP snapshot `src` into the model set `out` (must not exist, or be empty).

    clip: use this open_clip folder (`local-dir:PATH`, `PATH`, or a model set) as the set's CLIP
    instead of converting text_encoder/ (+ image_encoder/); its towers must equal the snapshot's.
    report: called with one progress line per component. Returns the written manifest.
    """
    report = report or (lambda line: None)
    src, out = Path(src), Path(out)
    snap = _Snapshot(src)
    with new_set_folder(out) as tmp:
        _check_tokenizer(snap)
        enc, clip_name = _convert_clip(snap, tmp, clip, report)
        components = ["clip"]
        if snap.has("prior"):
            cfg, state = _convert_prior(snap, enc, report)
            save_component(tmp, "prior", cfg, state)
            components.append("prior")
            del state
        cfg, state = _convert_decoder(snap, enc, report)
        save_component(tmp, "decoder", cfg, state)
        components.append("decoder")
        low_res = cfg.unet.sample_size
        del state
        cfg, state = _convert_upsampler(snap, low_res, report)
        save_component(tmp, "upsampler-256", cfg, state)
        components.append("upsampler-256")
        del state

        sampling = {c: SAMPLING[c] for c in components if c in SAMPLING}
        source = {"format": "diffusers", "pipeline": snap.pipeline, "snapshot": src.resolve().name}
        if "_diffusers_version" in snap.index:
            source["diffusers_version"] = snap.index["_diffusers_version"]
        manifest = write_manifest(tmp, name or out.name, components, clip_name=clip_name, sampling=sampling, source=source)
    return manifest
