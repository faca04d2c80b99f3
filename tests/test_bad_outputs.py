"""Outputs that cannot be written, and the error boundary, through the real CLI: every failure is one
line on stderr with its exit status, refused before the work where it can be, and leaves nothing behind."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import types

import pytest
from PIL import Image

from test_cli import assert_user_error
from unclip_cli import outputs
from unclip_cli.pipeline import Pipeline


def _not_run(*args, **kwargs):
    raise AssertionError("the work started although the output cannot be written")


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody may write in: chmod 0o555, or, as root (who may), a read-only tmpfs mounted on it."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        yield folder
        return
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(folder)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"running as root makes a 0o555 folder writable, and no read-only tmpfs: {mount.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


# (case, output path under tmp_path, words the error line must hold)
CASES = [
    ("an existing folder", lambda t, ro: t, "is a folder"),
    ("a missing parent folder", lambda t, ro: t / "missing" / "x.png", "does not exist"),
    ("a read-only folder", lambda t, ro: ro() / "x.png", "not writable"),
    ("a name too long", lambda t, ro: t / ("x" * 300 + ".png"), "too long"),
    ("a path with a newline", lambda t, ro: t / "a\nb" / "x.png", "a\\nb"),
]


@pytest.mark.parametrize("case,make,mentions", CASES, ids=[c[0] for c in CASES])
def test_unwritable_output_is_refused_before_the_work(cli, tiny_set, tmp_path, monkeypatch, request, case, make, mentions):
    monkeypatch.setattr(Pipeline, "generate", _not_run)
    out = make(tmp_path, lambda: request.getfixturevalue("read_only"))
    run = cli("generate", "a red circle", "-q", "-m", tiny_set, "-o", out)
    assert_user_error(run, mentions=mentions)
    assert run.code == 1


def test_terminal_is_refused_for_dash_as_for_no_output(cli, tiny_set, monkeypatch):
    tty = types.SimpleNamespace(stdout=types.SimpleNamespace(isatty=lambda: True))
    monkeypatch.setattr(outputs, "sys", tty)
    monkeypatch.setattr(Pipeline, "encode_text", _not_run)
    for args in (["-o", "-"], []):
        assert_user_error(cli("encode-text", "a red circle", "-m", tiny_set, *args), mentions="terminal")


def _two_images(self, prompts, **kwargs):
    return [Image.new("RGB", (64, 64), (i * 90, 0, 0)) for i in range(2)]


def test_batch_with_an_unwritable_member_writes_nothing(cli, tiny_set, tmp_path, monkeypatch):
    (tmp_path / "out-1.png").mkdir()
    monkeypatch.setattr(Pipeline, "generate", _not_run)
    run = cli("generate", "a", "b", "-q", "-m", tiny_set, "-o", tmp_path / "out.png")
    assert_user_error(run, mentions="out-1.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-1.png"]


def _fail_rename(monkeypatch, nth: int, code: int) -> None:
    """The nth rename into place fails with OSError `code` (a disk filling up, a permission lost)."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == nth:
            raise OSError(code, os.strerror(code))
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)


def test_batch_failing_at_its_second_rename_leaves_nothing(cli, tiny_set, tmp_path, monkeypatch):
    monkeypatch.setattr(Pipeline, "generate", _two_images)
    _fail_rename(monkeypatch, 2, errno.ENOSPC)
    run = cli("generate", "a", "b", "-q", "-m", tiny_set, "-o", tmp_path / "out.png")
    assert_user_error(run, mentions="no space left on device")
    assert list(tmp_path.iterdir()) == []


def test_frames_folder_is_all_or_nothing(tmp_path, monkeypatch):
    _fail_rename(monkeypatch, 3, errno.EACCES)
    with pytest.raises(outputs.UserError, match="permission denied"):
        outputs.write_folder(tmp_path / "frames", {f"frame-{i:03d}.png": b"x" for i in range(4)})
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_line_and_leaves_no_temporary_file(cli, tiny_set, tmp_path, monkeypatch):
    disk = tmp_path / "small"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mount.stderr.strip()}")
    try:
        noise = Image.frombytes("RGB", (1024, 1024), os.urandom(1024 * 1024 * 3))
        monkeypatch.setattr(Pipeline, "generate", lambda self, prompts, **kw: [noise])
        run = cli("generate", "a red circle", "-q", "--size", "1024", "-m", tiny_set, "-o", disk / "big.png")
        assert_user_error(run, mentions="no space left on device")
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_new_folder_in_a_read_only_folder_is_one_line(read_only):
    parent = read_only
    with pytest.raises(outputs.UserError, match="cannot write"):
        with outputs.new_folder(parent / "set"):
            raise AssertionError("the block ran although the folder cannot be made")


# ---------------------------------------------------------------------- the error boundary


def _boom(*args, **kwargs):
    raise RuntimeError("boom\nsecond line")


def test_internal_error_is_one_line_and_exit_3(cli, tiny_set, monkeypatch):
    monkeypatch.setattr(Pipeline, "encode_text", _boom)
    run = cli("encode-text", "a red circle", "-m", tiny_set, "-o", "-")
    assert run.code == 3, run
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    assert lines == ["unclip: internal error: RuntimeError: boom (set UNCLIP_DEBUG=1 for the traceback)"], run.err
    debug = cli("encode-text", "a red circle", "-m", tiny_set, "-o", "-", env={"UNCLIP_DEBUG": "1"})
    assert debug.code == 3 and "Traceback" in debug.err and "RuntimeError: boom" in debug.err, debug


def test_memory_error_is_a_user_error_with_a_hint(cli, tiny_set, monkeypatch):
    monkeypatch.setattr(Pipeline, "encode_text", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    assert_user_error(cli("encode-text", "a red circle", "-m", tiny_set, "-o", "-"), mentions="out of memory")


def test_usage_error_keeps_exit_2(cli):
    run = cli("generate", "--no-such-option")
    assert run.code == 2, run


def test_user_error_message_with_a_newline_stays_one_line(cli, tmp_path):
    run = cli("decode", str(tmp_path / "no\nsuch.st"))
    assert_user_error(run)


def test_closed_stdout_exits_quietly(tiny_set):
    env = {**os.environ, "UNCLIP_MODEL": str(tiny_set)}
    proc = subprocess.Popen([sys.executable, "-m", "unclip_cli", "encode-text", "a red circle"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader has gone before anything is written (as `| head -c0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) in (0, 141), err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_eval_save_is_checked_before_the_work_and_all_or_nothing(cli, tiny_set, tmp_path, monkeypatch):
    from unclip_cli.evaluate import report as report_mod

    monkeypatch.setattr(report_mod, "run_eval", _not_run)
    (tmp_path / "file").write_bytes(b"x")
    assert_user_error(cli("eval", "-m", tiny_set, "-n", "1", "-q", "--save", tmp_path / "file"), mentions="not a folder")
    assert_user_error(cli("eval", "-m", tiny_set, "-n", "1", "-q", "--save", tmp_path / "no" / "pics"), mentions="does not exist")
    monkeypatch.undo()

    def fail_late(pipe, judge, *, on_batch, **kwargs):  # one batch saved, then the run fails
        import torch

        on_batch(0, torch.zeros(2, 3, 64, 64), [None, None])
        raise MemoryError

    monkeypatch.setattr(report_mod, "run_eval", fail_late)
    run = cli("eval", "-m", tiny_set, "-n", "4", "-q", "--save", tmp_path / "pics")
    assert run.code == 1 and not (tmp_path / "pics").exists()


def test_info_output_is_checked_before_reading(cli, tmp_path):
    run = cli("info", tmp_path / "missing.npy", "-o", tmp_path)
    assert_user_error(run, mentions="is a folder")


def test_input_path_with_control_characters_is_quoted_in_its_message(cli, tiny_set, tmp_path):
    bad = tmp_path / "a\nb.safetensors"
    bad.write_bytes(b"not a stage file at all")
    run = cli("decode", bad, "-m", tiny_set, "-q", "-o", tmp_path / "x.png")
    assert_user_error(run, mentions="a\\nb.safetensors")
    assert not (tmp_path / "x.png").exists()


def test_an_unreadable_image_message_names_no_memory_address(cli, tiny_set, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a" + b"\x00" * 20)  # looks like an image to the readers, is none
    run = cli("encode-image", bad, "-m", tiny_set, "-o", tmp_path / "e.npy")
    assert_user_error(run, mentions="bad.png: not a readable image")
    assert "0x" not in run.err and "BytesIO" not in run.err
