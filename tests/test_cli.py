"""The stage commands at the CLI boundary, on a tiny random model set."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load as load_st

from conftest import png_size, write_png


def ok(run):
    assert run.code == 0, run
    return run


def user_error(run, mentions: str) -> str:
    """A user error: exit status 1 and one stderr line that mentions `mentions`; returns the line."""
    assert run.code == 1, run
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("unclip: error:") and mentions in lines[0], run.err
    return lines[0]


def assert_user_error(run, *, mentions: str | None = None):
    assert run.code != 0, run
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    assert len(lines) == 1, run.err
    assert "Traceback" not in run.err
    assert lines[0].startswith("unclip: error:"), run.err
    if mentions:
        assert mentions in lines[0], lines[0]
    assert run.exception is None or isinstance(run.exception, SystemExit), run.exception


# ---------------------------------------------------------------------- the pipeline


def test_full_pipe_gives_1024_png(cli, tiny_set):
    m = ["--model", tiny_set]
    text = ok(cli("encode-text", "a red circle", *m)).out
    emb = ok(cli("prior", *m, "--seed", "1", "-q", stdin=text)).out
    small = ok(cli("decode", *m, "--seed", "1", "-q", stdin=emb)).out
    assert png_size(small) == (64, 64)
    mid = ok(cli("upsample", *m, "--seed", "1", "-q", stdin=small)).out
    assert png_size(mid) == (256, 256)
    big = ok(cli("upsample", *m, "--seed", "1", "-q", stdin=mid)).out
    assert png_size(big) == (1024, 1024)


def test_prior_output_carries_text_and_metadata(cli, tiny_set):
    m = ["--model", tiny_set]
    text = ok(cli("encode-text", "a blue star", "a green ring", *m)).out
    tensors = load_st(text)
    assert tensors["text_embed"].shape[0] == 2 and tensors["text_mask"].dtype.is_floating_point is False
    emb = ok(cli("prior", *m, "--seed", "3", "--steps", "3", "-q", stdin=text)).out
    t2 = load_st(emb)
    assert set(t2) == {"image_embed", "text_embed", "text_hidden", "text_mask"}
    assert t2["image_embed"].shape == (2, 32)
    from unclip_cli.io import _safetensors_header

    meta = _safetensors_header(emb, "x")["__metadata__"]
    assert json.loads(meta["prompts"]) == ["a blue star", "a green ring"]
    assert meta["prior_seed"] == "3" and meta["kind"] == "image" and json.loads(meta["stages"]) == ["encode-text", "prior"]


def test_encode_text_reads_lines_from_stdin(cli, tiny_set):
    out = ok(cli("encode-text", "--model", tiny_set, stdin=b"first prompt\n\nsecond prompt\n")).out
    assert load_st(out)["text_embed"].shape[0] == 2


def test_decode_bare_npy_single_and_batch(cli, tiny_set, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "one.npy", rng.standard_normal(32).astype(np.float32))
    np.save(tmp_path / "two.npy", rng.standard_normal((2, 32)).astype(np.float32))
    ok(cli("decode", tmp_path / "one.npy", "-o", tmp_path / "out.png", "--model", tiny_set, "-q", "--steps", "3"))
    assert png_size((tmp_path / "out.png").read_bytes()) == (64, 64)
    ok(cli("decode", tmp_path / "two.npy", "-o", tmp_path / "b.png", "--model", tiny_set, "-q", "--steps", "3"))
    assert (tmp_path / "b-0.png").exists() and (tmp_path / "b-1.png").exists()
    assert not (tmp_path / "b.png").exists()


def test_npy_output_and_roundtrip(cli, tiny_set, tmp_path):
    m = ["--model", tiny_set]
    text = ok(cli("encode-text", "a square", *m)).out
    ok(cli("prior", *m, "--seed", "0", "--steps", "3", "-q", "-o", tmp_path / "e.npy", stdin=text))
    arr = np.load(tmp_path / "e.npy")
    assert arr.shape == (1, 32) and arr.dtype == np.float32
    emb = ok(cli("prior", *m, "--seed", "0", "--steps", "3", "-q", stdin=text)).out
    np.testing.assert_array_equal(arr, load_st(emb)["image_embed"].numpy())


def test_interpolate_strip_gif_and_frames(cli, tiny_set, tmp_path):
    a = write_png(tmp_path / "a.png", (80, 60), (220, 40, 40))
    b = write_png(tmp_path / "b.png", (64, 64), (40, 90, 220))
    m = ["--model", tiny_set, "-q", "--steps", "3", "--seed", "0"]
    ok(cli("interpolate", a, b, "-n", "5", "-o", tmp_path / "strip.png", *m))
    assert png_size((tmp_path / "strip.png").read_bytes()) == (5 * 64, 64)
    ok(cli("interpolate", a, b, "-n", "3", "-o", tmp_path / "anim.gif", *m))
    from PIL import Image

    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    ok(cli("interpolate", a, b, "-n", "3", "-o", f"{tmp_path}/frames/", *m))
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"frame-00{i}.png" for i in range(3)]


def test_interpolate_accepts_embedding_files(cli, tiny_set, tmp_path):
    m = ["--model", tiny_set]
    a = write_png(tmp_path / "a.png", (64, 64))
    ok(cli("encode-image", a, *m, "-o", tmp_path / "a.safetensors"))
    np.save(tmp_path / "b.npy", np.random.default_rng(1).standard_normal(32).astype(np.float32))
    ok(cli("interpolate", tmp_path / "a.safetensors", tmp_path / "b.npy", "-n", "2", "-o", tmp_path / "s.png",
           *m, "-q", "--steps", "3", "--seed", "0"))
    assert png_size((tmp_path / "s.png").read_bytes()) == (128, 64)


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_generate_sizes(cli, tiny_set, tmp_path, size):
    out = tmp_path / "g.png"
    ok(cli("generate", "a yellow star", "--size", size, "--model", tiny_set, "--seed", "5", "-q", "-o", out))
    assert png_size(out.read_bytes()) == (size, size)


def test_generate_same_seed_same_bytes_other_seed_differs(cli, tiny_set):
    args = ["generate", "a purple cross", "--size", "64", "--model", tiny_set, "-q"]
    a = ok(cli(*args, "--seed", "7")).out
    b = ok(cli(*args, "--seed", "7")).out
    c = ok(cli(*args, "--seed", "8")).out
    assert a == b
    assert a != c


def test_stages_equal_generate_for_same_seed_per_stage_noise(cli, tiny_set):
    """Each stage alone is deterministic in its seed too."""
    m = ["--model", tiny_set, "-q"]
    text = ok(cli("encode-text", "a ring", *m[:2])).out
    e1 = ok(cli("prior", *m, "--seed", "4", stdin=text)).out
    e2 = ok(cli("prior", *m, "--seed", "4", stdin=text)).out
    assert load_st(e1)["image_embed"].equal(load_st(e2)["image_embed"])
    d1 = ok(cli("decode", *m, "--seed", "4", stdin=e1)).out
    d2 = ok(cli("decode", *m, "--seed", "4", stdin=e1)).out
    d3 = ok(cli("decode", *m, "--seed", "5", stdin=e1)).out
    assert d1 == d2 and d1 != d3


def test_batch_to_stdout_is_concatenated_pngs_that_upsample_reads(cli, tiny_set):
    m = ["--model", tiny_set, "-q", "--seed", "0"]
    text = ok(cli("encode-text", "a", "b", *m[:2])).out
    emb = ok(cli("prior", *m, "--steps", "3", stdin=text)).out
    pngs = ok(cli("decode", *m, "--steps", "3", stdin=emb)).out
    from unclip_cli.io import split_pngs

    assert len(split_pngs(pngs, "x")) == 2
    up = ok(cli("upsample", *m, "--steps", "2", stdin=pngs)).out
    parts = split_pngs(up, "x")
    assert [png_size(p) for p in parts] == [(256, 256), (256, 256)]


def test_slerp_endpoints(cli, tmp_path):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((1, 32)).astype(np.float32), rng.standard_normal((1, 32)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    for t, want in ((0, a), (1, b)):
        ok(cli("slerp", tmp_path / "a.npy", tmp_path / "b.npy", "-t", t, "-o", tmp_path / "s.npy"))
        np.testing.assert_allclose(np.load(tmp_path / "s.npy"), want, rtol=0, atol=1e-6)
    mid = ok(cli("slerp", tmp_path / "a.npy", tmp_path / "b.npy", "-t", "0.5")).out
    m = load_st(mid)["image_embed"].numpy()
    assert not np.allclose(m, (a + b) / 2, atol=1e-3)  # a slerp, not a lerp


def test_info_on_stage_file_and_model_set(cli, tiny_set, tmp_path):
    text = ok(cli("encode-text", "hello", "--model", tiny_set, "-o", tmp_path / "t.safetensors"))
    out = ok(cli("info", tmp_path / "t.safetensors")).out.decode()
    assert "text stage file" in out and "hello" in out and "text_hidden" in out
    out = ok(cli("info", tiny_set)).out.decode()
    for component in ("prior", "decoder", "upsampler-256", "upsampler-1024"):
        assert component in out
    assert text.code == 0


def test_model_env_var(cli, tiny_set):
    run = cli("encode-text", "x", env={"UNCLIP_MODEL": str(tiny_set)})
    ok(run)
    assert load_st(run.out)["text_embed"].shape == (1, 32)


# ---------------------------------------------------------------------- bad input


def test_garbage_and_truncated_files(cli, tiny_set, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a tensor file at all")
    assert_user_error(cli("decode", tmp_path / "junk.safetensors", "-o", tmp_path / "o.png", "--model", tiny_set))
    text = ok(cli("encode-text", "a", "--model", tiny_set)).out
    (tmp_path / "cut.safetensors").write_bytes(text[: len(text) // 2])
    assert_user_error(cli("prior", tmp_path / "cut.safetensors", "-o", tmp_path / "o.st", "--model", tiny_set), mentions="truncated")
    np.save(tmp_path / "ok.npy", np.zeros(32, np.float32))
    raw = (tmp_path / "ok.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[: len(raw) - 40])
    assert_user_error(cli("decode", tmp_path / "cut.npy", "-o", tmp_path / "o.png", "--model", tiny_set))
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "o.st").exists()
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no temporary leftovers


def test_wrong_dimension_and_nan(cli, tiny_set, tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros(33, np.float32))
    assert_user_error(cli("decode", tmp_path / "wide.npy", "-o", tmp_path / "o.png", "--model", tiny_set), mentions="dimension")
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 32), np.float32))
    assert_user_error(cli("decode", tmp_path / "cube.npy", "-o", tmp_path / "o.png", "--model", tiny_set), mentions="shape")
    bad = np.zeros(32, np.float32)
    bad[3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert_user_error(cli("decode", tmp_path / "nan.npy", "-o", tmp_path / "o.png", "--model", tiny_set), mentions="NaN")
    assert not (tmp_path / "o.png").exists()


def test_empty_stdin(cli, tiny_set):
    assert_user_error(cli("prior", "--model", tiny_set, stdin=b""), mentions="empty stdin")
    assert_user_error(cli("decode", "--model", tiny_set, stdin=b""), mentions="empty stdin")
    assert_user_error(cli("encode-text", "--model", tiny_set, stdin=b"\n\n"), mentions="empty stdin")


def test_upsample_refuses_odd_size(cli, tiny_set, tmp_path):
    img = write_png(tmp_path / "odd.png", (100, 37))
    assert_user_error(cli("upsample", img, "-o", tmp_path / "o.png", "--model", tiny_set), mentions="100x37")
    assert not (tmp_path / "o.png").exists()


def test_missing_component(cli, tiny_set, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(tiny_set, partial)
    manifest = json.loads((partial / "model.json").read_text())
    manifest["components"].remove("upsampler-1024")
    (partial / "model.json").write_text(json.dumps(manifest))
    shutil.rmtree(partial / "upsampler-1024")
    img = write_png(tmp_path / "mid.png", (256, 256))
    assert_user_error(cli("upsample", img, "-o", tmp_path / "o.png", "--model", partial), mentions="upsampler-1024")
    assert_user_error(cli("generate", "x", "--size", "1024", "-o", tmp_path / "o.png", "--model", partial),
                      mentions="upsampler-1024")
    assert not (tmp_path / "o.png").exists()


def test_mismatched_clip(cli, tiny_set, other_set, tmp_path):
    text = ok(cli("encode-text", "a", "--model", other_set)).out
    assert_user_error(cli("prior", "--model", tiny_set, "-o", tmp_path / "o.st", stdin=text), mentions="CLIP")
    assert not (tmp_path / "o.st").exists()


def test_wrong_kinds(cli, tiny_set, tmp_path):
    text = ok(cli("encode-text", "a", "--model", tiny_set)).out
    assert_user_error(cli("decode", "--model", tiny_set, stdin=text), mentions="prior")
    img = write_png(tmp_path / "i.png", (64, 64))
    assert_user_error(cli("prior", img, "--model", tiny_set), mentions="image")
    (tmp_path / "t.txt").write_text("hello")
    assert_user_error(cli("upsample", tmp_path / "t.txt", "--model", tiny_set), mentions="image")
    assert_user_error(cli("decode", tmp_path / "nope.npy", "--model", tiny_set), mentions="no such file")


def test_no_model_set(cli, tmp_path):
    assert_user_error(cli("encode-text", "x", "--model", tmp_path / "missing"), mentions="not found")
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("encode-text", "x", "--model", tmp_path / "empty"), mentions="not a model set")


def test_damaged_component_weights(cli, tiny_set, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_set, broken)
    w = broken / "prior" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    text = ok(cli("encode-text", "a", "--model", broken)).out
    assert_user_error(cli("prior", "--model", broken, stdin=text), mentions="prior")


def test_model_init_refuses_nonempty(cli, tiny_set):
    assert_user_error(cli("model", "init", "-o", tiny_set), mentions="not empty")


def test_presets_pick_their_clip_image_size(cli, tiny_set, tmp_path):
    """The small preset's CLIP sees 64 px images (shapes are a few pixels wide at 32), the tiny one's 32."""
    ok(cli("model", "init", "--preset", "small", "-o", tmp_path / "small"))
    for folder, size in ((tmp_path / "small", 64), (tiny_set, 32)):
        assert json.loads((folder / "model.json").read_text())["clip"]["image_size"] == size
        cfg = json.loads((folder / "clip" / "open_clip_config.json").read_text())["model_cfg"]
        assert cfg["vision_cfg"]["image_size"] == size and cfg["embed_dim"] == 32


# ---------------------------------------------------------------------- real processes and pipes


def test_shell_pipe_and_terminal_refusal(tiny_set, tmp_path):
    env = {**os.environ, "UNCLIP_MODEL": str(tiny_set)}
    exe = f"{sys.executable} -m unclip_cli"
    cmd = (
        f"{exe} encode-text 'a red circle' | {exe} prior -q --seed 1 --steps 3 | "
        f"{exe} decode -q --seed 1 --steps 3 > {tmp_path}/out.png"
    )
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert png_size((tmp_path / "out.png").read_bytes()) == (64, 64)
    bad = subprocess.run([sys.executable, "-m", "unclip_cli", "decode", str(tmp_path / "out.png")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_generate_does_not_import_open_clip(tiny_set, tmp_path):
    """Text-only commands run CLIP's text tower without open_clip (whose import, with torchvision's,
    is most of `generate --size 64`'s start-up) and without torch._dynamo (~2 s more, pulled in by
    random init on the meta device); nor does encode-image, whose plain ViT is built here too
    (tests/test_startup.py has the other commands)."""
    heavy = ("open_clip", "torchvision", "transformers", "diffusers", "torch._dynamo")
    probe = (
        "import sys\n"
        "from unclip_cli.cli import app\n"
        "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"import json; print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)\n"
    )
    env = {**os.environ, "UNCLIP_MODEL": str(tiny_set)}
    for args, loaded in (
        (["generate", "a red circle", "-q", "--decoder-steps", "2", "--prior-steps", "2", "-o", str(tmp_path / "g.png")], []),
        (["encode-image", write_png(tmp_path / "in.png", (40, 40)).as_posix(), "-o", str(tmp_path / "e.npy")],
         []),
    ):
        proc = subprocess.run([sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        imported = json.loads(proc.stderr.strip().splitlines()[-1])
        assert [m for m in imported if m in ("open_clip", "torch._dynamo", "torchvision")] == loaded, imported


def test_binary_output_refuses_a_terminal(monkeypatch):
    from unclip_cli import io as uio
    from unclip_cli.errors import UserError

    class Tty:
        def isatty(self):
            return True

    monkeypatch.setattr(uio.sys, "stdout", Tty())
    with pytest.raises(UserError, match="terminal"):
        uio.stdout_target(None)
    assert uio.stdout_target("x.png") == "x.png"


def test_info_writes_to_file(cli, tiny_set, tmp_path):
    ok(cli("info", tiny_set, "-o", tmp_path / "info.txt"))
    assert "upsampler-256" in (tmp_path / "info.txt").read_text()
