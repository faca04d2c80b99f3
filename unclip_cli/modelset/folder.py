"""Find a model set (--model, $UNCLIP_MODEL, the shipped default) and open it: manifest facts, CLIP checks, components.

Layout of a set:
  model.json                     manifest (see manifest.py)
  clip/                          open_clip local-dir layout (open_clip_config.json + open_clip_model.safetensors)
  prior/ prior-ar/ decoder/ upsampler-256/ upsampler-1024/   config.json + model.safetensors each
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unclip_cli import validate
from unclip_cli.errors import UserError
from unclip_cli.io import atomic_write, load_state_dict, read_safetensors_header
from unclip_cli.modelset.components import WEIGHTS, empty_component, read_component_config
from unclip_cli.modelset.manifest import MANIFEST, component_sampling, read_manifest

ENV_VAR = "UNCLIP_MODEL"
DEFAULT_FILE = "DEFAULT"  # in a weights folder: the name of the shipped default set


def shipped_weights_dirs() -> list[Path]:
    """Where shipped model sets live: weights/ in the source tree (editable installs), or
    unclip_cli/weights inside a regular install (pyproject maps weights/ there)."""
    package = Path(__file__).resolve().parents[1]  # unclip_cli/
    return [package.parent / "weights", package / "weights"]


def default_model_dir() -> Path | None:
    """The shipped default model set: the one named in weights/DEFAULT, else the only one present."""
    for root in shipped_weights_dirs():
        if not root.is_dir():
            continue
        named = root / DEFAULT_FILE
        if named.is_file():
            candidate = root / named.read_text().strip()
            if (candidate / MANIFEST).is_file():
                return candidate
        sets = sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))
        if len(sets) == 1:
            return sets[0]
    return None


def name_default(folder: Path) -> None:
    """Make `folder` its parent's default set: write PARENT/DEFAULT naming it (as default_model_dir reads it)."""
    folder = Path(folder)
    atomic_write(folder.parent / DEFAULT_FILE, (folder.name + "\n").encode())


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


@dataclass
class ModelSet:
    path: Path
    manifest: dict
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, option: str | None = None) -> "ModelSet":
        path = resolve_model_dir(option)
        return cls(path=path, manifest=read_manifest(path))

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
        return component_sampling(self.manifest, component)

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
        """A component's config (read and checked once per set)."""
        key = (component, "config")
        if key not in self._cache:
            self._cache[key] = read_component_config(self.require(component), component)
        return self._cache[key]

    def load(self, component: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """A component's network on `device`, its learned parameters in `dtype` (cached per device and dtype).

        Built on the meta device without initializing it, its shapes checked against the weights
        file's header (a config that does not fit is refused before anything is allocated), then the
        weights are read tensor by tensor straight onto the device, cast once here. Frozen parameters
        (data statistics: the prior's clip_mean / clip_std, the AR prior's PCA and buckets) and buffers
        stay float32; so does CLIP."""
        dtype = torch.float32 if component == "clip" else dtype
        key = (component, str(device), dtype)
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
            module = self._empty_fitting(component)
            dtypes = {name: dtype if p.requires_grad else torch.float32 for name, p in module.named_parameters()}
            state = load_state_dict(self.path / component / WEIGHTS, device, dtypes)
            try:
                module.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as e:
                raise UserError(f"{self.path / component}: weights do not fit its config ({_first_line(e)})") from None
            module.eval().to(device)  # the non-persistent buffers (attention masks), built on the CPU
        self._cache[key] = module
        return module

    def _empty_fitting(self, component: str) -> torch.nn.Module:
        """The component's network on the meta device (nothing allocated), refused unless its parameter
        shapes are the weights file's: a config far larger than its weights fails here, in milliseconds."""
        cfg = self.load_config(component)
        weights = self.path / component / WEIGHTS
        if not weights.is_file():
            raise UserError(f"{weights}: weights file missing")
        header = read_safetensors_header(weights)
        try:
            module = empty_component(component, cfg)
        except Exception as e:
            raise UserError(f"{self.path / component}: its config does not make a network ({_first_line(e)})") from None
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        validate.weights_fit(expected, header, str(self.path / component))
        return module


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300]
