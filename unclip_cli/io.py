"""The one place that knows files and pipes: stage files (safetensors / .npy), PNGs, stdin/stdout, weights.

Stage files are safetensors with named tensors and string metadata:
  format=unclip-stage, version, kind (text|image|latent), clip (CLIP identity), clip_dim,
  prompts (JSON list), seed, plus free-form fields. A bare .npy holds only the main tensor.
Every write goes to a temporary file in the target folder and is renamed into place, so a
failure never leaves a partial output.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from unclip_cli.errors import UserError

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
    path = Path(source)
    if not path.exists():
        raise UserError(f"{source}: no such file")
    if path.is_dir():
        raise UserError(f"{source}: is a folder, expected {what}")
    data = path.read_bytes()
    if not data:
        raise UserError(f"{source}: empty file")
    return data, source


def stdout_target(output: str | None) -> str | None:
    """Where a result goes: a path, or None for stdout. Refuses to write binary to a terminal."""
    if output is not None and output != "-":
        return output
    if output is None and sys.stdout.isatty():
        raise UserError("refusing to write binary data to a terminal: use -o FILE or pipe into a file or stage")
    return None


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temporary file in the same folder (with the usual
    0o666 & ~umask permissions), renamed to `path` when the block ends, removed if it fails."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write bytes to path via a temporary file in the same folder and a rename."""
    with atomic_file(path) as f:
        f.write(data)


@contextlib.contextmanager
def new_folder(out: str | Path, refusal: str = "exists and is not an empty folder") -> Iterator[Path]:
    """A folder to build `out` in: a temporary one beside it, renamed to `out` when the block ends and
    removed if it fails, so that nothing half-written is ever left at `out`. `out` must not exist, or be
    an empty folder (else a UserError: "OUT: " + refusal), and its parent must exist."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: {refusal}")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"{parent}: folder does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(path: str | Path, what: str = "JSON file") -> dict:
    """The JSON object in file `path`; a one-line UserError ("PATH: damaged WHAT (...)") if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged {what} (not valid JSON: {e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: damaged {what} (not a JSON object)")
    return data


def emit(data: bytes, output: str | None) -> None:
    """Send bytes to `output` (path) or stdout (None)."""
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        atomic_write(output, data)


# --------------------------------------------------------------------------- safetensors


def _safetensors_header(data: bytes, name: str) -> dict:
    if len(data) < 8:
        raise UserError(f"{name}: truncated file (not a safetensors or .npy file)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100_000_000:
        raise UserError(f"{name}: not a safetensors or .npy file (or truncated)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{name}: not a safetensors or .npy file (bad header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{name}: not a safetensors file (bad header)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > len(data):
        raise UserError(f"{name}: truncated safetensors file")
    return header


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, metadata) without reading the tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise UserError(f"{path}: not a safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (bad header)")
    return header


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


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights safely: safetensors, else torch.load(weights_only=True). Never unpickles arbitrary data."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file missing")
    if path.suffix == ".safetensors":
        tensors, _ = load_safetensors_bytes(path.read_bytes(), str(path))
        return tensors
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot load weights ({type(e).__name__}: {e})".splitlines()[0]) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state dict")
    return state


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
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{name}: tensor {key} contains NaN or infinity")
    if kind == "latent":  # (z_i, x_T): x_T is one (C, H, W) noise image per embedding
        noise = tensors.get("noise")
        if noise is None or noise.ndim != 4 or noise.shape[0] != tensors["image_embed"].shape[0]:
            raise UserError(f"{name}: latent file without a (B, C, H, W) noise tensor matching its image_embed")
    return StageFile(kind=kind, tensors=tensors, meta=meta)


def _read_npy(data: bytes, name: str) -> StageFile:
    try:
        arr = np.load(_io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise UserError(f"{name}: damaged .npy file ({str(e).splitlines()[0]})") from None
    if arr.dtype.kind not in "fiu":
        raise UserError(f"{name}: .npy of dtype {arr.dtype}, expected floats")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"{name}: .npy of shape {tuple(arr.shape)}, expected (D,) or (B, D)")
    if not np.isfinite(arr).all():
        raise UserError(f"{name}: .npy contains NaN or infinity")
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
    try:
        img = Image.open(_io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
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
            if carry is not None:
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


def numbered(output: str, i: int) -> str:
    """out.png -> out-0.png (batch outputs)."""
    p = Path(output)
    return str(p.with_name(f"{p.stem}-{i}{p.suffix}"))


def write_images(images: list[Image.Image], output: str | None) -> list[str]:
    """One image -> output; several -> out-0.png, out-1.png...; stdout gets the PNGs back to back.

    Each PNG carries its image's record and carried tensors (see png_bytes). All of a batch is
    encoded before the first file is written.
    """
    if output is None:
        emit(b"".join(png_bytes(img) for img in images), None)
        return ["<stdout>"]
    if Path(output).suffix.lower() not in (".png", ""):
        raise UserError(f"{output}: images are written as PNG; use a .png name")
    paths = [output] if len(images) == 1 else [numbered(output, i) for i in range(len(images))]
    blobs = [png_bytes(img) for img in images]
    for blob, path in zip(blobs, paths):
        emit(blob, path)
    return paths
