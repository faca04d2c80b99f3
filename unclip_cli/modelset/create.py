"""Create a model set from a preset, or add a freshly initialized component to one.

The set code knows no foreign format: a set whose CLIP comes from elsewhere gets it from the
caller, as a function that writes an open_clip folder (convert/open_clip_dir.py makes one).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

from unclip_cli.errors import UserError
from unclip_cli.io import new_folder
from unclip_cli.modelset.components import CONFIG_TYPES, save_component, seeded_component
from unclip_cli.modelset.manifest import read_manifest, save_manifest, with_component, write_manifest
from unclip_cli.models.presets import get_preset

# writes an open_clip local-dir folder (open_clip_config.json + open_clip_model.safetensors) at the
# path it is given and returns the CLIP's name (the name part of the set's CLIP identity)
ClipWriter = Callable[[Path], str]


def new_set_folder(out: Path) -> contextlib.AbstractContextManager[Path]:
    """Build a new set in a folder beside `out` (which must not exist, or be empty); renamed to `out` when the
    block ends, removed if it fails, so that no half-written set is ever left at `out` (io.new_folder)."""
    return new_folder(out, refusal="exists and is not empty")


def init_model_set(
    out: Path, preset: str, seed: int = 0, name: str | None = None, write_clip: ClipWriter | None = None
) -> None:
    """Write a randomly initialized model set from a named preset (atomically: built aside, then renamed).

    write_clip: writes the set's CLIP instead of the preset's random one; the networks are sized
    to its embedding and text widths.
    """
    from unclip_cli.models.clip import DEFAULT_PREPROCESS_CFG, ClipEncoder, write_clip_dir

    spec = get_preset(preset)
    with new_set_folder(out) as tmp:
        if write_clip is None:
            write_clip_dir(tmp / "clip", spec.clip, DEFAULT_PREPROCESS_CFG, seed=seed)
            clip_name, dims = f"{preset}-clip", (spec.clip["embed_dim"], spec.clip["text_cfg"]["width"], 77)
        else:
            clip_name = write_clip(tmp / "clip")
            enc = ClipEncoder.load(tmp / "clip")
            dims = (enc.embed_dim, enc.text_width, enc.context_length)
        configs = spec.configs(*dims)
        for i, (component, cfg) in enumerate(configs.items()):
            save_component(tmp, component, cfg, seeded_component(component, cfg, seed, i))
        write_manifest(
            tmp, name or f"{preset}-random", ["clip", *configs], clip_name=clip_name,
            sampling=spec.sampling, preset=preset, seed=seed,
        )


def add_component(path: Path, component: str, preset: str, seed: int = 0, replace: bool = False) -> None:
    """Add a freshly initialized component, sized from `preset` to the set's CLIP, to an existing set
    (for example an AR prior beside an imported Karlo set's diffusion prior)."""
    manifest = read_manifest(path)
    spec = get_preset(preset)
    if component not in CONFIG_TYPES:
        raise UserError(f"cannot add {component!r} (components: {', '.join(CONFIG_TYPES)})")
    if component in manifest.get("components", []) and not replace:
        name = manifest.get("name", Path(path).name)
        raise UserError(f"model set {name!r} already has {component} (--replace to start it over)")
    clip = manifest["clip"]
    configs = spec.configs(clip["embed_dim"], clip["text_width"], clip.get("context_length", 77))
    module = seeded_component(component, configs[component], seed, list(configs).index(component))
    save_component(path, component, configs[component], module)
    save_manifest(path, with_component(manifest, component, spec.sampling.get(component)))
