"""Checks of what the readers read: every bad input becomes one UserError, before anything large is allocated.

The readers (io.py, modelset/, models/configs.py) call these; nothing here reads a file itself.
  safetensors_table  a safetensors header: a valid table of tensors, inside the file
  stage_tensors      a stage file's tensors: ranks, batch sizes and widths that agree, finite floats
  npy_header         a .npy's header: dtype and shape acceptable, data all there
  npy_values         a .npy's values: finite, in float32 too
  carry_fits         a PNG's carried tensors: the shapes and dtypes the next stage expects
  max_pixels         the image pixel limit ($UNCLIP_MAX_PIXELS)
  manifest           a model set's manifest: types and ranges of its fields
  typed              a JSON value against a (dataclass) type hint, strictly
  weights_fit        a network's parameter shapes against a weights file's header
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import types
import typing

import numpy as np
import torch

from unclip_cli import checks
from unclip_cli.errors import UserError

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
MAX_PIXELS_VAR = "UNCLIP_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 64_000_000


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- safetensors


def safetensors_table(header: dict, name: str, data_bytes: int) -> None:
    """A parsed safetensors header: every entry {dtype, shape, data_offsets} consistent with its size,
    the tensors tiling the `data_bytes` after the header exactly; metadata str -> str."""
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if entry is not None and (
                not isinstance(entry, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items())
            ):
                raise UserError(f"{name}: damaged safetensors file (metadata is not a table of strings)")
            continue
        what = f"{name}: damaged safetensors file (tensor {key[:60]!r}"
        if not isinstance(entry, dict):
            raise UserError(f"{what} is not described by an object)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise UserError(f"{what}: unknown dtype {str(dtype)[:20]!r})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise UserError(f"{what}: shape is not a list of sizes)")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
            raise UserError(f"{what}: data_offsets is not a pair of offsets)")
        if offsets[1] - offsets[0] != DTYPE_SIZES[dtype] * math.prod(shape):
            raise UserError(f"{what}: data_offsets do not match its dtype and shape)")
        spans.append(tuple(offsets))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise UserError(f"{name}: damaged safetensors file (tensor data overlap or leave gaps)")
        end = stop
    if end > data_bytes:
        raise UserError(f"{name}: truncated safetensors file")
    if end < data_bytes:
        raise UserError(f"{name}: damaged safetensors file ({data_bytes - end} bytes after the last tensor)")


# --------------------------------------------------------------------------- stage files

# rank of each tensor a stage file may hold, and what its dimensions are called
STAGE_SHAPES = {
    "image_embed": ("B", "D"),
    "text_embed": ("B", "D"),
    "text_hidden": ("B", "L", "W"),
    "text_mask": ("B", "L"),
    "noise": ("B", "C", "H", "W"),
}


def stage_tensors(tensors: dict[str, torch.Tensor], name: str) -> None:
    """A stage file's tensors: each of the rank in STAGE_SHAPES, floats finite (text_mask bool), no
    empty dimension, and the sizes of B, D, L agreeing across tensors."""
    sizes: dict[str, tuple[int, str]] = {}
    for key, t in tensors.items():
        if key not in STAGE_SHAPES:
            continue
        dims = STAGE_SHAPES[key]
        if t.ndim != len(dims):
            raise UserError(f"{name}: tensor {key} of shape {tuple(t.shape)}, expected ({', '.join(dims)})")
        if key == "text_mask":
            if t.dtype != torch.bool:
                raise UserError(f"{name}: tensor text_mask of dtype {t.dtype}, expected bool")
        elif not t.is_floating_point():
            raise UserError(f"{name}: tensor {key} of dtype {t.dtype}, expected floats")
        for dim, size in zip(dims, t.shape):
            if size < 1:
                raise UserError(f"{name}: tensor {key} of shape {tuple(t.shape)}: {dim} is empty")
            if dim in ("B", "D", "L"):
                seen = sizes.setdefault(dim, (size, key))
                if seen[0] != size:
                    raise UserError(f"{name}: {dim} is {seen[0]} in {seen[1]} but {size} in {key}")
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{name}: tensor {key} contains NaN or infinity")


def carry_fits(tensors: dict[str, torch.Tensor], size: tuple[int, int]) -> bool:
    """Whether a PNG's carried tensors are what the next stage reads: image (3, H, W) float32 finite at the
    PNG's size (W, H), rng_state the CPU generator's uint8 state."""
    image, state = tensors.get("image"), tensors.get("rng_state")
    if image is not None and (
        image.dtype != torch.float32 or tuple(image.shape) != (3, size[1], size[0]) or not torch.isfinite(image).all()
    ):
        return False
    if state is not None:
        expected = torch.Generator("cpu").get_state()
        if state.dtype != torch.uint8 or tuple(state.shape) != tuple(expected.shape):
            return False
    return True


# --------------------------------------------------------------------------- .npy


def npy_header(data: bytes, name: str) -> None:
    """A .npy's header, read before its data: float or int dtype, shape (D,) or (B, D) with no empty
    dimension, and the file long enough to hold it."""
    try:
        major, minor = data[6], data[7]
        if (major, minor) == (1, 0):
            n, start = int.from_bytes(data[8:10], "little"), 10
        elif major in (2, 3) and minor == 0:
            n, start = int.from_bytes(data[8:12], "little"), 12
        else:
            raise ValueError(f"unknown .npy version {major}.{minor}")
        header = ast.literal_eval(data[start : start + n].decode("latin1"))
        descr, shape = header["descr"], header["shape"]
        dtype = np.dtype(descr)
    except (IndexError, ValueError, SyntaxError, TypeError, KeyError, UnicodeDecodeError, MemoryError, RecursionError) as e:
        raise UserError(f"{name}: damaged .npy file (bad header: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__})") from None
    if dtype.kind not in "fiu" or dtype.fields is not None or dtype.subdtype is not None:
        raise UserError(f"{name}: .npy of dtype {dtype}, expected floats")
    if not isinstance(shape, tuple) or not all(_is_int(d) and d >= 0 for d in shape) or len(shape) not in (1, 2) or 0 in shape:
        raise UserError(f"{name}: .npy of shape {shape!r:.40}, expected (D,) or (B, D)")
    if len(data) - start - n < math.prod(shape) * dtype.itemsize:
        raise UserError(f"{name}: truncated .npy file")


def npy_values(arr: np.ndarray, name: str) -> None:
    """Every value finite, also once cast to float32 (1e300 is finite in float64 only)."""
    if not np.isfinite(arr).all():
        raise UserError(f"{name}: .npy contains NaN or infinity")
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 4 and np.abs(arr).max() > np.finfo(np.float32).max:
        raise UserError(f"{name}: .npy holds values too large for float32 (up to {np.abs(arr).max():.3g})")


# --------------------------------------------------------------------------- images


def max_pixels() -> int:
    """The largest image (width x height) a reader decodes: $UNCLIP_MAX_PIXELS, else DEFAULT_MAX_PIXELS."""
    raw = os.environ.get(MAX_PIXELS_VAR)
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"${MAX_PIXELS_VAR} must be a positive whole number of pixels, got {raw!r:.40}")
    return value


# --------------------------------------------------------------------------- manifests and configs

CLIP_FIELDS = ("embed_dim", "text_width", "context_length", "image_size")


def manifest(data: dict, path, components: tuple[str, ...]) -> None:
    """A manifest's fields: components known names, CLIP sizes positive ints, sampling settings in range."""
    where = f"{path}: damaged manifest"
    if "version" in data and not _is_int(data["version"]):
        raise UserError(f"{where} (version is not a whole number)")
    if "name" in data and not isinstance(data["name"], str):
        raise UserError(f"{where} (name is not a string)")
    listed = data.get("components", [])
    if not isinstance(listed, list):
        raise UserError(f"{where} (components is not a list)")
    for c in listed:
        if not isinstance(c, str) or c not in components:
            raise UserError(f"{where} (components: unknown component {str(c)[:40]!r})")
    clip = data.get("clip")
    if not isinstance(clip, dict) or not isinstance(clip.get("identity"), str) or "embed_dim" not in clip:
        raise UserError(f"{where} (no CLIP identity and embedding dimension)")
    for key in CLIP_FIELDS:
        if key in clip and not (_is_int(clip[key]) and clip[key] >= 1):
            raise UserError(f"{where} (clip.{key} is not a positive whole number: {str(clip[key])[:40]})")
    if "vision" in clip and not isinstance(clip["vision"], bool):
        raise UserError(f"{where} (clip.vision is not true or false)")
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        raise UserError(f"{where} (sampling is not an object)")
    for component, settings in sampling.items():
        if not isinstance(settings, dict):
            raise UserError(f"{where} (sampling.{component[:40]} is not an object)")
        try:
            checks.sampling(settings, f"sampling.{component[:40]}", sep=".")
        except UserError as e:
            raise UserError(f"{where} ({e})") from None


def typed(tp, value, where: str, choices: dict[str, tuple]):
    """`value` (from JSON) as type hint `tp`, strictly: ints positive (or listed in choices['>=0']),
    floats finite, strings one of choices[field]; a ValueError naming `where` (the field) otherwise."""
    origin, field_name = typing.get_origin(tp), where.rsplit(".", 1)[-1]
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return typed(next(a for a in typing.get_args(tp) if a is not type(None)), value, where, choices)
    if dataclasses.is_dataclass(tp):
        return dataclass_from_dict(tp, value, where, choices)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{where}: expected a non-empty list, got {str(value)[:40]}")
        item = typing.get_args(tp)[0]
        return tuple(typed(item, v, f"{where}[{i}]", choices) for i, v in enumerate(value))
    field_name = field_name.split("[")[0]
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = _is_int(value) and (value >= 1 or (value == 0 and field_name in choices.get(">=0", ())))
    elif tp is float:
        ok = _is_number(value) and value > 0
    elif tp is str:
        ok = isinstance(value, str) and value in choices.get(field_name, (value,))
    else:
        ok = True
    if not ok:
        expected = {bool: "true or false", int: "a positive whole number", float: "a positive finite number"}.get(
            tp, f"one of {list(choices.get(field_name, ()))}"
        )
        raise ValueError(f"{where} must be {expected}, got {str(value)[:40]}")
    return float(value) if tp is float else value


def dataclass_from_dict(cls, data, where: str, choices: dict[str, tuple]):
    """JSON object -> dataclass `cls` through `typed`, recursing into nested configs; unknown keys an error."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)[:5]}")
    return cls(**{k: typed(hints[k], v, f"{where}.{k}", choices) for k, v in data.items()})


def weights_fit(expected: dict[str, tuple[int, ...]], header: dict, where: str) -> None:
    """A network's parameter shapes (from a meta-device build) against a weights file's header: the
    same names, the same shapes; else a UserError naming the first few that differ."""
    found = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} vs {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    groups = [("of other shapes than the config's", wrong), ("missing", missing), ("unexpected", extra)]
    problems = [f"{len(names)} {label} ({'; '.join(names[:3])})" for label, names in groups if names]
    if problems:
        raise UserError(f"{where}: weights do not fit its config: tensors {'; '.join(problems)}"[:400])
