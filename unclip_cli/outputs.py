"""Writing outputs so that nothing corrupt is ever left: every file goes to a temporary name beside
its target and is renamed into place when complete (a batch: all renamed only once all are written);
an OS error (permission denied, read-only or full disk, a name too long, a folder in the way) is one
UserError line naming the path. Paths with control characters are quoted in messages (see show).
Re-exported by io.py, where callers look for files and pipes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from unclip_cli.errors import UserError


def show(path: str | Path) -> str:
    """A path as messages print it: as is, or quoted with escapes when it holds control characters
    (a newline, an escape, a tab), so that a message stays one harmless line."""
    s = str(path)
    return repr(s) if any(ord(c) < 32 or ord(c) == 127 for c in s) else s


def _cannot_write(path: str | Path, e: OSError) -> UserError:
    """An OS error while writing `path` (permission, read-only or full disk, name too long...) as one line."""
    reason = (e.strerror or type(e).__name__).lower()
    return UserError(f"{show(path)}: cannot write ({reason})")


def check_output(path: str | Path, count: int = 1) -> None:
    """Refuse, before any work, an output that cannot be written: a folder, a missing or read-only
    folder, a name too long. `count` > 1: the batch's numbered names (see numbered)."""
    path = Path(path)
    folder = path.parent
    names = [path] if count == 1 else [Path(numbered(str(path), i)) for i in range(count)]
    if max(len(p.name.encode()) for p in names) > 255:  # NAME_MAX of the usual file systems
        raise UserError(f"{show(path)}: cannot write (file name too long)")
    try:
        for p in names:
            if p.is_dir():
                raise UserError(f"{show(p)}: is a folder, expected a file name")
        if not folder.is_dir():
            raise UserError(f"{show(path)}: folder {show(folder)} does not exist")
    except OSError as e:
        raise _cannot_write(path, e) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{show(path)}: cannot write (folder {show(folder)} is not writable)")


def check_output_folder(folder: str | Path) -> None:
    """Refuse, before any work, a folder that write_folder could not fill: a file of that name, a
    missing parent, or a folder (or parent, when it is to be made) that is not writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{show(folder)}: exists and is not a folder")
    where = folder if folder.is_dir() else folder.parent
    if not where.is_dir():
        raise UserError(f"{show(folder)}: folder {show(where)} does not exist")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UserError(f"{show(folder)}: cannot write (folder {show(where)} is not writable)")


def stdout_target(output: str | None, count: int = 1) -> str | None:
    """Where a result goes: a path (checked with check_output, for `count` files), or None for stdout
    ('-' or no -o). Refuses to write binary to a terminal."""
    if output is not None and output != "-":
        check_output(output, count)
        return output
    if sys.stdout.isatty():
        raise UserError("refusing to write binary data to a terminal: use -o FILE or pipe into a file or stage")
    return None


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in `path`'s folder with the usual 0o666 & ~umask permissions: (fd, name)."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{show(path)}: folder {show(folder)} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise _cannot_write(path, e) from None
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    return fd, tmp


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temporary file in the same folder, renamed to `path`
    when the block ends, removed if it fails; an OS error is a one-line UserError naming `path`."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from None
        raise


def write_all(files: list[tuple[str | Path, bytes]]) -> None:
    """Write several files all or nothing: each to a temporary name beside it, then all renamed into
    place; on any failure the temporary files and those already renamed are removed."""
    done: list[tuple[Path, Path]] = []  # (what to remove on failure, target)
    current = Path(files[0][0]) if files else Path(".")
    try:
        for path, data in files:
            current = Path(path)
            fd, tmp = _temp_beside(current)
            done.append((Path(tmp), current))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for i, (tmp, path) in enumerate(done):
            current = path
            os.replace(tmp, path)
            done[i] = (path, path)
    except BaseException as e:
        for tmp, _ in done:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _cannot_write(current, e) from None
        raise


def write_folder(folder: str | Path, files: dict[str, bytes]) -> None:
    """Files (name -> bytes) into `folder`, made if missing (its parent must exist), all or nothing:
    see write_all; a folder made here is removed again on failure."""
    folder = Path(folder)
    made = not folder.exists()
    if not made and not folder.is_dir():
        raise UserError(f"{show(folder)}: exists and is not a folder")
    if made:
        if not folder.parent.is_dir():
            raise UserError(f"{show(folder)}: folder {show(folder.parent)} does not exist")
        try:
            folder.mkdir()
        except OSError as e:
            raise _cannot_write(folder, e) from None
    try:
        write_all([(folder / name, data) for name, data in files.items()])
    except BaseException:
        if made:
            shutil.rmtree(folder, ignore_errors=True)
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
        raise UserError(f"{show(out)}: {refusal}")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"{show(parent)}: folder does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:200]}.", dir=parent))
    except OSError as e:
        raise _cannot_write(out, e) from None
    try:
        yield tmp
        try:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except OSError as e:
            raise _cannot_write(out, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def emit(data: bytes, output: str | None) -> None:
    """Send bytes to `output` (path) or stdout (None)."""
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        atomic_write(output, data)


def numbered(output: str, i: int) -> str:
    """out.png -> out-0.png (batch outputs)."""
    p = Path(output)
    return str(p.with_name(f"{p.stem}-{i}{p.suffix}"))
