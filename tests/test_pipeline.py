"""The Python API (unclip_cli.Pipeline) against the CLI, the records results carry, and `info --command`."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def ok(run):
    assert run.code == 0, run
    return run


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_api_generate_gives_the_cli_bytes(cli, tiny_set, tmp_path):
    from unclip_cli import Pipeline
    from unclip_cli.io import png_bytes

    images = Pipeline.load(tiny_set).generate(["a red circle"], size=64, seed=3)
    ok(cli("generate", "a red circle", "--model", tiny_set, "--size", "64", "--seed", "3", "-q", "-o", tmp_path / "cli.png"))
    cli_bytes = (tmp_path / "cli.png").read_bytes()
    assert len(images) == 1 and images[0].size == (64, 64)
    assert np.array_equal(np.asarray(images[0]), pixels(cli_bytes))
    assert png_bytes(images[0]) == cli_bytes  # the record too
    other = Pipeline.load(tiny_set).generate(["a red circle"], size=64, seed=4)
    assert not np.array_equal(np.asarray(other[0]), np.asarray(images[0]))


def test_api_stages_give_the_cli_stages(cli, tiny_set, tmp_path):
    """encode_text -> prior -> decode -> upsample through the API is the CLI's pipe, byte for byte."""
    import torch

    from unclip_cli import Pipeline, load_stage, save_stage
    from unclip_cli.io import parse_stage, png_bytes

    m = ["--model", tiny_set]
    text = ok(cli("encode-text", "a blue star", "a ring", *m)).out
    emb = ok(cli("prior", *m, "--seed", "2", "-q", stdin=text)).out
    small = ok(cli("decode", *m, "--seed", "5", "-q", stdin=emb)).out
    mid = ok(cli("upsample", *m, "-q", stdin=small)).out

    pipe = Pipeline.load(tiny_set)
    stage = pipe.prior(pipe.encode_text(["a blue star", "a ring"]), seed=2)
    save_stage(stage, tmp_path / "emb.safetensors")
    mine, theirs = load_stage(tmp_path / "emb.safetensors"), parse_stage(emb, "cli")  # (metadata order varies: compare contents)
    assert mine.meta == theirs.meta and set(mine.tensors) == set(theirs.tensors)
    assert all(torch.equal(mine.tensors[k], theirs.tensors[k]) for k in mine.tensors)
    images = pipe.decode(stage, seed=5)
    assert b"".join(png_bytes(img) for img in images) == small
    assert b"".join(png_bytes(img) for img in pipe.upsample(images)) == mid


def test_decode_takes_a_numpy_edit(tiny_set):
    from unclip_cli import Pipeline

    pipe = Pipeline.load(tiny_set)
    embed = pipe.prior(["a red circle"], seed=1).tensors["image_embed"].numpy()
    a = pipe.decode(embed, seed=0, steps=3)
    b = pipe.decode(embed * 1.5, seed=0, steps=3)
    assert a[0].size == (64, 64) and not np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_eval_makes_the_images_generate_makes(cli, tiny_set, tmp_path):
    from unclip_cli.evaluate.report import eval_scenes

    prompts = [s.caption for s in eval_scenes(3, 5)]
    ok(cli("eval", "--model", tiny_set, "--count", "3", "--batch-size", "3", "--seed", "5", "--save", tmp_path / "ev", "-q"))
    ok(cli("generate", *prompts, "--model", tiny_set, "--size", "64", "--seed", "5", "-q", "-o", tmp_path / "g.png"))
    for i in range(3):
        a, b = pixels((tmp_path / "ev" / f"{i:03d}.png").read_bytes()), pixels((tmp_path / f"g-{i}.png").read_bytes())
        assert np.array_equal(a, b), i


def test_generate_records_how_it_was_made(cli, tiny_set, tmp_path):
    run = ok(cli("generate", "a red circle", "a blue ring", "--model", tiny_set, "--size", "256", "-q", "-o", tmp_path / "x.png",
                 "--prior-guidance", "3"))
    seed = int(re.search(r"seed (\d+)", run.err).group(1))  # no --seed: the drawn one is said
    record = json.loads(Image.open(tmp_path / "x-1.png").info["unclip"])
    assert record["seed"] == seed and record["prompts"] == ["a red circle", "a blue ring"] and record["index"] == 1
    assert record["size"] == 256 and record["prior_guidance"] == 3.0 and record["prior_kind"] == "diffusion"
    assert record["decoder_steps"] == 10 and record["upsampler_256_steps"] == 4 and "upsampler_1024_steps" not in record
    assert record["model"] == "tiny-random" and re.fullmatch(r"[0-9a-f]{16}", record["model_identity"])
    import unclip_cli

    assert record["unclip_version"] == unclip_cli.__version__ and record["stages"] == ["generate"]
    shown = ok(cli("info", tmp_path / "x-1.png")).out.decode()
    assert f"seed: {seed}" in shown and "prior_guidance: 3.0" in shown


def test_info_command_remakes_a_generate_output(cli, tiny_set, tmp_path):
    ok(cli("generate", "a red circle", "--model", tiny_set, "--size", "64", "-q", "-o", tmp_path / "first.png"))
    line = ok(cli("info", "--command", tmp_path / "first.png")).out.decode().strip()
    args = shlex.split(line)
    assert args[:2] == ["unclip", "generate"] and "--seed" in args and "\n" not in line
    args[args.index("-o") + 1] = str(tmp_path / "again.png")
    ok(cli(*args[1:], "-q"))
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "first.png").read_bytes()


def test_info_command_remakes_a_batch_item(cli, tiny_set, tmp_path):
    ok(cli("generate", "a red circle", "a ring", "--model", tiny_set, "--size", "64", "-q", "-o", tmp_path / "b.png"))
    args = shlex.split(ok(cli("info", "--command", tmp_path / "b-1.png")).out.decode())
    assert args[args.index("-o") + 1] == str(tmp_path / "b.png")
    args[args.index("-o") + 1] = str(tmp_path / "c.png")
    ok(cli(*args[1:], "-q"))
    assert (tmp_path / "c-1.png").read_bytes() == (tmp_path / "b-1.png").read_bytes()


def test_info_command_remakes_a_stage_pipe(tiny_set, tmp_path):
    """encode-text | prior | decode | upsample, with the seeds drawn: the printed pipe makes the same bytes."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    m = f"--model {shlex.quote(str(tiny_set))}"
    first = tmp_path / "first.png"
    subprocess.run(f"unclip encode-text 'a red circle' {m} | unclip prior -q {m} | unclip decode -q {m} | unclip upsample -q {m} -o {first}",
                   shell=True, check=True, env=env, capture_output=True)
    line = subprocess.run(["unclip", "info", "--command", str(first)], check=True, env=env, capture_output=True, text=True).stdout
    assert line.count(" | unclip ") == 3 and "--seed" in line
    again = tmp_path / "again.png"
    subprocess.run(line.replace(str(first), str(again)), shell=True, check=True, env=env, capture_output=True)
    assert again.read_bytes() == first.read_bytes()


def test_info_command_refuses_what_it_cannot_remake(cli, tiny_set, tmp_path):
    from conftest import write_png

    src = write_png(tmp_path / "in.png", (64, 64))
    ok(cli("vary", src, "-n", "1", "--model", tiny_set, "--steps", "3", "-q", "-o", tmp_path / "v.png", "--refine", "0"))
    run = cli("info", "--command", tmp_path / "v.png")
    assert run.code == 1 and "cannot be made again from scratch" in run.err and "vary" in run.err
    run = cli("info", "--command", src)
    assert run.code == 1 and "carries no unclip record" in run.err


def _readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python API example, run as written (the shipped set), in a scratch folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UNCLIP_MODEL", raising=False)
    code = _readme_python_example()
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written, "the example writes its results"
    for name in written:
        if name.endswith(".png"):
            assert Image.open(tmp_path / name).size[0] in (64, 256, 1024)
