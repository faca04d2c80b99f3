"""`generate --prompts FILE --out-dir DIR`: torchrun ranks make the images one process makes, a rerun
regenerates exactly what is missing, a killed run resumes, tar shards train, bad runs are refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_cli import ok, user_error
from unclip_cli.bulk import item_seed

PYTHON = sys.executable
PROMPTS = ["a red circle", "a blue square on green", "", "two yellow stars", "a big cross", "a small ring", "a green star"]
# 8 decoder steps: batched float32 maths differ from a row alone in the last bits, which the first steps
# amplify (see tests/test_sampling_loop.py); by 8 steps that is under half a uint8 level on the tiny set
SAMPLING = ["--size", "64", "--prior-steps", "2", "--decoder-steps", "8", "-q"]


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tiny_set, tmp_path_factory) -> tuple[Path, Path]:
    """(PROMPTS' file, the folder one process makes of it at batch size 1), made once for the tests that read it."""
    from typer.testing import CliRunner

    from unclip_cli.cli import app

    root = tmp_path_factory.mktemp("reference")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["generate", "--prompts", prompts, "--out-dir", root / "one", "--model", tiny_set, "--seed", "3", *SAMPLING]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return prompts, root / "one"


def bulk(cli, model, prompts, out, *args):
    return cli("generate", "--prompts", prompts, "--out-dir", out, "--model", model, "--seed", "3", *SAMPLING, *args)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def torchrun(model, prompts, out, *args, nproc: int = 2):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "unclip_cli",
           "generate", "--prompts", str(prompts), "--out-dir", str(out), "--model", str(model), "--seed", "3",
           "--device", "cpu", *SAMPLING, *map(str, args)]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


# ---------------------------------------------------------------------- one process, ranks, batches


def test_items_their_seeds_and_the_manifest(cli, tiny_set, reference, tmp_path):
    out = reference[1]
    indices = [i for i, p in enumerate(PROMPTS) if p]  # an item's index is its line number; blank lines make none
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in indices]
    lines = manifest(out)
    assert [x["index"] for x in lines] == indices and [x["prompt"] for x in lines] == [p for p in PROMPTS if p]
    expected = [int.from_bytes(hashlib.sha256(f"3/{i}".encode()).digest()[:8], "big") >> 1 for i in indices]
    assert [x["seed"] for x in lines] == expected == [item_seed(3, i) for i in indices]
    # each file is the image of `generate PROMPT --seed SEED` with the same settings, record included
    first = lines[1]
    ok(cli("generate", first["prompt"], "--seed", first["seed"], "--model", tiny_set, *SAMPLING, "-o", tmp_path / "a.png"))
    assert (tmp_path / "a.png").read_bytes() == (out / first["file"]).read_bytes()
    record = json.loads(Image.open(out / first["file"]).info["unclip"])
    assert all(record[k] == v for k, v in first.items() if k not in ("index", "prompt", "file")), (record, first)
    assert record["prompts"] == [first["prompt"]]
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 3 and run["decoder_steps"] == 8 and run["format"] == "png"


@pytest.mark.parametrize("batch", [1, 3])
def test_two_torchrun_ranks_make_the_images_of_one_process(tiny_set, reference, tmp_path, batch):
    (prompts, one), two = reference, tmp_path / "two"
    torchrun(tiny_set, prompts, two, "--batch-size", batch)
    names = sorted(p.name for p in one.glob("*.png"))
    assert sorted(p.name for p in two.glob("*.png")) == names and len(names) == 6
    for name in names:
        assert np.abs(pixels(one / name) - pixels(two / name)).max() <= 1, name
    assert manifest(two) == manifest(one)  # complete, in index order, no item twice
    assert not list(two.glob(".*"))  # the ranks' manifest parts are merged and gone


# ---------------------------------------------------------------------- resume


def test_deleted_outputs_and_only_those_are_made_again(cli, tiny_set, reference, tmp_path):
    prompt_file, out = reference[0], tmp_path / "out"
    shutil.copytree(reference[1], out)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("*.png")}
    lines = manifest(out)
    for name in ("000001.png", "000005.png"):
        (out / name).unlink()
    (out / "manifest.jsonl").unlink()
    run = ok(bulk(cli, tiny_set, prompt_file, out, "--batch-size", "2"))
    assert "2 made now, 4 already there" in run.err
    for p in out.glob("*.png"):
        data, mtime, inode = before[p.name]
        if p.name in ("000001.png", "000005.png"):
            assert np.abs(pixels(p) - np.asarray(Image.open(io.BytesIO(data)))).max() <= 1
        else:
            assert (p.stat().st_mtime_ns, p.stat().st_ino) == (mtime, inode)  # not rewritten
    assert manifest(out) == lines
    # without --seed the run's own seed is read back; other settings are refused, naming them
    ok(cli("generate", "--prompts", prompt_file, "--out-dir", out, "--model", tiny_set, *SAMPLING))
    line = user_error(cli("generate", "--prompts", prompt_file, "--out-dir", out, "--model", tiny_set, "--seed", "3",
                          *SAMPLING[:4], "--decoder-steps", "9"), "other settings")
    assert "decoder_steps 8 there, 9 now" in line
    user_error(bulk(cli, tiny_set, prompt_file, out, "--format", "tar"), "format 'png' there, 'tar' now")


def test_a_killed_run_resumes_to_the_images_of_an_uninterrupted_one(cli, tiny_set, tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"shape number {i}\n" for i in range(24)))
    killed = tmp_path / "killed"
    cmd = [PYTHON, "-m", "unclip_cli", "generate", "--prompts", str(prompts), "--out-dir", str(killed),
           "--model", str(tiny_set), "--seed", "3", *SAMPLING]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(killed.glob("*.png"))) < 2:
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=60)
    done = sorted(p.name for p in killed.glob("*.png"))
    assert 2 <= len(done) < 24, "the run ended before it could be killed"
    assert not (killed / "manifest.jsonl").exists()
    ok(bulk(cli, tiny_set, prompts, killed, "--batch-size", "4"))
    straight = tmp_path / "straight"
    ok(bulk(cli, tiny_set, prompts, straight, "--batch-size", "4"))
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in straight.iterdir())  # no leftovers
    for p in straight.glob("*.png"):
        assert np.abs(pixels(p) - pixels(killed / p.name)).max() <= 1, p.name
    assert manifest(killed) == manifest(straight)


# ---------------------------------------------------------------------- tar shards


def test_tar_shards_resume_whole_and_train(cli, tiny_set, prompt_file, tmp_path):
    out = tmp_path / "tar"
    ok(bulk(cli, tiny_set, prompt_file, out, "--format", "tar", "--shard-size", "2", "--batch-size", "2"))
    shards = sorted(p.name for p in out.glob("shard-*.tar"))
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(out / "shard-000001.tar") as tar:
        assert tar.getnames() == [f"{k}.{e}" for k in ("000003", "000004") for e in ("png", "txt", "json")]
        assert tar.extractfile("000004.txt").read().decode() == "a big cross"
        meta = json.loads(tar.extractfile("000004.json").read())
    assert meta == next(x for x in manifest(out) if x["index"] == 4) and meta["shard"] == "shard-000001.tar"
    first = (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").unlink()
    ok(bulk(cli, tiny_set, prompt_file, out, "--format", "tar", "--shard-size", "2", "--batch-size", "2"))
    assert (out / "shard-000001.tar").read_bytes() == first  # same items, same batches: the same bytes
    assert [x["index"] for x in manifest(out)] == [0, 1, 3, 4, 5, 6]

    model = tmp_path / "set"
    shutil.copytree(tiny_set, model)
    ok(cli("train", "decoder", "--model", model, "--data", f"{out}/shard-*.tar", "--steps", "2", "--batch-size", "2",
           "--warmup", "1", "--log-every", "1", "-q"))
    assert len((model / "decoder" / "train.jsonl").read_text().splitlines()) == 2


# ---------------------------------------------------------------------- input and refusals


def test_json_lines_on_stdin_with_their_own_seeds(cli, tiny_set, tmp_path):
    lines = [{"prompt": "a red circle", "seed": 11}, {"prompt": "a blue ring"}]
    out = tmp_path / "out"
    run = ok(cli("generate", "--prompts", "-", "--out-dir", out, "--model", tiny_set, *SAMPLING,
                 stdin="".join(json.dumps(x) + "\n" for x in lines).encode()))
    drawn = json.loads((out / "run.json").read_text())["seed"]
    assert f"seed {drawn}" in run.err  # a drawn seed is said, and kept for the resume
    assert [x["seed"] for x in manifest(out)] == [11, item_seed(drawn, 1)]


def test_bad_prompt_files_and_folders_are_one_line(cli, tiny_set, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n{"prompt": "x", "seed": -1}\n')
    user_error(bulk(cli, tiny_set, bad, tmp_path / "o1"), "bad.jsonl:2: seed must be")
    bad.write_text('{"prompt": "a red circle"}\nnot json\n')
    user_error(bulk(cli, tiny_set, bad, tmp_path / "o2"), "bad.jsonl:2: not a JSON object")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    user_error(bulk(cli, tiny_set, empty, tmp_path / "o3"), "no prompts")
    user_error(bulk(cli, tiny_set, tmp_path / "missing.txt", tmp_path / "o4"), "no such file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    bad.write_text("a red circle\n")
    user_error(bulk(cli, tiny_set, bad, foreign), "holds files but no run.json")
    user_error(cli("generate", "--prompts", bad, "--model", tiny_set), "go together")
    user_error(bulk(cli, tiny_set, bad, tmp_path / "o5", "--format", "zip"), "--format")
    user_error(bulk(cli, tiny_set, bad, tmp_path / "o6", "--batch-size", "0"), "--batch-size")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))
