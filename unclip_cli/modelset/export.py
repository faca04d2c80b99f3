"""Copy a model set's weights, configs and manifest to another folder: what ships, nothing else.

Training states, logs, embedding caches and anything else in the source stay behind. A destination
that is already a model set keeps its model card (README.md) and pictures (*.png); a folder that is
not a model set is never replaced. The copy is built beside the destination and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from unclip_cli.errors import UserError
from unclip_cli.modelset.components import CONFIG, WEIGHTS
from unclip_cli.modelset.manifest import CLIP_WEIGHTS, MANIFEST, is_model_set, read_manifest

SHIPPED_FILE_LIMIT = 16 * 2**20  # bytes: the most a shipped weight file may hold
CLIP_FILES = ("open_clip_config.json", CLIP_WEIGHTS)
KEPT_FROM_DEST = ("README.md", "*.png")  # the model card and its pictures


def set_files(src: Path) -> list[Path]:
    """The files that make up the set in `src`, relative to it: manifest, then each component's config and weights."""
    manifest = read_manifest(src)
    files = [Path(MANIFEST)]
    for component in manifest.get("components", []):
        names = CLIP_FILES if component == "clip" else (CONFIG, WEIGHTS)
        for name in names:
            if not (src / component / name).is_file():
                raise UserError(f"{src / component / name}: missing (the manifest lists {component})")
            files.append(Path(component) / name)
    return files


def export_model_set(src: Path, dest: Path, limit: int = SHIPPED_FILE_LIMIT) -> list[tuple[Path, int]]:
    """Copy the set `src` to `dest` (see the module docstring); returns (file in dest, bytes) per file copied."""
    src, dest = Path(src), Path(dest)
    files = set_files(src)
    if dest.resolve() == src.resolve():
        raise UserError(f"{dest}: is the source set itself")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest}: exists and is not a folder; not replacing it")
    if dest.is_dir() and any(dest.iterdir()) and not is_model_set(dest):
        raise UserError(f"{dest}: exists and is not a model set (no {MANIFEST}); not replacing it")
    for rel in files:
        size = (src / rel).stat().st_size
        if size > limit:
            raise UserError(f"{src / rel}: {size / 2**20:.1f} MiB, over the {limit / 2**20:g} MiB a shipped file may hold")
    parent = dest.resolve().parent
    if not parent.is_dir():
        raise UserError(f"{parent}: folder does not exist")

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=parent))
    old = None
    try:
        copied = []
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, tmp / rel)
            copied.append((dest / rel, (tmp / rel).stat().st_size))
        if dest.is_dir():
            for pattern in KEPT_FROM_DEST:
                for kept in dest.glob(pattern):
                    if kept.is_file():
                        shutil.copyfile(kept, tmp / kept.name)
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=parent))
            os.replace(dest, old)  # an empty folder is replaced by a rename onto it
        os.replace(tmp, dest)
    except BaseException:
        if old is not None and not dest.exists():
            os.replace(old, dest)  # put the previous set back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return copied
