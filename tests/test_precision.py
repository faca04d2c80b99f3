"""--precision: the networks' weights cast once at load (fp32, bf16, fp16), the samplers, schedule and
random stream in float32; fp32 (auto on the CPU) is today's bytes, bf16 runs end to end near it."""

from __future__ import annotations

import shlex

import pytest
import torch

from unclip_cli import Pipeline
from unclip_cli.device import make_generator, resolve_precision
from unclip_cli.errors import UserError
from unclip_cli.stages.images import psnr

PROMPTS = ["a large red star on a blue background", "a small green circle"]
# bf16 keeps 8 bits of mantissa. On the tiny set's random networks (2 prompts, 256 px through the prior,
# the decoder and the 64->256 upsampler, 4 / 4 / 3 steps) bf16 images are 22-23 dB from fp32's (fp16:
# 29 dB), while another seed's images are 5 dB away: the bound sits between the two.
MIN_PSNR_DB = 15.0


def _images(tiny_set, precision: str, seed: int = 0) -> torch.Tensor:
    pipe = Pipeline.load(tiny_set, device="cpu", precision=precision)
    x, _ = pipe.generate_tensor(PROMPTS, make_generator(seed)[0], size=256, prior_steps=4, decoder_steps=4, upsampler_steps=3)
    return x


def test_bf16_runs_end_to_end_near_fp32(tiny_set):
    full, half = _images(tiny_set, "fp32"), _images(tiny_set, "bf16")
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert not torch.equal(half, full)  # the networks did run in bf16
    assert psnr(half, full).min() > MIN_PSNR_DB, psnr(half, full)
    assert psnr(_images(tiny_set, "bf16", seed=1), full).max() < MIN_PSNR_DB  # the bound tells images apart


def test_networks_get_the_precision_clip_stays_float32(tiny_set):
    pipe = Pipeline.load(tiny_set, device="cpu", precision="bf16")
    assert pipe.precision == "bf16" and pipe.record()["precision"] == "bf16"
    assert pipe.net("decoder").text_proj.image_to_emb.weight.dtype == torch.bfloat16
    assert pipe.net("prior").clip_std.dtype == torch.float32  # data statistics stay exact
    assert pipe.net("clip") is pipe.models.load("clip", pipe.device, torch.float32)  # CLIP is loaded in float32


def test_auto_is_fp32_on_the_cpu_and_the_env_sets_the_default(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("UNCLIP_PRECISION", raising=False)
    assert resolve_precision(None, cpu) == resolve_precision("auto", cpu) == ("fp32", torch.float32)
    monkeypatch.setenv("UNCLIP_PRECISION", "bf16")
    assert resolve_precision(None, cpu) == ("bf16", torch.bfloat16)
    assert resolve_precision("fp16", cpu) == ("fp16", torch.float16)  # the option wins
    with pytest.raises(UserError, match="--precision"):
        resolve_precision("int8", cpu)


def test_fp32_is_the_default_bytes_and_a_bad_value_is_one_line(cli, tiny_set, tmp_path):
    args = ["generate", "a red circle", "--size", "64", "--seed", "3", "-q", "--model", tiny_set,
            "--prior-steps", "3", "--decoder-steps", "3"]
    default = cli(*args, "-o", tmp_path / "a.png", env={"UNCLIP_PRECISION": ""})
    fp32 = cli(*args, "--precision", "fp32", "-o", tmp_path / "b.png")
    assert default.code == 0 and fp32.code == 0, (default, fp32)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    bad = cli(*args, "--precision", "fp8", "-o", tmp_path / "c.png")
    assert bad.code == 1 and bad.err.count("\n") == 1 and "--precision" in bad.err and not (tmp_path / "c.png").exists()


def test_info_command_remakes_a_bf16_pipe(cli, tiny_set, tmp_path):
    """The record holds the precision; `info --command` passes it to every sampling stage."""
    text = cli("encode-text", "a red circle", "--model", tiny_set)
    emb = cli("prior", "-q", "--seed", "1", "--steps", "3", "--precision", "bf16", "--model", tiny_set, stdin=text.out)
    first = cli("decode", "-q", "--seed", "2", "--steps", "3", "--precision", "bf16", "--model", tiny_set,
                "-o", tmp_path / "first.png", stdin=emb.out)
    assert first.code == 0, first
    made = (tmp_path / "first.png").read_bytes()
    line = cli("info", "--command", tmp_path / "first.png").out.decode().strip()
    stages = [shlex.split(part) for part in line.split(" | ")]
    assert [s[1] for s in stages] == ["encode-text", "prior", "decode"]
    assert all(s[s.index("--precision") + 1] == "bf16" for s in stages[1:]) and "--precision" not in stages[0]
    out = cli("encode-text", *stages[0][2:])
    for stage in stages[1:]:
        out = cli(*stage[1:], stdin=out.out)
    assert out.code == 0, out
    assert (tmp_path / "first.png").read_bytes() == made  # written again by the remade pipe
