"""Image/caption datasets behind one small interface: the procedural shapes, a folder, tar shards.

  shapes                      item i is `scene_for_index(seed, i)`, rendered at the asked size
  DIR                         images (jpg/jpeg/png/webp, recursively) each with a same-named .txt caption
  shard.tar, DIR of .tar,     webdataset layout (what img2dataset writes): members {key}.jpg|png|... and
  "d/{00000..00009}.tar",     {key}.txt, the key being the member path up to the first dot of its name;
  "d/*.tar"                   indexed once with `tarfile`, read lazily by offset

Images are resized as CLIP's preprocessing does (shortest side to `size` with PIL's antialiased
bicubic, then a centre crop), so a source and `encode-image` see the same pixels.
"""

from __future__ import annotations

import glob
import os
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch
from PIL import Image

from unclip_cli.data.shapes import render, scene_for_index, scene_group
from unclip_cli.errors import UserError
from unclip_cli.io import decode_image, images_to_tensor

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a key has several
SHAPES_LENGTH = 2**31  # nominal length of the endless shapes stream


@runtime_checkable
class ImageTextSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    def caption(self, index: int) -> str: ...

    def images(self, indices: Sequence[int], size: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """(B, 3, size, size) float32 in [-1, 1]."""
        ...

    def sample(
        self, batch: int, size: int, generator: torch.Generator, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, list[str], list[int]]:
        """A random batch, indices uniform over the items drawn with `generator`: (images, captions, indices)."""
        ...


class _Sampling:
    """`sample` for every source, from `__len__`, `images` and `caption`."""

    def sample(self, batch, size, generator, device="cpu"):
        indices = torch.randint(len(self), (batch,), generator=generator, device=generator.device).tolist()
        return self.images(indices, size, device), [self.caption(i) for i in indices], indices


def _check_index(index: int, length: int) -> int:
    if not 0 <= index < length:
        raise IndexError(f"item {index} out of range (0..{length - 1})")
    return int(index)


def resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Shortest side to `size` (PIL bicubic, antialiased), centre crop (offset floored), as ClipEncoder does."""
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize(new, Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------- shapes


class ShapesSource(_Sampling):
    """The procedural dataset: item i is `scene_for_index(seed, i)`, rendered directly at any size."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.name = f"shapes(seed={self.seed})"

    def __len__(self) -> int:
        return SHAPES_LENGTH

    def scene(self, index: int):
        return scene_for_index(self.seed, _check_index(index, SHAPES_LENGTH))

    def caption(self, index: int) -> str:
        return self.scene(index).caption

    def images(self, indices, size, device="cpu"):
        return render([self.scene(i) for i in indices], size, device)

    def sample_groups(self, groups: int, k: int, size: int, generator: torch.Generator, device="cpu"):
        """`groups` groups of `k` hard-negative scenes (`shapes.scene_group`), each drawn from a seed
        that `generator` gives: (images (groups * k, 3, size, size), captions)."""
        seeds = torch.randint(2**62, (groups,), generator=generator, device=generator.device).tolist()
        scenes = [s for seed in seeds for s in scene_group(random.Random(f"unclip-shapes-group/{self.seed}/{seed}"), k)]
        return render(scenes, size, device), [s.caption for s in scenes]


# ---------------------------------------------------------------------- files


class _FileSource(_Sampling):
    """A finite source whose items are encoded images and captions held in files."""

    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def _read_image(self, index: int) -> tuple[bytes, str]:
        """(encoded image, display name)."""
        raise NotImplementedError

    def _read_caption(self, index: int) -> str:
        raise NotImplementedError

    def caption(self, index: int) -> str:
        return self._read_caption(_check_index(index, len(self)))

    def pil_images(self, indices: Sequence[int]) -> list[Image.Image]:
        """The items' images as decoded RGB, at their own size."""
        out = []
        for i in indices:
            data, name = self._read_image(_check_index(i, len(self)))
            out.append(decode_image(data, name))
        return out

    def images(self, indices, size, device="cpu"):
        if not indices:
            return torch.zeros(0, 3, size, size, device=device)
        return images_to_tensor([resize_crop(img, size) for img in self.pil_images(indices)]).to(device)


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UserError(f"{name}: caption is not UTF-8 text") from None


class FolderSource(_FileSource):
    """Images anywhere under `root`, each with a same-named .txt caption beside it (hidden files skipped)."""

    def __init__(self, root: Path, name: str | None = None, images: list[Path] | None = None):
        self.root = Path(root)
        self.name = name or str(root)
        self.items: list[tuple[Path, Path]] = []  # (image, caption), sorted by path
        for image in walk_images(self.root) if images is None else images:
            caption = image.with_suffix(".txt")
            if not caption.is_file():
                raise UserError(f"{image}: image without a caption ({caption.name} missing)")
            self.items.append((image, caption))
        if not self.items:
            raise UserError(f"{root}: no images found (jpg, jpeg, png, webp)")

    def __len__(self) -> int:
        return len(self.items)

    def _read_image(self, index: int) -> tuple[bytes, str]:
        path = self.items[index][0]
        try:
            return path.read_bytes(), str(path)
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None

    def _read_caption(self, index: int) -> str:
        path = self.items[index][1]
        try:
            return _text(path.read_bytes(), str(path))
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def walk_images(root: Path) -> list[Path]:
    """Image files (IMAGE_EXTS) anywhere under root, hidden files and folders skipped, sorted by relative path."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if not f.startswith(".") and "." in f and f.rsplit(".", 1)[1].lower() in IMAGE_EXTS:
                found.append(Path(folder) / f)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def walk_tars(root: Path) -> list[Path]:
    """.tar files anywhere under root, hidden ones skipped, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in files if f.lower().endswith(".tar") and not f.startswith(".")]
    return sorted(found)


@dataclass(frozen=True)
class _Member:
    shard: int  # index into TarSource.shards
    name: str  # member name inside the shard
    offset: int  # byte offset of the data in the shard file
    size: int


class TarSource(_FileSource):
    """webdataset-style shards: {key}.jpg|jpeg|png|webp + {key}.txt, indexed once, read by offset."""

    def __init__(self, shards: list[Path], name: str):
        self.shards = list(shards)
        self.name = name
        self.items: list[tuple[_Member, _Member]] = []  # (image, caption)
        for s, shard in enumerate(self.shards):
            self.items += _index_shard(s, shard)
        if not self.items:
            raise UserError(f"{name}: no images found in {len(self.shards)} shard(s)")

    def __len__(self) -> int:
        return len(self.items)

    def _member(self, m: _Member) -> tuple[bytes, str]:
        shard = self.shards[m.shard]
        name = f"{shard}:{m.name}"
        try:
            with open(shard, "rb") as f:  # opened per read: safe in forked data-loader workers
                f.seek(m.offset)
                data = f.read(m.size)
        except OSError as e:
            raise UserError(f"{name}: cannot read ({e.strerror or e})") from None
        if len(data) != m.size:
            raise UserError(f"{name}: truncated shard")
        return data, name

    def _read_image(self, index: int) -> tuple[bytes, str]:
        return self._member(self.items[index][0])

    def _read_caption(self, index: int) -> str:
        return _text(*self._member(self.items[index][1]))


def _index_shard(s: int, shard: Path) -> list[tuple[_Member, _Member]]:
    """The (image, caption) members of one shard, grouped by key, in the order of the shard."""
    keys: dict[str, dict[str, _Member]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, _, base = info.name.rpartition("/")
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = f"{folder}/{stem}" if folder else stem
                keys.setdefault(key, {})[ext.lower()] = _Member(s, info.name, info.offset_data, info.size)
    except tarfile.ReadError as e:
        raise UserError(f"{shard}: not an uncompressed tar shard ({e})") from None
    except OSError as e:
        raise UserError(f"{shard}: cannot read ({e.strerror or e})") from None
    items = []
    for key, members in keys.items():
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image is None:
            continue  # e.g. a lone .json or .txt: img2dataset keeps only successes, but be lenient
        if "txt" not in members:
            raise UserError(f"{shard}: {image.name} has no caption ({key}.txt missing)")
        items.append((image, members["txt"]))
    return items


# ---------------------------------------------------------------------- opening


def _expand_braces(pattern: str) -> list[str]:
    """Shell-style braces: "{00000..00009}" (zero padding kept) and "{a,b}", nested left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    if r := re.fullmatch(r"(\d+)\.\.(\d+)", body):
        lo, hi = int(r[1]), int(r[2])
        width = len(r[1]) if r[1].startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise UserError(f"{pattern}: cannot expand {{{body}}} (use {{000..009}} or {{a,b}})")
    return [p for c in choices for p in _expand_braces(head + c + tail)]


def _shards_from_pattern(src: str) -> list[Path]:
    paths: list[Path] = []
    for pattern in _expand_braces(src):
        if glob.has_magic(pattern):
            matched = sorted(glob.glob(pattern))
            if not matched:
                raise UserError(f"{pattern}: matches no files")
            paths += [Path(p) for p in matched]
        elif not Path(pattern).is_file():
            raise UserError(f"{pattern}: no such shard")
        else:
            paths.append(Path(pattern))
    for p in paths:
        if not (p.is_file() and p.name.lower().endswith(".tar")):
            raise UserError(f"{p}: not a .tar shard")
    return paths


def open_source(src: str, seed: int = 0) -> ImageTextSource:
    """"shapes", an image folder, a .tar shard, a folder of shards, or a shard pattern (braces, globs)."""
    if src == "shapes":
        return ShapesSource(seed)
    if "{" in src or glob.has_magic(src):
        return TarSource(_shards_from_pattern(src), src)
    path = Path(src)
    if path.is_file():
        if not path.name.lower().endswith(".tar"):
            raise UserError(f"{src}: expected a folder of images, a .tar shard, or 'shapes'")
        return TarSource([path], src)
    if not path.is_dir():
        raise UserError(f"{src}: no such folder or file")
    images = walk_images(path)
    if images:
        return FolderSource(path, src, images)
    shards = walk_tars(path)
    if shards:
        return TarSource(shards, src)
    raise UserError(f"{src}: no images found (jpg, jpeg, png, webp with .txt captions) and no .tar shards")
