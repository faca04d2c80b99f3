"""CLIP embeddings of a dataset computed once, so prior and decoder training need not rerun CLIP.

The cache is one safetensors file, rows in the order of `index`:
  index        (N,)        int64    the source's item numbers
  image_embed  (N, D)      float32  CLIP image embedding (not normalized), as `encode-image`
  text_embed   (N, D)      float32  CLIP text embedding of the caption, as `encode-text`
  text_hidden  (N, L, W)   float16  last hidden states of the caption's tokens
  text_mask    (N, L)      bool     True from SOT up to EOT
metadata: format=unclip-embedding-cache, version, clip (identity), clip_dim, source, count,
captions (JSON list).

It is written batch by batch into a preallocated file and read through a memory map, so neither
side holds more than a batch (or the rows asked for) in memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from unclip_cli.errors import UserError
from unclip_cli.io import atomic_file

CACHE_FORMAT = "unclip-embedding-cache"
CACHE_VERSION = "1"
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "BOOL": np.bool_}


def _layout(n: int, dim: int, length: int, width: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) in file order: widest items first, so every tensor's data is aligned."""
    return [
        ("index", "I64", (n,)),
        ("image_embed", "F32", (n, dim)),
        ("text_embed", "F32", (n, dim)),
        ("text_hidden", "F16", (n, length, width)),
        ("text_mask", "BOOL", (n, length)),
    ]


def _row_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    return int(np.dtype(_DTYPES[dtype]).itemsize * np.prod(shape[1:], dtype=np.int64))


def _clip_images(source, clip, indices: list[int]):
    """The items as PIL images for CLIP: file sources give the files' own pixels (exactly what
    `encode-image` would see); the shapes are rendered at CLIP's input size."""
    from unclip_cli.io import tensor_to_images

    if hasattr(source, "pil_images"):
        return source.pil_images(indices)
    return tensor_to_images(source.images(indices, clip.image_size, clip.device))


def build_embedding_cache(
    source,
    clip,
    out_path: str | Path,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    callback: Callable[[int, int], None] | None = None,
    clip_identity: str | None = None,
) -> None:
    """Run `clip` (a ClipEncoder) once over the items (`indices`, default all of a finite source) and
    write the cache to `out_path` atomically. `callback(i, n)` after each batch, i the last row done.
    `clip_identity` (a model set's `clip_identity`) is recorded so that training can refuse a cache
    made with another CLIP."""
    from unclip_cli.data.sources import SHAPES_LENGTH

    if indices is None:
        if len(source) >= SHAPES_LENGTH:
            raise ValueError(f"{source.name} is endless: pass the indices to embed")
        indices = range(len(source))
    indices = [int(i) for i in indices]
    n = len(indices)
    if n == 0:
        raise UserError("nothing to embed: no items")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    captions = [source.caption(i) for i in indices]

    layout = _layout(n, clip.embed_dim, clip.context_length, clip.text_width)
    header: dict = {}
    offset = 0
    for name, dtype, shape in layout:
        size = _row_bytes(dtype, shape) * n
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "clip": clip_identity or "unknown",
        "clip_dim": str(clip.embed_dim),
        "source": source.name,
        "count": str(n),
        "captions": json.dumps(captions),
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so that the data starts 8-byte aligned
    start = 8 + len(raw)

    with atomic_file(out_path) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(start + offset)
        for a in range(0, n, batch_size):
            idx = indices[a : a + batch_size]
            text_embed, text_hidden, text_mask = clip.encode_text(captions[a : a + batch_size])
            rows = {
                "index": torch.tensor(idx, dtype=torch.int64),
                "image_embed": clip.encode_image(_clip_images(source, clip, idx)).float(),
                "text_embed": text_embed.float(),
                "text_hidden": text_hidden.half(),
                "text_mask": text_mask.bool(),
            }
            for name, dtype, shape in layout:
                f.seek(start + header[name]["data_offsets"][0] + a * _row_bytes(dtype, shape))
                f.write(rows[name].detach().cpu().contiguous().numpy().tobytes())
            if callback is not None:
                callback(a + len(idx) - 1, n)


class EmbeddingCache:
    """A cache file opened through a memory map; `get(rows)` reads only those rows."""

    def __init__(self, path: Path, arrays: dict[str, np.ndarray], meta: dict[str, str], captions: list[str]):
        self.path = path
        self._arrays = arrays
        self.meta = meta
        self.captions = captions
        self.clip: str = meta["clip"]
        self.source: str = meta["source"]
        self.indices: torch.Tensor = torch.from_numpy(np.array(arrays["index"]))  # (N,) int64
        self.embed_dim: int = arrays["image_embed"].shape[1]

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingCache":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such embedding cache")
        total = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not an embedding cache (truncated)")
            (n,) = struct.unpack("<Q", head)
            if n > min(total - 8, 1 << 30):
                raise UserError(f"{path}: not an embedding cache (or truncated)")
            raw = f.read(n)
        try:
            header = json.loads(raw)
            meta = header.pop("__metadata__")
            if meta.get("format") != CACHE_FORMAT:
                raise UserError(f"{path}: a safetensors file, but not an unclip embedding cache")
            if meta.get("version") != CACHE_VERSION:
                raise UserError(f"{path}: embedding cache version {meta.get('version')!r}, this unclip reads {CACHE_VERSION}")
            arrays = {}
            for name, dtype, expected in _layout(0, 0, 0, 0):
                spec = header[name]
                a, b = spec["data_offsets"]
                shape = tuple(int(s) for s in spec["shape"])
                if spec["dtype"] != dtype or len(shape) != len(expected):
                    raise ValueError(f"tensor {name} has dtype {spec['dtype']} and shape {shape}")
                nbytes = int(np.dtype(_DTYPES[dtype]).itemsize * np.prod(shape, dtype=np.int64))
                if b - a != nbytes or 8 + n + b > total:
                    raise ValueError(f"tensor {name} is truncated")
                arrays[name] = np.memmap(path, dtype=_DTYPES[dtype], mode="r", offset=8 + n + a, shape=shape)
            rows = {name: arr.shape[0] for name, arr in arrays.items()}
            captions = json.loads(meta["captions"])
            if len(set(rows.values())) != 1 or len(captions) != rows["index"]:
                raise ValueError(f"row counts disagree ({rows}, {len(captions)} captions)")
            if arrays["image_embed"].shape[1] != arrays["text_embed"].shape[1] or (
                arrays["text_hidden"].shape[1] != arrays["text_mask"].shape[1]
            ):
                raise ValueError("tensor shapes disagree")
            meta["clip"], meta["source"]  # noqa: B018  (required fields)
        except UserError:
            raise
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path}: damaged embedding cache ({type(e).__name__}: {e})".splitlines()[0]) from None
        return cls(path, arrays, meta, captions)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def get(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors' rows (B,) -> index, image_embed, text_embed, text_hidden (as float32), text_mask."""
        r = torch.as_tensor(rows, dtype=torch.int64).cpu().numpy()
        out = {name: torch.from_numpy(np.ascontiguousarray(arr[r])) for name, arr in self._arrays.items()}
        out["text_hidden"] = out["text_hidden"].float()
        return out
