"""Bad option values and non-finite results: one line on stderr, exit 1, no output file (issue 25)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file


def assert_refused(run, out_dir, mentions: str):
    assert run.code == 1, run
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("unclip: error:") and "Traceback" not in run.err, run.err
    assert mentions in lines[0], lines[0]
    assert not any(p.suffix in (".png", ".safetensors", ".tmp") for p in out_dir.iterdir()), sorted(out_dir.iterdir())


GENERATE = ["generate", "a red circle", "--size", "64", "-q"]


@pytest.mark.parametrize("args, mentions", [
    (["--decoder-guidance", "nan"], "decoder guidance must be a finite number"),
    (["--prior-guidance", "inf"], "prior guidance must be a finite number"),
    (["--prior-steps", "5000"], "prior steps must be between 2 and 1000"),
    (["--decoder-steps", "1001"], "decoder steps must be between 2 and 1000"),
    (["--seed", str(2**63)], "--seed must be in [0, 2^63)"),
    (["--device", "meta"], "--device meta"),
])
def test_generate_refuses_bad_option_values(cli, tiny_set, tmp_path, args, mentions):
    assert_refused(cli(*GENERATE, "--model", tiny_set, *args, "-o", tmp_path / "out.png"), tmp_path, mentions)


def test_stage_commands_refuse_non_finite_options(cli, tiny_set, tmp_path):
    m = ["--model", tiny_set]
    text = cli("encode-text", "a ring", *m).out
    emb = cli("prior", *m, "--seed", "0", "-q", stdin=text).out
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "e.safetensors").write_bytes(emb)
    src = tmp_path / "in" / "e.safetensors"
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(cli("decode", src, *m, "--eta", "nan", "-o", out / "x.png"), out, "eta must be a finite number")
    assert_refused(cli("prior", *m, "--guidance", "nan", "-o", out / "x.safetensors", stdin=text), out, "guidance must be a finite")
    assert_refused(cli("prior", *m, "--kind", "ar", "--temperature", "0", "-o", out / "x.safetensors", stdin=text), out,
                   "temperature must be > 0")
    assert_refused(cli("slerp", src, src, "-t", "nan", "-o", out / "x.safetensors"), out, "t must be a finite number")


def test_an_extreme_embedding_is_refused_not_written_black(cli, tiny_set, tmp_path):
    np.save(tmp_path / "big.npy", np.full((1, 32), 1e30, np.float32))
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(cli("decode", tmp_path / "big.npy", "--model", tiny_set, "-q", "-o", out / "x.png"), out,
                   "decoder: the result holds NaN or infinite values")


def test_a_nan_weight_names_the_stage(cli, tiny_set, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_set, broken)
    path = broken / "decoder" / "model.safetensors"
    state = load_file(path)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, path)
    out = tmp_path / "out"
    out.mkdir()
    run = cli(*GENERATE, "--model", broken, "--seed", "0", "-o", out / "x.png")
    assert_refused(run, out, "decoder: the result holds NaN")
    assert "weights" in run.err
