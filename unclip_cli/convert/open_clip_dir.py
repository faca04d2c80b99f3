"""A local open_clip checkpoint folder (open_clip's `local-dir:` layout) -> a model set's `clip/`.

Source: `local-dir:PATH` or `PATH`, a folder with `open_clip_config.json` ({"model_cfg",
"preprocess_cfg"}) and one checkpoint that open_clip finds there (`open_clip_model.safetensors`,
`open_clip_pytorch_model.bin`, ...), or a model-set folder, whose `clip/` is taken. open_clip
builds and loads the model exactly as `open_clip.create_model("local-dir:PATH")` would (its
loader reads `.bin` / `.pth` with `weights_only=True`); the result is written as
`open_clip_config.json` + `open_clip_model.safetensors`. A source that already has
`open_clip_model.safetensors` is copied byte for byte, so the CLIP identity (a hash of that file)
stays the same and stage files made with the source remain valid.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from unclip_cli.errors import UserError
from unclip_cli.io import save_weights
from unclip_cli.models.clip import CONFIG_NAME, WEIGHTS_NAME, ClipEncoder
from unclip_cli.modelset.manifest import clip_name, is_model_set, read_manifest

LOCAL_DIR = "local-dir:"


@dataclass
class ClipSource:
    folder: Path  # the open_clip local-dir folder
    name: str  # CLIP name for the model set's identity


def resolve_clip_source(spec: str) -> ClipSource:
    """`local-dir:PATH`, `PATH` or a model-set folder -> the open_clip folder and a name for it."""
    path = Path(spec[len(LOCAL_DIR):] if spec.startswith(LOCAL_DIR) else spec)
    if not path.is_dir():
        raise UserError(f"--clip {spec}: no such folder")
    if is_model_set(path) and not (path / CONFIG_NAME).is_file():  # a model set: its clip/
        path = path / "clip"
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"--clip {spec}: not an open_clip local-dir folder (no {CONFIG_NAME})")
    if path.name == "clip" and is_model_set(path.parent):  # a model set's CLIP keeps its name (and so its identity)
        try:
            return ClipSource(path, clip_name(read_manifest(path.parent)))
        except UserError as e:
            raise UserError(f"--clip {spec}: {e}") from None
    return ClipSource(path, path.resolve().name)


def clip_writer(spec: str) -> Callable[[Path], str]:
    """--clip SPEC -> a function that writes that CLIP as an open_clip folder and returns its name
    (what `modelset.init_model_set(write_clip=...)` takes)."""
    source = resolve_clip_source(spec)

    def write(out_dir: Path) -> str:
        import_open_clip_dir(source.folder, out_dir)
        return source.name

    return write


def load_clip(spec: str, device: str | torch.device = "cpu") -> tuple[ClipEncoder, str]:
    """--clip SPEC -> that CLIP loaded on `device`, and its name (to score images with a CLIP of one's choice)."""
    source = resolve_clip_source(spec)
    return _load(source.folder, f"--clip {spec}", device), source.name


def _load(folder: Path, what: str, device: str | torch.device = "cpu") -> ClipEncoder:
    try:
        return ClipEncoder.load(folder, device)
    except UserError:
        raise
    except Exception as e:  # open_clip raises several types for bad configs and checkpoints
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise UserError(f"{what}: cannot load as an open_clip CLIP ({type(e).__name__}: {' '.join(lines[:2])[:300]})") from None


def import_open_clip_dir(src: Path, out_dir: Path) -> ClipEncoder:
    """Write the open_clip folder `src` as `out_dir` (config + safetensors weights); returns the loaded result."""
    src, out_dir = Path(src), Path(out_dir)
    clip = _load(src, str(src))
    out_dir.mkdir(parents=True, exist_ok=True)
    config_text = (src / CONFIG_NAME).read_text()
    (out_dir / CONFIG_NAME).write_text(config_text)
    if (src / WEIGHTS_NAME).is_file():
        shutil.copyfile(src / WEIGHTS_NAME, out_dir / WEIGHTS_NAME)
    else:  # .bin / .pth / another name: the state dict open_clip loaded from it
        save_weights(out_dir / WEIGHTS_NAME, clip.model.state_dict(), {"format": "pt", "open_clip_config": config_text})
    return _load(out_dir, str(out_dir))
