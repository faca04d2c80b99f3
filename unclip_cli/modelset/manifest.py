"""model.json, a model set's manifest: the one place its format is read, checked and written.

    {"format": "unclip-modelset", "version": 1, "name": ...,
     "components": [in COMPONENTS order],
     "clip": {"identity": "NAME@HASH", "embed_dim", "text_width", "context_length", "image_size", "vision"},
     "sampling": {component: {setting: value}},
     ...extra facts: "preset", "seed", "source"}
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from unclip_cli import validate
from unclip_cli.errors import UserError
from unclip_cli.io import atomic_write, read_json_object, read_safetensors_header
from unclip_cli.models.presets import DEFAULT_SAMPLING

MANIFEST = "model.json"
MANIFEST_FORMAT = "unclip-modelset"
MANIFEST_VERSION = 1
COMPONENTS = ("clip", "prior", "prior-ar", "decoder", "upsampler-256", "upsampler-1024")
CLIP_WEIGHTS = "open_clip_model.safetensors"  # inside clip/ (open_clip's local-dir layout)


def is_model_set(folder: Path) -> bool:
    """Whether `folder` holds a manifest (read_manifest still checks it)."""
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict:
    """A model set's manifest, checked to be one; a one-line UserError otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"{folder}: model set folder not found")
    if not path.is_file():
        raise UserError(f"{folder}: not a model set (no {MANIFEST})")
    manifest = read_json_object(path, "manifest")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: not an unclip model-set manifest")
    validate.manifest(manifest, path, COMPONENTS)  # fields of the right types, sizes and settings in range
    return manifest


def save_manifest(folder: Path, manifest: dict) -> None:
    """Write `manifest` as folder/model.json (atomically), components in their canonical order."""
    manifest = dict(manifest, components=[c for c in COMPONENTS if c in manifest.get("components", [])])
    atomic_write(Path(folder) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def write_manifest(root: Path, name: str, components: list[str], clip_name: str, sampling: dict, **extra) -> dict:
    """Write a new set's manifest, its CLIP facts read from root/clip; returns it."""
    from unclip_cli.models.clip import ClipEncoder

    clip = ClipEncoder.load(root / "clip")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "name": name,
        "components": list(components),
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
    save_manifest(root, manifest)
    return read_manifest(root)


def with_component(manifest: dict, component: str, sampling: dict | None = None) -> dict:
    """A copy of `manifest` that lists `component` (and its sampling settings, if given)."""
    out = dict(manifest, components=[c for c in COMPONENTS if c in {*manifest.get("components", []), component}])
    if sampling is not None:
        out["sampling"] = {**manifest.get("sampling", {}), component: sampling}
    return out


def component_sampling(manifest: dict, component: str) -> dict:
    """A component's sampling settings: DEFAULT_SAMPLING overridden by the manifest's."""
    return {**DEFAULT_SAMPLING.get(component, {}), **manifest.get("sampling", {}).get(component, {})}


# ---------------------------------------------------------------------- the CLIP's identity


def clip_identity(clip_dir: Path, name: str) -> str:
    """A CLIP's identity: its name and the hash of its weights, so stage files can't be mixed across CLIPs.

    The hash covers the tensors (names, dtypes, shapes, data), not the file's header: safetensors
    writes the metadata in no fixed order, so the same weights saved twice differ in their bytes.
    """
    path = Path(clip_dir) / CLIP_WEIGHTS
    header = read_safetensors_header(path)
    tensors = sorted((k, v["dtype"], v["shape"], v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    h = hashlib.sha256(json.dumps(tensors).encode())
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{name}@{h.hexdigest()[:16]}"


def clip_name(manifest: dict) -> str:
    """The name part of the set's CLIP identity (NAME@HASH): a copy of the CLIP keeps it."""
    return manifest["clip"]["identity"].split("@")[0]


def refresh_clip_identity(root: Path) -> tuple[str, dict]:
    """After root/clip's weights changed: write the new identity; returns (old identity, new manifest)."""
    manifest = read_manifest(root)
    old = manifest["clip"]["identity"]
    manifest = dict(manifest, clip={**manifest["clip"], "identity": clip_identity(Path(root) / "clip", clip_name(manifest))})
    save_manifest(root, manifest)
    return old, manifest
