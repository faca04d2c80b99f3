"""The paper's manipulations: slerp, DDIM inversion, variations, interpolation, text diffs, mixes, best-of-K."""

from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_st

from conftest import png_size
from unclip_cli.diffusion.inversion import as_eps_model, ddim_invert_exact, latent_timesteps
from unclip_cli.modelset import ModelSet
from unclip_cli.stages.conditioning import TextCond
from unclip_cli.stages.interpolate import slerp
from unclip_cli.stages.manipulate import best_of, decode_latent, invert, mix, text_diff
from unclip_cli.stages.prior import pick_best, run_prior

# The stated bound: DDIM inversion then eta-0 decoding of a 64px image, same steps and guidance.
RECONSTRUCTION_PSNR_DB = 35.0


def ok(run):
    assert run.code == 0, run
    return run


def assert_user_error(run, mentions: str):
    assert run.code == 1, run
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("unclip: error:"), run.err
    assert "Traceback" not in run.err
    assert mentions in lines[-1], lines[-1]


def empty_prompt(clip) -> TextCond:
    """The empty prompt's conditioning, one row (guidance's unconditional branch)."""
    return TextCond(*clip.encode_text([""]))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def strip_frames(data: bytes, n: int) -> list[np.ndarray]:
    strip = pixels(data)
    w = strip.shape[1] // n
    return [strip[:, i * w : (i + 1) * w] for i in range(n)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(float) - b) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.fixture(scope="module")
def trained_set(tiny_set, tmp_path_factory):
    """A tiny set whose decoder has overfitted one batch of shapes: a random UNet's eps is no
    denoiser (its DDIM steps are not the near-identity maps of a trained one), so inversion is
    judged on a decoder that has learned something."""
    from typer.testing import CliRunner

    from unclip_cli.cli import app

    path = tmp_path_factory.mktemp("manip") / "set"
    shutil.copytree(tiny_set, path)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, [
            "train", "decoder", "--model", str(path), "--data", "shapes", "--fixed-batch", "--steps", "60",
            "--batch-size", "2", "--lr", "2e-3", "--warmup", "5", "--ema-decay", "0.9", "-q",
        ])
    finally:
        torch.set_num_threads(n)
    assert result.exit_code == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def image_a(trained_set, tmp_path_factory):
    return _render(tmp_path_factory.mktemp("img") / "a.png", 3)


@pytest.fixture(scope="module")
def image_b(trained_set, tmp_path_factory):
    return _render(tmp_path_factory.mktemp("img") / "b.png", 11)


def _render(path, index: int):
    from unclip_cli.data.sources import ShapesSource
    from unclip_cli.io import tensor_to_images

    (img,) = tensor_to_images(ShapesSource().images([index], 64))
    img.save(path)
    return path


# ---------------------------------------------------------------------- slerp, text diffs, mixes


def _reference_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Shoemake's formula on the directions, lengths interpolated linearly, in float64."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua, ub = a / na, b / nb
    omega = math.acos(float(np.clip(ua @ ub, -1, 1)))
    d = (math.sin((1 - t) * omega) * ua + math.sin(t * omega) * ub) / math.sin(omega)
    return d * ((1 - t) * na + t * nb)


def test_slerp_endpoints_norm_and_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, generator=g) * 3, torch.randn(4, 32, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    ua, ub = (v.double() / v.double().norm(dim=-1, keepdim=True) for v in (a, b))
    for t in (0.1, 0.37, 0.5, 0.9):
        norms = slerp(ua, ub, t).norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
        ours = slerp(a.double(), b.double(), t).numpy()
        for i in range(4):
            np.testing.assert_allclose(ours[i], _reference_slerp(a[i].double().numpy(), b[i].double().numpy(), t), rtol=0, atol=1e-12)
    # not a lerp: the midpoint of two orthogonal unit vectors stays on the sphere
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(slerp(x, y, 0.5), torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))


def test_text_diff_starts_at_the_image_and_turns_toward_the_diff():
    g = torch.Generator().manual_seed(1)
    z_i, z_from, z_to = (torch.randn(1, 16, generator=g, dtype=torch.float64) for _ in range(3))
    frames = text_diff(z_i, z_from, z_to, [0.0, 0.25, 0.5])
    assert torch.equal(frames[0], z_i[0])
    z_d = (z_to - z_from) / (z_to - z_from).norm()
    cos = [float((f / f.norm()) @ z_d[0]) for f in frames]
    assert cos[0] < cos[1] < cos[2]
    torch.testing.assert_close(frames.norm(dim=-1), z_i.norm().expand(3), rtol=0, atol=1e-9)
    with pytest.raises(ValueError):
        text_diff(z_i, z_to, z_to, [0.1])


def test_mix_is_the_weighted_sum():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    torch.testing.assert_close(mix(e, [0.5, 0.25, 0.0]), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ValueError):
        mix(e, [1.0])


def test_image_helpers():
    from unclip_cli.stages.images import downscale, fit_image, psnr

    g = torch.Generator().manual_seed(0)
    wide = torch.rand(3, 40, 80, generator=g) * 2 - 1  # (3, H, W)
    fitted = fit_image(wide, 20)
    assert fitted.shape == (3, 20, 20) and fitted.min() >= -1 and fitted.max() <= 1
    centre = downscale(wide[None, :, :, 20:60], 20)[0].clamp(-1, 1)  # the centre square, resized alone
    torch.testing.assert_close(fitted[:, :, 2:-2], centre[:, :, 2:-2], rtol=0, atol=1e-5)  # equal away from its sides
    assert fit_image(fitted, 20) is fitted
    x = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    y = x.clone()
    y[1] += 0.1
    values = psnr(y, x)
    assert values.shape == (2,) and values.dtype == torch.float32
    assert torch.isinf(values[0]) and values[1].item() == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-3)
    assert downscale(x.double(), 4).shape == (2, 3, 4, 4) and downscale(x.double(), 4).dtype == torch.float32


def test_latent_timesteps_skip_the_top_level():
    assert latent_timesteps(25)[0] == 959 and latent_timesteps(25)[-1] == 0 and len(latent_timesteps(25)) == 25
    assert latent_timesteps(7) == [856, 714, 571, 428, 285, 143, 0]  # round(k * 999 / 7), k < 7


# ---------------------------------------------------------------------- inversion


def test_x0_models_invert_through_their_eps_form():
    from unclip_cli.diffusion.schedule import GaussianDiffusion
    from unclip_cli.models.configs import DiffusionConfig

    x0_chain = GaussianDiffusion.from_config(DiffusionConfig(prediction="x0"))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, generator=g) * 0.3

    def x0_model(x, t):  # a smooth x0 predictor: the posterior mean of N(0, 1) data plus a channel mix
        return x0_chain.alpha_bar(t).sqrt() * x + 0.05 * torch.tanh(torch.einsum("ij,bjhw->bihw", w, x))

    eps_model, eps_chain = as_eps_model(x0_model, x0_chain)
    assert eps_chain.config.prediction == "eps"
    x = torch.randn(2, 3, 8, 8, generator=g)
    for t, t_prev in ((959, 919), (500, 460), (40, 0)):
        want, _ = x0_chain.ddim_step(x0_model(x, t), x, t, t_prev, 0.0, None)
        got, _ = eps_chain.ddim_step(eps_model(x, t), x, t, t_prev, 0.0, None)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and the exact inversion of that model decodes back with the x0 chain's own DDIM
    images = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8
    steps = latent_timesteps(8)
    x_T, residuals = ddim_invert_exact(eps_model, images, eps_chain, steps)
    y = x_T
    for t, t_prev in zip(steps, steps[1:] + [-1]):
        y, _ = x0_chain.ddim_step(x0_model(y, t), y, t, t_prev, 0.0, None)
    assert (y - images).abs().max() < 1e-2, residuals


def test_ddim_inversion_then_eta0_decoding_reconstructs(trained_set, image_a):
    from unclip_cli.io import images_to_tensor

    ms = ModelSet.open(str(trained_set))
    dec, clip = ms.load("decoder"), ms.load("clip")
    img = Image.open(image_a).convert("RGB")
    x = images_to_tensor([img])
    z = clip.encode_image([img])
    null = empty_prompt(clip)
    for guidance in (1.0, 3.0):
        x_T, residuals = invert(dec, x, z, null, null, steps=8, guidance=guidance, refine=3)
        assert x_T.shape == (1, 3, 64, 64) and 0.5 < float(x_T.std()) < 1.5  # noise-like
        back = decode_latent(dec, z, x_T, null, steps=8, guidance=guidance)
        mse = float(((back - x) ** 2).mean())
        assert 10 * math.log10(4 / mse) >= RECONSTRUCTION_PSNR_DB, (guidance, mse, residuals)
    # plain inversion (no refinement) is measurably worse: the refinement does the work
    x_T0, _ = invert(dec, x, z, null, null, steps=8, guidance=1.0, refine=0)
    back0 = decode_latent(dec, z, x_T0, null, steps=8, guidance=1.0)
    assert float(((back0 - x) ** 2).mean()) > mse


def test_invert_decode_pipe_gives_the_image_back(cli, trained_set, image_a):
    m = ["--model", trained_set]
    latent = ok(cli("invert", image_a, *m, "--steps", "8", "-q"))
    assert "reconstruction" in latent.err and "dB PSNR" in latent.err
    t = load_st(latent.out)
    assert set(t) == {"image_embed", "noise"} and t["noise"].shape == (1, 3, 64, 64)
    back = ok(cli("decode", *m, "-q", stdin=latent.out)).out
    assert psnr(pixels(back), pixels(image_a.read_bytes())) >= RECONSTRUCTION_PSNR_DB
    info = ok(cli("info", "-", stdin=latent.out)).out.decode()
    assert "latent stage file" in info and "decoder_steps: 8" in info


def test_vary_eta0_gives_the_image_back_and_eta_varies(cli, trained_set, image_a, tmp_path):
    m = ["--model", trained_set, "--steps", "8", "-q"]
    original = pixels(image_a.read_bytes())
    ok(cli("vary", image_a, "-n", "2", "--eta", "0", "-o", tmp_path / "same.png", *m))
    for i in range(2):
        assert psnr(pixels((tmp_path / f"same-{i}.png").read_bytes()), original) >= RECONSTRUCTION_PSNR_DB
    latent = ok(cli("invert", image_a, *m)).out
    varied = ok(cli("vary", "-", "-n", "3", "--eta", "1", "--seed", "4", *m, stdin=latent)).out
    from unclip_cli.io import split_pngs

    frames = [pixels(p) for p in split_pngs(varied, "<stdout>")]
    assert len(frames) == 3
    assert all(psnr(f, original) < RECONSTRUCTION_PSNR_DB for f in frames)
    assert np.abs(frames[0] - frames[1]).mean() > 0
    again = ok(cli("vary", "-", "-n", "3", "--eta", "1", "--seed", "4", *m, stdin=latent)).out
    assert again == varied  # same seed, same bytes
    fresh = ok(cli("vary", image_a, "-n", "2", "--fresh-noise", "--seed", "1", *m)).out
    assert len(split_pngs(fresh, "<stdout>")) == 2


def test_interpolate_invert_endpoints_reconstruct_the_inputs(cli, trained_set, image_a, image_b):
    m = ["--model", trained_set, "--steps", "8", "-q"]
    strip = ok(cli("interpolate", image_a, image_b, "-n", "4", "--invert", *m)).out
    frames = strip_frames(strip, 4)
    assert psnr(frames[0], pixels(image_a.read_bytes())) >= RECONSTRUCTION_PSNR_DB
    assert psnr(frames[-1], pixels(image_b.read_bytes())) >= RECONSTRUCTION_PSNR_DB
    assert np.abs(frames[1] - frames[0]).mean() > 0 and np.abs(frames[2] - frames[3]).mean() > 0
    # latents from `invert` work the same, through a pipe
    latent_a = ok(cli("invert", image_a, *m)).out
    strip2 = ok(cli("interpolate", "-", image_b, "-n", "4", "--invert", *m, stdin=latent_a)).out
    assert psnr(strip_frames(strip2, 4)[0], frames[0]) >= RECONSTRUCTION_PSNR_DB
    fixed = ok(cli("interpolate", image_a, image_b, "-n", "3", "--fixed-noise", "--seed", "2", *m)).out
    assert png_size(fixed) == (3 * 64, 64)
    assert_user_error(cli("interpolate", image_a, image_b, "--invert", "--fixed-noise", *m), "exclude")


def test_interpolate_invert_needs_images_or_latents(cli, trained_set, image_a, tmp_path):
    m = ["--model", trained_set, "-q"]
    emb = ok(cli("encode-image", image_a, *m[:2])).out
    (tmp_path / "e.safetensors").write_bytes(emb)
    assert_user_error(cli("interpolate", image_a, tmp_path / "e.safetensors", "--invert", *m), "no x_T")


def test_text_diff_first_frame_is_the_image(cli, trained_set, image_a, tmp_path):
    m = ["--model", trained_set, "--steps", "8", "-q"]
    out = ok(cli("text-diff", image_a, "--from", "a red circle", "--to", "a blue square", "-n", "3",
                 "--max-theta", "0.5", *m)).out
    frames = strip_frames(out, 3)
    assert psnr(frames[0], pixels(image_a.read_bytes())) >= RECONSTRUCTION_PSNR_DB
    assert np.abs(frames[2] - frames[0]).mean() > 0
    ok(cli("text-diff", image_a, "--to", "a green star", "-n", "2", "-o", tmp_path / "td.gif", *m))  # empty --from
    assert Image.open(tmp_path / "td.gif").n_frames == 2
    assert_user_error(cli("text-diff", image_a, "--from", "a cat", "--to", "a cat", *m), "same CLIP text embedding")
    assert_user_error(cli("text-diff", image_a, "--to", "x", "--max-theta", "2", *m), "--max-theta")


def test_mix_cli_weights_images_and_text(cli, trained_set, image_a, image_b):
    m = ["--model", trained_set, "-q"]
    out = ok(cli("mix", image_a, image_b, "-w", "0.7,0.3", *m)).out
    t = load_st(out)
    ea = load_st(ok(cli("encode-image", image_a, *m[:2])).out)["image_embed"]
    eb = load_st(ok(cli("encode-image", image_b, *m[:2])).out)["image_embed"]
    torch.testing.assert_close(t["image_embed"], 0.7 * ea + 0.3 * eb)
    with_text = ok(cli("mix", image_a, "text:a red star", "--seed", "3", "--steps", "3", *m)).out
    assert load_st(with_text)["image_embed"].shape == (1, 32)
    assert png_size(ok(cli("decode", *m, "--seed", "0", stdin=with_text)).out) == (64, 64)
    assert_user_error(cli("mix", image_a, image_b, "-w", "1", *m), "--weights")
    assert_user_error(cli("mix", image_a, image_b, "-w", "a,b", *m), "--weights")


# ---------------------------------------------------------------------- best of K


def test_pick_best_keeps_the_largest_dot_product():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cands = torch.tensor([[[2.0, 0.0], [0.0, -1.0]], [[1.0, 0.0], [0.0, 3.0]]])  # (K=2, B=2, D)
    torch.testing.assert_close(pick_best(cands, text), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))


def _best_of_prior(prior, cond, null, *, candidates, seed):
    g = torch.Generator().manual_seed(seed)
    return best_of(lambda c, n: run_prior(prior, c, n, steps=4, guidance=2.0, generator=g), cond, null, candidates)


def test_candidates_2_picks_the_higher_scoring_sample(tiny_set):
    ms = ModelSet.open(str(tiny_set))
    prior, clip = ms.load("prior"), ms.load("clip")
    cond = TextCond(*clip.encode_text(["a red star", "a blue ring"]))
    null = empty_prompt(clip)
    best = _best_of_prior(prior, cond, null, candidates=2, seed=5)
    # the same draws, by hand: the K * B samples in one batch, rows grouped by prompt
    both = run_prior(prior, cond.repeat_interleave(2), null, steps=4, guidance=2.0, generator=torch.Generator().manual_seed(5))
    scores = (both * cond.embed.repeat_interleave(2, dim=0)).sum(-1).reshape(2, 2)
    chosen = both.reshape(2, 2, -1)[torch.arange(2), scores.argmax(1)]
    torch.testing.assert_close(best, chosen)
    assert not torch.equal(both[0], both[1])  # two different candidates to choose from
    one = _best_of_prior(prior, cond, null, candidates=1, seed=5)
    torch.testing.assert_close(one, run_prior(prior, cond, null, steps=4, guidance=2.0, generator=torch.Generator().manual_seed(5)))


def test_prior_candidates_cli(cli, tiny_set):
    m = ["--model", tiny_set]
    text = ok(cli("encode-text", "a red star", *m)).out
    out = ok(cli("prior", *m, "-k", "2", "--seed", "1", "--steps", "3", "-q", stdin=text)).out
    assert load_st(out)["image_embed"].shape == (1, 32)
    same = ok(cli("prior", *m, "-k", "1", "--seed", "1", "--steps", "3", "-q", stdin=text)).out
    plain = ok(cli("prior", *m, "--seed", "1", "--steps", "3", "-q", stdin=text)).out
    assert torch.equal(load_st(same)["image_embed"], load_st(plain)["image_embed"])
    assert_user_error(cli("prior", *m, "-k", "0", "-q", stdin=text), "--candidates")


def test_manipulations_refuse_bad_input(cli, trained_set, tmp_path):
    m = ["--model", trained_set, "-q"]
    (tmp_path / "junk.bin").write_bytes(b"not a file of any kind" * 4)
    assert_user_error(cli("invert", tmp_path / "junk.bin", *m), "junk.bin")
    assert_user_error(cli("vary", tmp_path / "junk.bin", *m), "junk.bin")
    assert_user_error(cli("vary", "-", *m, stdin=b""), "empty stdin")
    text = ok(cli("encode-text", "a red star", *m[:2])).out
    assert_user_error(cli("vary", "-", *m, stdin=text), "text conditioning")
    assert not any(p.name != "junk.bin" for p in tmp_path.iterdir())
