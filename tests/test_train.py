"""`unclip train`: every component learns on a tiny set and then runs in its stage; resume is exact;
torchrun runs data-parallel; the loss maths agrees with the sampler's."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_st
from safetensors.torch import load_file

from conftest import png_size, write_png
from unclip_cli.modelset import ModelSet, init_model_set

PYTHON = sys.executable


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks train as fast on one thread, and several threads crawl on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ok(run):
    assert run.code == 0, run
    return run


def assert_user_error(run, mentions: str):
    assert run.code == 1, run
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("unclip: error:"), run.err
    assert mentions in lines[0], lines[0]


@pytest.fixture
def fresh_set(tmp_path) -> Path:
    path = tmp_path / "set"
    init_model_set(path, "tiny", seed=0)
    return path


def train(cli, model: Path, component: str, *args):
    return cli("train", component, "--model", model, "-q", *args)


def log_losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ---------------------------------------------------------------------- each component learns, then runs

# (component, steps, batch size, learning rate): a fixed batch overfitted in a few seconds on a CPU
SETTINGS = {
    "clip": (30, 8, 2e-3),
    "prior": (120, 8, 1e-3),
    "decoder": (20, 2, 2e-3),
    "upsampler-256": (60, 2, 3e-3),
    "upsampler-1024": (40, 1, 5e-3),
}


def _weights_file(model: Path, component: str) -> Path:
    return model / component / ("open_clip_model.safetensors" if component == "clip" else "model.safetensors")


@pytest.mark.parametrize("component", list(SETTINGS))
def test_component_learns_on_a_fixed_batch_then_runs_in_its_stage(cli, fresh_set, tmp_path, component):
    steps, batch, lr = SETTINGS[component]
    before = weights(_weights_file(fresh_set, component))
    identity = json.loads((fresh_set / "model.json").read_text())["clip"]["identity"]
    started = time.time()
    ok(train(cli, fresh_set, component, "--data", "shapes", "--steps", steps, "--batch-size", batch, "--lr", lr,
             "--warmup", "5", "--fixed-batch", "--log-every", "1"))
    elapsed = time.time() - started
    losses = log_losses(fresh_set / component / "train.jsonl")
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    k = max(5, steps // 10)
    start, end = np.mean(losses[:k]), np.mean(losses[-k:])
    print(f"{component}: loss {start:.3f} -> {end:.3f} in {steps} steps, {elapsed:.1f}s")
    assert end < 0.5 * start, (start, end, losses)

    after = weights(_weights_file(fresh_set, component))
    assert before.keys() == after.keys()
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.5 * len(after), "the EMA weights were not written back"
    state = torch.load(fresh_set / component / "train-state.pt", weights_only=True)
    assert state["step"] == steps and state["component"] == component

    m = ["--model", fresh_set, "-q"]
    if component == "clip":
        _clip_runs_and_has_a_new_identity(cli, fresh_set, tmp_path, identity)
    elif component == "prior":
        emb = ok(cli("prior", *m, "--steps", "4", "--seed", "0", stdin=ok(cli("encode-text", "a red star", *m[:2])).out)).out
        assert torch.isfinite(load_st(emb)["image_embed"]).all()
        _prior_finds_its_captions(fresh_set)
    elif component == "decoder":
        np.save(tmp_path / "e.npy", np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32))
        assert png_size(ok(cli("decode", tmp_path / "e.npy", *m, "--steps", "3")).out) == (64, 64)
    elif component == "upsampler-256":
        write_png(tmp_path / "small.png", (64, 64))
        assert png_size(ok(cli("upsample", tmp_path / "small.png", *m, "--steps", "3")).out) == (256, 256)
    else:
        write_png(tmp_path / "mid.png", (256, 256))
        assert png_size(ok(cli("upsample", tmp_path / "mid.png", *m, "--steps", "2")).out) == (1024, 1024)


def _clip_runs_and_has_a_new_identity(cli, model, tmp_path, old_identity):
    from unclip_cli.modelset import clip_identity

    identity = json.loads((model / "model.json").read_text())["clip"]["identity"]
    assert identity == clip_identity(model / "clip", "tiny-clip") != old_identity  # the manifest follows the weights
    write_png(tmp_path / "x.png", (40, 30))
    emb = load_st(ok(cli("encode-image", tmp_path / "x.png", "--model", model)).out)["image_embed"]
    assert emb.shape == (1, 32) and torch.isfinite(emb).all()
    text = ok(cli("encode-text", "a red star", "--model", model)).out
    ok(cli("prior", "--model", model, "-q", "--steps", "3", stdin=text))


@torch.no_grad()
def _prior_finds_its_captions(model: Path):
    """Sampling the overfitted prior for each caption of its batch lands nearest that caption's image:
    the x0 target, the normalization and the text conditioning agree with the sampler."""
    from unclip_cli.data.sources import open_source
    from unclip_cli.modelset import ModelSet
    from unclip_cli.stages.conditioning import TextCond
    from unclip_cli.stages.prior import run_prior
    from unclip_cli.train.components import ClipConditioning
    from unclip_cli.train.loop import generator

    ms = ModelSet.open(str(model))
    clip, prior = ms.load("clip"), ms.load("prior")
    cond = ClipConditioning(clip, torch.device("cpu"))
    images, captions, _ = open_source("shapes", seed=0).sample(8, clip.image_size, generator(0, 0, "fixed-batch"))
    true = prior.normalize(cond.image_embed(images))  # (8, D)
    text, null = TextCond(*clip.encode_text(captions)), TextCond(*clip.encode_text([""]))
    sampled = prior.normalize(run_prior(prior, text, null, steps=10, guidance=1.0, generator=torch.Generator().manual_seed(1)))
    dist = torch.cdist(sampled, true)  # (8, 8)
    assert (dist.argmin(1) == torch.arange(8)).sum() >= 6, dist
    assert dist.diag().mean() < 0.3 * dist.mean(), dist


# ---------------------------------------------------------------------- resume


@pytest.fixture
def cached_set(tmp_path, cli):
    """A tiny set and a 64-item CLIP embedding cache of the shapes (prior training without CLIP runs)."""
    path = tmp_path / "base"
    init_model_set(path, "tiny", seed=0)
    ok(cli("data", "embed", "--data", "shapes", "-n", "64", "-o", tmp_path / "cache.safetensors", "--model", path, "-q"))
    return path, tmp_path / "cache.safetensors"


def _copy_set(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_stop_and_resume_give_the_weights_of_an_uninterrupted_run(cli, cached_set, tmp_path):
    base, cache = cached_set
    common = ["--cache", cache, "--batch-size", "4", "--lr", "1e-3", "--warmup", "3", "--log-every", "1", "--save-every", "4"]
    straight = _copy_set(base, tmp_path / "straight")
    ok(train(cli, straight, "prior", *common, "--steps", "12"))
    halves = _copy_set(base, tmp_path / "halves")
    ok(train(cli, halves, "prior", *common, "--steps", "6"))
    assert torch.load(halves / "prior" / "train-state.pt", weights_only=True)["step"] == 6
    ok(train(cli, halves, "prior", *common, "--steps", "12"))

    a, b = weights(straight / "prior" / "model.safetensors"), weights(halves / "prior" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(straight / "prior" / "train-state.pt", weights_only=True)
    sb = torch.load(halves / "prior" / "train-state.pt", weights_only=True)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert not torch.equal(sa["model"]["out_proj.weight"], sa["ema"]["out_proj.weight"])  # EMA is its own copy
    assert [json.loads(x)["step"] for x in (halves / "prior" / "train.jsonl").read_text().splitlines()] == list(range(1, 13))
    assert log_losses(halves / "prior" / "train.jsonl") == log_losses(straight / "prior" / "train.jsonl")

    # a run stopped by SIGINT saves where it stopped; resuming it ends on the same weights
    stopped = _copy_set(base, tmp_path / "stopped")
    args = ["train", "prior", "--model", str(stopped), "-q", *map(str, common), "--steps", "400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PYTHON, "-m", "unclip_cli", *args], stderr=subprocess.PIPE, text=True, env=env)
    log = stopped / "prior" / "train.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    at = torch.load(stopped / "prior" / "train-state.pt", weights_only=True)["step"]
    assert 3 <= at < 400, err
    ok(train(cli, stopped, "prior", *common, "--steps", str(at + 2)))
    uninterrupted = _copy_set(base, tmp_path / "uninterrupted")
    ok(train(cli, uninterrupted, "prior", *common, "--steps", str(at + 2)))
    a, b = weights(uninterrupted / "prior" / "model.safetensors"), weights(stopped / "prior" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_resume_starts_over_and_a_finished_state_does_nothing(cli, cached_set):
    base, cache = cached_set
    common = ["--cache", cache, "--batch-size", "2", "--warmup", "0", "--log-every", "1"]
    ok(train(cli, base, "prior", *common, "--steps", "3"))
    first = weights(base / "prior" / "model.safetensors")
    run = ok(cli("train", "prior", "--model", base, *common, "--steps", "3"))
    assert "nothing to do" in run.err
    assert all(torch.equal(first[k], v) for k, v in weights(base / "prior" / "model.safetensors").items())
    with open(base / "prior" / "train.jsonl", "a") as f:  # as if logged past the state by a killed run
        f.write(json.dumps({"step": 9, "loss": 0.0}) + "\n")
    ok(train(cli, base, "prior", *common, "--steps", "4"))
    assert [json.loads(x)["step"] for x in (base / "prior" / "train.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    ok(train(cli, base, "prior", *common, "--steps", "2", "--no-resume"))
    assert torch.load(base / "prior" / "train-state.pt", weights_only=True)["step"] == 2
    assert len(log_losses(base / "prior" / "train.jsonl")) == 2


# ---------------------------------------------------------------------- torchrun


def test_torchrun_two_processes_on_gloo(cached_set, tmp_path):
    base, cache = cached_set
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "unclip_cli", "train", "prior", "--model", str(base), "--cache", str(cache), "--steps", "6",
        "--batch-size", "2", "--warmup", "2", "--log-every", "1", "--device", "cpu", "-q",
    ]
    before = weights(base / "prior" / "model.safetensors")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from unclip_cli.modelset import ModelSet

    prior = ModelSet.open(str(base)).load("prior")  # the result loads
    after = weights(base / "prior" / "model.safetensors")
    assert not torch.equal(before["out_proj.weight"], after["out_proj.weight"])
    assert torch.equal(prior.out_proj.weight, after["out_proj.weight"])
    assert [json.loads(x)["step"] for x in (base / "prior" / "train.jsonl").read_text().splitlines()] == list(range(1, 7))
    state = torch.load(base / "prior" / "train-state.pt", weights_only=True)
    assert state["options"]["world_size"] == 2 and state["step"] == 6
    assert run.stderr.count("step 6, loss") == 1  # only rank 0 talks


# ---------------------------------------------------------------------- errors


def test_bad_input_is_one_line(cli, fresh_set, other_set, tmp_path):
    one = ["--steps", "1"]
    assert_user_error(train(cli, fresh_set, "vae", "--data", "shapes", *one), "unknown component")
    assert_user_error(train(cli, fresh_set, "prior", *one), "needs --data")
    assert_user_error(train(cli, fresh_set, "prior", "--data", "shapes", "--steps", "0"), "--steps")
    assert_user_error(train(cli, fresh_set, "prior", "--data", "shapes", *one, "--batch-size", "0"), "--batch-size")
    assert_user_error(train(cli, fresh_set, "prior", "--data", str(tmp_path / "missing"), *one), "missing")
    assert_user_error(train(cli, fresh_set, "prior", "--data", "shapes", *one, "--log", tmp_path / "no" / "log"), "does not exist")
    ok(cli("data", "embed", "--data", "shapes", "-n", "4", "-o", tmp_path / "other.safetensors", "--model", other_set, "-q"))
    assert_user_error(train(cli, fresh_set, "prior", "--cache", tmp_path / "other.safetensors", *one), "CLIP")
    assert_user_error(train(cli, fresh_set, "upsampler-256", "--data", "shapes", "--cache", tmp_path / "other.safetensors", *one), "--cache")
    assert_user_error(train(cli, fresh_set, "prior", "--data", "shapes", *one, "--color-jitter", "0.2"), "--color-jitter")
    assert_user_error(train(cli, fresh_set, "upsampler-256", "--data", "shapes", *one, "--color-jitter", "-0.1"), "--color-jitter")
    assert_user_error(train(cli, fresh_set, "decoder", "--data", "shapes", *one, "--crop", "16"), "--crop")
    assert_user_error(train(cli, fresh_set, "upsampler-256", "--data", "shapes", *one, "--crop", "512"), "--crop")
    assert_user_error(train(cli, fresh_set, "upsampler-256", "--data", "shapes", *one, "--crop", "66"), "multiple")
    assert_user_error(train(cli, fresh_set, "decoder", "--data", "shapes", *one, "--hard-negatives", "2"), "--hard-negatives")
    assert_user_error(train(cli, fresh_set, "clip", "--data", "shapes", *one, "-b", "8", "--hard-negatives", "3"), "divide")
    (fresh_set / "prior" / "train-state.pt").write_bytes(b"not a state")
    assert_user_error(train(cli, fresh_set, "prior", "--data", "shapes", "--steps", "1"), "--no-resume")

    manifest = json.loads((fresh_set / "model.json").read_text())
    manifest["clip"]["imported"] = True
    (fresh_set / "model.json").write_text(json.dumps(manifest))
    assert_user_error(train(cli, fresh_set, "clip", "--data", "shapes", "--steps", "1"), "imported")


def test_inference_commands_never_import_the_training_code():
    code = (
        "import sys; from unclip_cli.cli import app; from typer.testing import CliRunner; "
        "CliRunner().invoke(app, ['train', '--help']); CliRunner().invoke(app, ['info', '--help']); "
        "print(sorted(m for m in sys.modules if m.startswith('unclip_cli.train')))"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------- maths


def test_training_maths_matches_the_sampler():
    from unclip_cli.diffusion.schedule import GaussianDiffusion
    from unclip_cli.models.configs import DiffusionConfig

    d = GaussianDiffusion.from_config(DiffusionConfig(variance="learned_range"))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1, torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([1, 10, 300, 700, 999])
    x_t = d.q_sample(x0, t, noise)
    mean, _ = d.q_posterior(x0, x_t, t)
    v = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1
    log_var = d.learned_log_variance(v, t)
    for i, ti in enumerate(t.tolist()):  # the variance trained is the one sampled with, step t -> t - 1
        abar = d.alpha_bar(ti)
        torch.testing.assert_close(x_t[i], abar.sqrt() * x0[i] + (1 - abar).sqrt() * noise[i])
        torch.testing.assert_close(mean[i], d.q_posterior_mean(x0[i], x_t[i], ti, ti - 1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(log_var[i], d.p_log_variance(ti, ti - 1, v[i]), rtol=1e-4, atol=1e-4)
        if ti > 300:
            continue  # x0 from eps divides by sqrt(alpha_bar) ~ 1e-5 near T: float32 noise
        eps = d.predict_eps_from_x0(x_t[i], ti, x0[i])
        torch.testing.assert_close(d.predict_x0_from_eps(x_t[i : i + 1], t[i : i + 1], eps[None])[0], x0[i], rtol=1e-3, atol=1e-3)
    assert torch.isfinite(d.learned_log_variance(torch.zeros(1), torch.tensor([0]))).all()


def test_likelihood_terms():
    from unclip_cli.train.losses import discretized_gaussian_log_likelihood, normal_kl

    m, lv = torch.randn(10), torch.randn(10)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(10), atol=1e-6)
    # KL of N(0, 1) from N(1, e^0): 1/2
    assert torch.allclose(normal_kl(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(1)), torch.tensor([0.5]))
    # the discretized Gaussian is a distribution over the 256 pixel values
    values = torch.linspace(-1, 1, 256)
    for mean, log_scale in ((0.3, math.log(0.1)), (-0.9, math.log(0.02)), (0.0, 0.0)):
        logp = discretized_gaussian_log_likelihood(values, torch.full((256,), mean), torch.full((256,), log_scale))
        assert abs(logp.exp().sum().item() - 1.0) < 1e-3


def test_hybrid_loss_trains_the_variance_only_through_the_vlb():
    from unclip_cli.diffusion.schedule import GaussianDiffusion
    from unclip_cli.models.configs import DiffusionConfig
    from unclip_cli.train.losses import diffusion_loss

    diffusion = GaussianDiffusion.from_config(DiffusionConfig(variance="learned_range"))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 5, 500, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    out = torch.randn(4, 6, 8, 8, generator=g).requires_grad_()
    loss, parts = diffusion_loss(diffusion, out, x0, x_t, t, noise)
    assert set(parts) == {"mse", "vb"} and torch.isfinite(loss)
    loss.backward()
    grad_eps = out.grad[:, :3]
    torch.testing.assert_close(grad_eps, 2 * (out[:, :3] - noise).detach() / out[:, :3].numel())  # MSE only: stop-grad
    assert out.grad[:, 3:].abs().sum() > 0


def test_degradations():
    from unclip_cli.train.degrade import bsr_degrade, gaussian_blur, gaussian_kernel

    k = gaussian_kernel(3, 0.6)
    assert torch.isclose(k.sum(), torch.tensor(1.0)) and k[1] > k[0] == k[2]
    flat = torch.full((1, 3, 8, 8), 0.25)
    torch.testing.assert_close(gaussian_blur(flat), flat)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert gaussian_blur(x).std() < x.std()
    a = bsr_degrade(x, torch.Generator().manual_seed(1))
    b = bsr_degrade(x, torch.Generator().manual_seed(1))
    c = bsr_degrade(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1 and (a - x).abs().mean() > 0.01


def test_color_jitter_moves_colors_and_keeps_the_picture():
    from unclip_cli.train.degrade import JITTER_OFFSET, color_jitter

    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    a = color_jitter(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, color_jitter(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, color_jitter(x, torch.Generator().manual_seed(2)))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    shift = (a - x).mean(dim=(2, 3))  # (B, C): each image and channel moved by its own offset
    assert shift.abs().max() <= JITTER_OFFSET + 1e-6 and shift.std() > JITTER_OFFSET / 4
    for img, ref in zip(a, x):  # the picture itself stays: per channel, a positive affine map of the input
        for c in range(3):
            assert torch.corrcoef(torch.stack([img[c].flatten(), ref[c].flatten()]))[0, 1] > 0.999
    # the offset's bound is a parameter; the draws do not depend on it, so 0 leaves the gain alone
    wide = color_jitter(x, torch.Generator().manual_seed(1), 0.3)
    gain_only = color_jitter(x, torch.Generator().manual_seed(1), 0.0)
    torch.testing.assert_close(gain_only.mean(dim=(2, 3)), x.mean(dim=(2, 3)))
    moved = (wide - gain_only).mean(dim=(2, 3))
    assert moved.abs().max() <= 0.3 + 1e-6 and moved.abs().max() > JITTER_OFFSET


def test_upsampler_training_pairs_share_off_palette_colors(fresh_set):
    """The upsampler's crops leave the renderer's palette (so it learns to keep its input's colors),
    and the low-res input is made from the same moved crop."""
    from unclip_cli.data.shapes import COLORS
    from unclip_cli.data.sources import ShapesSource
    from unclip_cli.modelset import ModelSet
    from unclip_cli.train.components import make_task, resize

    task = make_task("upsampler-256", ModelSet.open(str(fresh_set)), "cpu", ShapesSource(seed=0), None)
    data = task.fetch(8, torch.Generator().manual_seed(0))
    x0, low_up = data["x0"], data["low_up"]
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 127.5 - 1  # (K, 3)
    flat = ((x0 + 1) * 127.5).round().to(torch.int32)  # (B, 3, c, c) on the 0..255 scale
    for crop in flat:  # the crop's most common color is no palette color
        colors, counts = crop.flatten(1).T.unique(dim=0, return_counts=True)
        common = colors[counts.argmax()].float() / 127.5 - 1
        assert (palette - common).abs().max(dim=1).values.min() > 2 / 255
    mean_hi = resize(x0, task.crop // task.factor).mean(dim=(2, 3))
    torch.testing.assert_close(low_up.mean(dim=(2, 3)), mean_hi, atol=0.02, rtol=0)


def test_upsampler_options_reach_the_crops(cli, fresh_set):
    """`--color-jitter` sets how far the crops move: same draws, per-channel offsets scaled by it;
    `--crop` their side. Both are part of the training state, so resuming with others warns."""
    from unclip_cli.data.sources import ShapesSource
    from unclip_cli.modelset import ModelSet
    from unclip_cli.train.components import make_task

    ms = ModelSet.open(str(fresh_set))
    crops = {}
    for jitter in (None, 0.0, 0.4):
        task = make_task("upsampler-256", ms, "cpu", ShapesSource(seed=0), None, jitter=jitter)
        crops[jitter] = task.fetch(4, torch.Generator().manual_seed(0))["x0"]
    default_move = (crops[None] - crops[0.0]).mean(dim=(2, 3)).abs()
    wide_move = (crops[0.4] - crops[0.0]).mean(dim=(2, 3)).abs()
    assert default_move.max() <= 0.1 + 1e-6 and wide_move.max() > 0.1
    assert wide_move.sum() > 2 * default_move.sum()  # 4x the offsets, less what the clamp takes back
    size = ms.load("upsampler-256").cfg.size
    assert crops[None].shape[-1] == size // 4
    whole = make_task("upsampler-256", ms, "cpu", ShapesSource(seed=0), None, crop=size).fetch(2, torch.Generator())
    assert whole["x0"].shape == whole["low_up"].shape == (2, 3, size, size)

    common = ("--data", "shapes", "-b", "2", "--log-every", "1")
    ok(train(cli, fresh_set, "upsampler-256", "--steps", "1", *common, "--color-jitter", "0.3", "--crop", str(size)))
    again = ok(train(cli, fresh_set, "upsampler-256", "--steps", "2", *common))
    assert "color_jitter 0.3 -> default" in again.err and f"crop {size} -> default" in again.err


def test_clip_hard_negatives_fill_batches_with_groups(cli, fresh_set, tmp_path):
    """`--hard-negatives K`: each CLIP batch is made of groups of K scenes sharing background and
    colors; the run trains and records the option; other data than shapes is refused."""
    from unclip_cli.data.sources import ShapesSource
    from unclip_cli.modelset import ModelSet
    from unclip_cli.train.components import make_task

    ms = ModelSet.open(str(fresh_set))
    task = make_task("clip", ms, "cpu", ShapesSource(seed=0), None, hard_negatives=4)
    batch = task.fetch(8, torch.Generator().manual_seed(0))
    size = ms.load("clip").image_size
    assert batch["images"].shape == (8, 3, size, size)
    for group in (batch["captions"][:4], batch["captions"][4:]):
        assert len({c.rsplit(" on a ", 1)[1] for c in group}) == 1  # one background per group
        assert len(set(group)) > 1
    plain = make_task("clip", ms, "cpu", ShapesSource(seed=0), None).fetch(8, torch.Generator().manual_seed(0))
    assert plain["captions"] != batch["captions"]

    common = ("--data", "shapes", "-b", "8", "--log-every", "1")
    ok(train(cli, fresh_set, "clip", "--steps", "1", *common, "--hard-negatives", "4"))
    again = ok(train(cli, fresh_set, "clip", "--steps", "2", *common))
    assert "hard_negatives 4 -> default" in again.err
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, color in enumerate(("red", "blue")):
        write_png(folder / f"{i}.png", (8, 8), color)
        (folder / f"{i}.txt").write_text(f"a {color} square")
    assert_user_error(train(cli, fresh_set, "clip", "--steps", "3", "--data", folder, "-b", "2", "--hard-negatives", "2"), "shapes")


def test_train_device_script_trains_packs_and_judges_a_set(tmp_path):
    """scripts/train-device.sh (the GPU recipe) on the CPU for 2 steps a stage: every lane trains, eval runs, and
    the tars hold each component's weights, no training state, each under the device tool's 16 MiB."""
    import tarfile

    root = Path(__file__).resolve().parents[1]
    # no `unclip` on PATH, as on the device (the script runs `python -m unclip_cli`; a stage that ran
    # `timeout unclip ...` once trained nothing there while this test passed with the venv's entry point)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "unclip").exists())
    env = dict(os.environ, PATH=path, UNCLIP_DEVICE="cpu", OMP_NUM_THREADS="1", PYTHON=PYTHON, TRAIN_SECONDS="400", MAX_STEPS="2", LOG_EVERY="1",
               CLIP_BATCH="8", DECODER_BATCH="2", PRIOR_BATCH="8", UP_BATCH="1", CACHE_COUNT="64", EVAL_COUNT="2")
    run = subprocess.run(["bash", str(root / "scripts" / "train-device.sh"), str(tmp_path / "set"), str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "out"
    assert "upsampler-1024" in (out / "eval.txt").read_text()
    names = []
    for tar in sorted(out.glob("set-*.tar")):
        assert tar.stat().st_size < 16 * 2**20, tar
        names += tarfile.open(tar).getnames()
    for comp in ("clip/open_clip_model.safetensors", "prior/model.safetensors", "prior-ar/model.safetensors",
                 "decoder/model.safetensors", "upsampler-256/model.safetensors", "upsampler-1024/model.safetensors"):
        assert comp in names, names
    assert "model.json" in names and not any(n.endswith("train-state.pt") for n in names)
    for comp in ("clip", "prior", "prior-ar", "decoder", "upsampler-1024"):  # each lane's stages took steps
        assert (tmp_path / "set" / comp / "train.jsonl").is_file(), comp


def test_model_export_ships_weights_configs_and_manifest_only(cli, tmp_path, fresh_set):
    """`unclip model export` copies weights, configs and manifest (no training state, logs, caches), keeps the
    destination set's model card and pictures, names it in DEFAULT only with --default, and refuses a folder that
    is not a model set and a file over 16 MiB, leaving both untouched."""
    root = Path(__file__).resolve().parents[1]
    default = (root / "weights" / "DEFAULT").read_text()
    (fresh_set / "decoder" / "train-state.pt").write_bytes(b"state")
    (fresh_set / "decoder" / "train.jsonl").write_text("{}\n")
    (fresh_set / "cache.safetensors").write_bytes(b"cache")
    kept = tmp_path / "weights" / "kept"
    kept.parent.mkdir()
    r = ok(cli("model", "export", fresh_set, "-o", kept))
    assert f"MiB  {kept / 'decoder' / 'model.safetensors'}" in r.err and "in all" in r.err
    assert (kept / "model.json").is_file() and (kept / "decoder" / "model.safetensors").is_file()
    assert (kept / "clip" / "open_clip_model.safetensors").read_bytes() == (fresh_set / "clip" / "open_clip_model.safetensors").read_bytes()
    assert not (kept / "decoder" / "train-state.pt").exists() and not (kept / "decoder" / "train.jsonl").exists()
    assert not (kept / "cache.safetensors").exists() and not (kept.parent / "DEFAULT").exists()
    assert (root / "weights" / "DEFAULT").read_text() == default
    assert ModelSet.open(str(kept)).load("decoder") is not None

    (kept / "README.md").write_text("# the card")
    (kept / "crop.png").write_bytes(b"png")
    (kept / "stale.txt").write_text("from an older copy")
    ok(cli("model", "export", fresh_set, "-o", kept, "--default"))
    assert (kept / "README.md").read_text() == "# the card" and (kept / "crop.png").read_bytes() == b"png"
    assert not (kept / "stale.txt").exists()
    assert (kept.parent / "DEFAULT").read_text() == "kept\n"
    assert sorted(p.name for p in kept.parent.iterdir()) == ["DEFAULT", "kept"]  # nothing left aside

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_user_error(cli("model", "export", fresh_set, "-o", other), "not a model set")
    assert [p.name for p in other.iterdir()] == ["notes.txt"] and (other / "notes.txt").read_text() == "mine"

    (fresh_set / "decoder" / "model.safetensors").write_bytes(bytes(16 * 2**20 + 1))
    assert_user_error(cli("model", "export", fresh_set, "-o", kept), "16 MiB")
    assert ModelSet.open(str(kept)).load("decoder") is not None  # the previous copy stands
    assert_user_error(cli("model", "export", tmp_path / "other", "-o", tmp_path / "new"), "not a model set")
    assert not (tmp_path / "new").exists()
