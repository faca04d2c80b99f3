"""The one place that knows files and pipes: stage files (safetensors / .npy), PNGs, stdin/stdout, weights.

Stage files are safetensors with named tensors and string metadata:
  format=unclip-stage, version, kind (text|image|latent), clip (CLIP identity), clip_dim,
  prompts (JSON list), seed, plus free-form fields. A bare .npy holds only the main tensor.
Every write goes to a temporary file in the target folder and is renamed into place, so a
failure never leaves a partial output.
"""

from __future__ import annotations

import io as _io
import json
import os
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from unclip_cli import validate
from unclip_cli.errors import UserError
from unclip_cli.outputs import (  # noqa: F401 (the write side, re-exported: callers look for files and pipes here)
    atomic_file, atomic_write, check_output, check_output_folder, emit, new_folder, numbered, show, stdout_target,
    write_all, write_folder,
)

STAGE_FORMAT = "unclip-stage"
STAGE_VERSION = "1"
NPY_MAGIC = b"\x93NUMPY"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Private PNG chunk (ancillary, private, unsafe to copy) holding a safetensors blob of what the next
# stage needs to continue exactly as one pipeline run: the float image behind the 8-bit pixels and
# the random generator's state. Viewers ignore it; read back into `img.info[CARRY_KEY]`.
CARRY_CHUNK = b"unCL"
CARRY_KEY = "unclip_carry"
RECORD_KEY = "unclip"  # tEXt keyword of a PNG's record (how it was made: see record.py)
# Tensor that a bare .npy stands for, per stage-file kind.
MAIN_TENSOR = {"text": "text_embed", "image": "image_embed", "latent": "image_embed"}


@dataclass
class StageFile:
    """Named tensors + metadata passed between stages."""

    kind: str  # "text" | "image" | "latent"
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)
    bare: bool = False  # read from a bare .npy (no metadata, no CLIP identity)

    @property
    def prompts(self) -> list[str] | None:
        raw = self.meta.get("prompts")
        return json.loads(raw) if raw else None

    @property
    def clip(self) -> str | None:
        return self.meta.get("clip")

    @property
    def main(self) -> torch.Tensor:
        return self.tensors[MAIN_TENSOR[self.kind]]


# --------------------------------------------------------------------------- sources and sinks


def read_input(source: str | None, what: str) -> tuple[bytes, str]:
    """Bytes of FILE, or of stdin for '-' / no argument with stdin a pipe. Returns (data, display name)."""
    if source is None or source == "-":
        if source is None and sys.stdin.isatty():
            raise UserError(f"no {what} given: pass a file, or pipe one into stdin")
        data = sys.stdin.buffer.read()
        if not data:
            raise UserError(f"empty stdin: expected {what}")
        return data, "<stdin>"
    path, name = Path(source), show(source)  # the name messages print: one line whatever the path holds
    if not path.exists():
        raise UserError(f"{name}: no such file")
    if path.is_dir():
        raise UserError(f"{name}: is a folder, expected {what}")
    data = path.read_bytes()
    if not data:
        raise UserError(f"{name}: empty file")
    return data, name


def read_json_object(path: str | Path, what: str = "JSON file") -> dict:
    """The JSON object in file `path`; a one-line UserError ("PATH: damaged WHAT (...)") if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged {what} (not valid JSON: {e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: damaged {what} (not a JSON object)")
    return data


# --------------------------------------------------------------------------- safetensors


def _header_json(n: int, raw: bytes, name: str, data_bytes: int) -> dict:
    """A safetensors header (n bytes, read as `raw`) followed by `data_bytes` of tensor data, checked."""
    if n > 100_000_000 or len(raw) < n:
        raise UserError(f"{name}: not a safetensors or .npy file (or truncated)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{name}: not a safetensors or .npy file (bad header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{name}: not a safetensors file (bad header)")
    validate.safetensors_table(header, name, data_bytes)
    return header


def _safetensors_header(data: bytes, name: str) -> dict:
    if len(data) < 8:
        raise UserError(f"{name}: truncated file (not a safetensors or .npy file)")
    (n,) = struct.unpack("<Q", data[:8])
    return _header_json(n, data[8 : 8 + n], name, len(data) - 8 - n)


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, metadata) without reading the tensors."""
    with open(path, "rb") as f:
        return _read_header(f, str(path))[0]


def _read_header(f, name: str) -> tuple[dict, int]:
    """(the checked header, where the tensor data starts) of the safetensors file open as `f`."""
    head = f.read(8)
    if len(head) < 8:
        raise UserError(f"{name}: truncated safetensors file")
    (n,) = struct.unpack("<Q", head)
    raw = f.read(min(n, 100_000_001))
    size = os.fstat(f.fileno()).st_size
    return _header_json(n, raw, name, size - 8 - n), 8 + n


def load_safetensors_bytes(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors bytes into (tensors, metadata); any damage is a UserError."""
    from safetensors.torch import load

    header = _safetensors_header(data, name)
    try:
        tensors = load(data)
    except Exception as e:  # the library raises several types for damaged files
        raise UserError(f"{name}: damaged safetensors file ({e})") from None
    return tensors, dict(header.get("__metadata__") or {})


def safetensors_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)


def load_state_dict(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | dict[str, torch.dtype] | None = None
) -> dict[str, torch.Tensor]:
    """Load weights safely: safetensors, else torch.load(weights_only=True). Never unpickles arbitrary data.

    A safetensors file is read tensor by tensor onto `device`, floating tensors cast to `dtype` (one
    for all, or {name: dtype}; None keeps the file's): no second copy of the weights is ever held."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file missing")
    if path.suffix == ".safetensors":
        return _read_tensors(path, torch.device(device), dtype)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot load weights ({type(e).__name__}: {e})".splitlines()[0]) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state dict")
    return state


# safetensors dtype names -> torch dtypes (those this torch has)
_TORCH_DTYPES = {
    k: getattr(torch, v) for k, v in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
        "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    }.items() if hasattr(torch, v)
}


def _read_tensors(path: Path, device: torch.device, dtype) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, each read from disk into its own CPU tensor (the final one when
    neither device nor dtype changes it), then moved and cast alone: peak memory is the result plus
    the largest tensor."""
    out = {}
    with open(path, "rb", buffering=0) as f:
        header, start = _read_header(f, str(path))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _TORCH_DTYPES or sys.byteorder != "little":
                raise UserError(f"{path}: tensor {name[:60]!r} of dtype {entry['dtype']}, which this torch cannot read")
            t = torch.empty(entry["shape"], dtype=_TORCH_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            buf, done = memoryview(t.reshape(-1).view(torch.uint8).numpy()), 0
            while done < end - begin:
                got = f.readinto(buf[done:])
                if not got:
                    raise UserError(f"{path}: truncated safetensors file")
                done += got
            want = dtype.get(name) if isinstance(dtype, dict) else dtype
            out[name] = t.to(device, want if want is not None and t.is_floating_point() else t.dtype)
            del t, buf
    return out


def save_weights(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    atomic_write(path, safetensors_bytes(state, meta or {}))


# --------------------------------------------------------------------------- stage files


def read_stage(source: str | None, what: str = "a stage file") -> StageFile:
    """Read a stage file (safetensors) or a bare .npy embedding from a path or stdin."""
    data, name = read_input(source, what)
    return parse_stage(data, name, what)


def parse_stage(data: bytes, name: str, what: str = "a stage file") -> StageFile:
    """A stage file (safetensors) or bare .npy embedding from bytes already read (see read_stage)."""
    if data.startswith(NPY_MAGIC):
        return _read_npy(data, name)
    if data.startswith(PNG_MAGIC) or data[:3] == b"\xff\xd8\xff":
        raise UserError(f"{name}: is an image, expected {what} (encode it first: unclip encode-image)")
    tensors, meta = load_safetensors_bytes(data, name)
    if meta.get("format") != STAGE_FORMAT:
        raise UserError(f"{name}: a safetensors file, but not an unclip stage file")
    if meta.get("version") != STAGE_VERSION:
        raise UserError(f"{name}: stage file version {meta.get('version')!r}, this unclip reads {STAGE_VERSION}")
    kind = meta.get("kind")
    if kind not in MAIN_TENSOR or MAIN_TENSOR[kind] not in tensors:
        raise UserError(f"{name}: stage file of unknown kind {kind!r} or missing its main tensor")
    if kind == "latent" and "noise" not in tensors:  # (z_i, x_T): x_T is one (C, H, W) noise image per embedding
        raise UserError(f"{name}: latent file without a (B, C, H, W) noise tensor matching its image_embed")
    validate.stage_tensors(tensors, name)
    return StageFile(kind=kind, tensors=tensors, meta=meta)


def _read_npy(data: bytes, name: str) -> StageFile:
    validate.npy_header(data, name)  # dtype, shape, length: before numpy allocates anything
    try:
        arr = np.load(_io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise UserError(f"{name}: damaged .npy file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if arr.ndim == 1:
        arr = arr[None]
    validate.npy_values(arr, name)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return StageFile(kind="image", tensors={"image_embed": t}, meta={}, bare=True)


def write_stage(stage: StageFile, output: str | None) -> None:
    """Write a stage file to a path (.npy -> the main tensor only) or to stdout (safetensors)."""
    if output is not None and output.endswith(".npy"):
        buf = _io.BytesIO()
        np.save(buf, stage.main.detach().cpu().float().numpy())
        emit(buf.getvalue(), output)
        return
    meta = {"format": STAGE_FORMAT, "version": STAGE_VERSION, "kind": stage.kind}
    meta.update({k: str(v) for k, v in stage.meta.items() if k not in meta})
    emit(safetensors_bytes(stage.tensors, meta), output)


def load_stage(path: str | os.PathLike) -> StageFile:
    """The Python API's reader: a stage file or bare .npy embedding from a path ('-': stdin)."""
    return read_stage(str(path))


def save_stage(stage: StageFile, path: str | os.PathLike) -> None:
    """The Python API's writer: a stage file to a path (a .npy name: the main tensor alone), atomically."""
    write_stage(stage, str(path))


# --------------------------------------------------------------------------- images


def split_pngs(data: bytes, name: str) -> list[bytes]:
    """Split a byte stream of one or more concatenated PNGs (how stages pipe batches) into PNGs."""
    out, pos = [], 0
    while pos < len(data):
        if data[pos : pos + 8] != PNG_MAGIC:
            break
        p = pos + 8
        while True:
            if p + 8 > len(data):
                raise UserError(f"{name}: truncated PNG")
            (length,) = struct.unpack(">I", data[p : p + 4])
            ctype = data[p + 4 : p + 8]
            p += 12 + length
            if ctype == b"IEND":
                break
        if p > len(data):
            raise UserError(f"{name}: truncated PNG")
        out.append(data[pos:p])
        pos = p
    if not out or pos != len(data):
        return [data]  # not a clean PNG stream: let PIL decide (JPEG etc.)
    return out


def decode_image(data: bytes, name: str) -> Image.Image:
    """An image's pixels as RGB; over validate.max_pixels() ($UNCLIP_MAX_PIXELS) is refused before decoding."""
    limit = validate.max_pixels()
    Image.MAX_IMAGE_PIXELS = limit  # PIL checks the size in the header: warns above, refuses above twice
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(_io.BytesIO(data))
            if img.width * img.height > limit:
                raise Image.DecompressionBombWarning
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{name}: image larger than {limit} pixels (set ${validate.MAX_PIXELS_VAR} to allow more)") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: not a readable image (unknown image format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise UserError(f"{name}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return img.convert("RGB")


def read_images(sources: list[str] | None, what: str = "an image") -> list[tuple[Image.Image, str]]:
    """Images from paths, or from stdin (one or several concatenated PNGs). Returns (image, name) pairs.

    A PNG's CARRY_CHUNK tensors, if any, are in `img.info[CARRY_KEY]`.
    """
    items = []
    for source in sources or [None]:
        data, name = read_input(source, what)
        if data.startswith(NPY_MAGIC):
            raise UserError(f"{name}: is a .npy array, expected {what}")
        parts = split_pngs(data, name)
        for i, part in enumerate(parts):
            img = decode_image(part, name if len(parts) == 1 else f"{name}[{i}]")
            carry = _png_carry(part)
            if carry is not None and validate.carry_fits(carry, img.size):
                img.info[CARRY_KEY] = carry
            items.append((img, name))
    return items


def _png_carry(data: bytes) -> dict[str, torch.Tensor] | None:
    """The tensors of a PNG's CARRY_CHUNK (written before IDAT), or None if absent or damaged."""
    if not data.startswith(PNG_MAGIC):
        return None
    p = 8
    while p + 8 <= len(data):
        (length,) = struct.unpack(">I", data[p : p + 4])
        ctype = data[p + 4 : p + 8]
        if ctype == CARRY_CHUNK:
            try:
                return load_safetensors_bytes(data[p + 8 : p + 8 + length], "carry chunk")[0]
            except UserError:
                return None  # damaged: the pixels are all there is
        if ctype in (b"IDAT", b"IEND"):
            return None
        p += 12 + length
    return None


def carried(images: list[Image.Image], key: str) -> list[torch.Tensor] | None:
    """The tensor `key` carried by every image (see CARRY_CHUNK), or None if any image lacks it."""
    found = [img.info.get(CARRY_KEY, {}).get(key) for img in images]
    return None if any(t is None for t in found) else found


def exact_images_to_tensor(images: list[Image.Image]) -> tuple[torch.Tensor, bool]:
    """images_to_tensor, but with the carried float values where every image has them and they still
    round to its pixels (a PNG straight from `decode`): what the stage that wrote them computed.
    Returns the tensor and whether it is those exact values."""
    floats = carried(images, "image")
    if floats is not None and all(
        f.dtype == torch.float32 and tuple(f.shape) == (3, img.height, img.width) for f, img in zip(floats, images)
    ):
        x = torch.stack(floats)  # (B, 3, H, W)
        if all(np.array_equal(np.asarray(a), np.asarray(b.convert("RGB"))) for a, b in zip(tensor_to_images(x), images)):
            return x, True
    return images_to_tensor(images), False


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, as diffusers: round(clamp(x/2+0.5) * 255)."""
    x = (x.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1)
    arr = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size -> (B, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def png_bytes(img: Image.Image, carry: dict[str, torch.Tensor] | None = None) -> bytes:
    """PNG bytes, with the image's record (`img.info[RECORD_KEY]`, a readable tEXt chunk) and its carried
    tensors (`carry`, else `img.info[CARRY_KEY]`, in a CARRY_CHUNK) when it has them."""
    from PIL.PngImagePlugin import PngInfo

    buf = _io.BytesIO()
    info = PngInfo()
    if isinstance(img.info.get(RECORD_KEY), str):
        info.add_text(RECORD_KEY, img.info[RECORD_KEY])
    carry = carry if carry is not None else img.info.get(CARRY_KEY)
    if carry:
        info.add(CARRY_CHUNK, safetensors_bytes(carry, {"format": "unclip-carry"}))
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_images(images: list[Image.Image], output: str | None) -> list[str]:
    """One image -> output; several -> out-0.png, out-1.png...; stdout gets the PNGs back to back.

    Each PNG carries its image's record and carried tensors (see png_bytes). A batch is written all
    or nothing (see write_all).
    """
    if output is None:
        emit(b"".join(png_bytes(img) for img in images), None)
        return ["<stdout>"]
    if Path(output).suffix.lower() not in (".png", ""):
        raise UserError(f"{show(output)}: images are written as PNG; use a .png name")
    paths = [output] if len(images) == 1 else [numbered(output, i) for i in range(len(images))]
    check_output(output, len(paths))
    write_all([(path, png_bytes(img)) for path, img in zip(paths, images)])
    return paths
