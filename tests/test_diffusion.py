"""Diffusion core: schedule, q_sample, ancestral / DDIM steps, against closed forms and diffusers' UnCLIPScheduler."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UnCLIPScheduler
from diffusers.utils.torch_utils import randn_tensor

from unclip_cli.diffusion.inversion import INVERT_TOLERANCE, ddim_invert_exact, latent_timesteps
from unclip_cli.diffusion.samplers import draw_noise, sample_ancestral, sample_ddim
from unclip_cli.diffusion.schedule import GaussianDiffusion, cosine_betas, respaced_timesteps
from unclip_cli.models.configs import DiffusionConfig

KARLO_25 = [999, 957, 916, 874, 832, 791, 749, 708, 666, 624, 583, 541, 500,
            458, 416, 375, 333, 291, 250, 208, 166, 125, 83, 42, 0]  # fmt: skip


def alpha_bar64(s: float) -> float:
    """Cosine alpha_bar(s), s in [0, 1], in float64 (Nichol & Dhariwal 2021, eq. 17)."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def betas64(T: int = 1000) -> torch.Tensor:
    return torch.tensor([min(1 - alpha_bar64((i + 1) / T) / alpha_bar64(i / T), 0.999) for i in range(T)],
                        dtype=torch.float64)


def abar64(T: int = 1000) -> torch.Tensor:
    return torch.cumprod(1 - betas64(T), dim=0)


def abar_at(abar: torch.Tensor, t: int) -> float:
    return 1.0 if t < 0 else abar[t].item()


def fake_model(out_channels: int, in_channels: int, seed: int = 0):
    """A deterministic stand-in for a network: a fixed random linear map of x (over dim 1) that depends on t."""
    w = torch.randn(out_channels, in_channels, generator=torch.Generator().manual_seed(seed)) * 0.5

    def model_fn(x: torch.Tensor, t) -> torch.Tensor:
        t = int(t)
        return torch.einsum("oc,bc...->bo...", w, x) * (0.3 + t / 1000) + 0.1 * math.sin(t)

    return model_fn


# ---- schedule ---------------------------------------------------------------------------------


def test_respaced_timesteps_karlo():
    assert respaced_timesteps(7) == [999, 832, 666, 500, 333, 166, 0]
    assert respaced_timesteps(25) == KARLO_25
    assert respaced_timesteps(1000) == list(range(999, -1, -1))
    assert respaced_timesteps(2, 50) == [49, 0]
    for n in (7, 25, 27, 64, 250):
        sch = UnCLIPScheduler()
        sch.set_timesteps(n)
        assert respaced_timesteps(n) == sch.timesteps.tolist()


@pytest.mark.parametrize("n", [-3, 0, 1, 1001])
def test_respaced_timesteps_rejects_bad_counts(n):
    with pytest.raises(ValueError, match="between 2 and 1000"):
        respaced_timesteps(n)


def test_cosine_betas_pinned():
    betas = cosine_betas()
    assert betas.dtype == torch.float32 and betas.shape == (1000,)
    pinned = {0: 4.128422482196914e-05, 1: 4.614175273665033e-05, 500: 0.003155691441585007,
              900: 0.01974185587243449, 998: 0.7499993929011166}  # float64 closed form, computed once
    for i, value in pinned.items():
        closed = 1 - alpha_bar64((i + 1) / 1000) / alpha_bar64(i / 1000)
        assert closed == pytest.approx(value, rel=1e-12)
        assert betas[i].item() == torch.tensor(value, dtype=torch.float32).item()
    # alpha_bar(1) = 0, so the last beta would be 1: it is clipped to max_beta
    assert betas[-1].item() == torch.tensor(0.999, dtype=torch.float32).item()
    assert (betas[:-1] < 0.99).all()
    clipped = cosine_betas(max_beta=0.5)
    unclipped = [1 - alpha_bar64((i + 1) / 1000) / alpha_bar64(i / 1000) for i in range(1000)]
    assert torch.equal(clipped, torch.tensor([min(b, 0.5) for b in unclipped], dtype=torch.float32))
    assert (clipped == 0.5).sum().item() == 3  # betas 997 (0.56), 998 (0.75) and 999 (1.0)
    assert torch.equal(betas, UnCLIPScheduler().betas)


def test_alphas_cumprod_against_float64():
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    assert diffusion.alphas_cumprod.dtype == torch.float32
    assert torch.equal(diffusion.alphas, 1 - diffusion.betas)
    torch.testing.assert_close(diffusion.alphas_cumprod.double(), abar64(), rtol=5e-5, atol=0)
    assert torch.equal(diffusion.alphas_cumprod, UnCLIPScheduler().alphas_cumprod)


def test_posterior_variance_respaced_step():
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    # against the closed form (exact alpha_bar) away from t = 0, where 1 - abar in float32 is exact
    # enough; near t = 0 against float64 maths on the stored float32 schedule, with the tolerance
    # float32 cancellation (1 - abar ~ 1e-4, ulp(1) = 6e-8) leaves
    for abar, cases, rel in [
        (abar64(), [(832, 666), (999, 957), (500, 333), (333, 166)], 1e-4),
        (diffusion.alphas_cumprod.double(), [(166, 0), (42, 0), (2, 0)], 1e-3),
    ]:
        for t, t_prev in cases:
            a_t, a_prev = abar[t].item(), abar[t_prev].item()
            beta = 1 - a_t / a_prev  # the respaced beta, not betas[t]
            var = (1 - a_prev) / (1 - a_t) * beta
            assert diffusion.step_beta(t, t_prev)[0].item() == pytest.approx(beta, rel=rel)
            assert diffusion.posterior_variance(t, t_prev).item() == pytest.approx(var, rel=rel)
            std = torch.exp(0.5 * diffusion.p_log_variance(t, t_prev)).item()  # fixed_small_log
            assert std == pytest.approx(math.sqrt(var), rel=rel)
    # an unskipped step keeps the stored beta; the last step (0 -> -1) has zero posterior variance
    assert diffusion.step_beta(500, 499)[0] is not None
    assert diffusion.step_beta(500, 499)[0].item() == diffusion.betas[500].item()
    assert diffusion.posterior_variance(0, -1).item() == 0.0
    assert diffusion.p_log_variance(0, -1).item() == pytest.approx(math.log(1e-20))


def test_q_sample_closed_form():
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g)  # (B, C, H, W)
    noise = torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    stored = torch.cumprod(1 - diffusion.betas.double(), 0)  # abar of the stored float32 betas, in float64
    for abar, atol in [(abar64(), 1e-4), (stored, 2e-6)]:  # closed form; stored schedule
        a = abar[t].view(-1, 1, 1, 1)
        expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
        torch.testing.assert_close(x_t.double(), expected, rtol=0, atol=atol)
    # the training numbers: sqrt(abar) and sqrt(1 - abar) in float64, stored as float32
    a = stored[t].view(-1, 1, 1, 1)
    assert torch.equal(x_t, a.sqrt().float() * x0 + (1 - a).sqrt().float() * noise)
    # diffusers' add_noise does the same in float32: equal to the last bits of sqrt(abar)
    torch.testing.assert_close(x_t, UnCLIPScheduler().add_noise(x0, noise, t), rtol=0, atol=2e-5)
    flat = diffusion.q_sample(x0.flatten(1), t, noise.flatten(1))  # (B, D): prior embeddings
    assert torch.equal(flat, x_t.flatten(1))


# ---- ancestral sampling: parity with diffusers ------------------------------------------------

KARLO_SETTINGS = {
    "prior": (DiffusionConfig(prediction="x0", variance="fixed_small_log", clip_range=5.0), 25, (2, 16), 16),
    "decoder": (DiffusionConfig(prediction="eps", variance="learned_range", clip_range=1.0), 25, (2, 3, 8, 8), 6),
    "super_res": (DiffusionConfig(prediction="eps", variance="fixed_small_log", clip_range=1.0), 7, (2, 3, 8, 8), 3),
    # every step unskipped (t_prev = t - 1, stored betas), no clamp
    "unskipped": (DiffusionConfig(num_timesteps=50, prediction="eps", clip_range=None), 50, (2, 3, 4, 4), 3),
}


def diffusers_scheduler(config: DiffusionConfig, steps: int) -> UnCLIPScheduler:
    sch = UnCLIPScheduler(
        num_train_timesteps=config.num_timesteps,
        variance_type=config.variance,
        clip_sample=config.clip_range is not None,
        clip_sample_range=config.clip_range,
        prediction_type={"eps": "epsilon", "x0": "sample"}[config.prediction],
    )
    sch.set_timesteps(steps)
    return sch


@pytest.mark.parametrize("name", list(KARLO_SETTINGS))
def test_ancestral_matches_diffusers(name):
    config, steps, shape, out_channels = KARLO_SETTINGS[name]
    model_fn = fake_model(out_channels, shape[1])
    sch = diffusers_scheduler(config, steps)
    diffusion = GaussianDiffusion.from_config(config)
    timesteps = respaced_timesteps(steps, config.num_timesteps)
    assert timesteps == sch.timesteps.tolist()

    # the UnCLIPPipeline loop, step by step in lockstep with ours
    g_ref, g_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x_ref = randn_tensor(shape, generator=g_ref, device=torch.device("cpu"), dtype=torch.float32)
    x = draw_noise(shape, g_ours, "cpu")
    assert torch.equal(x, x_ref)
    x_T = x.clone()
    for i, t in enumerate(sch.timesteps):
        prev = None if i + 1 == len(sch.timesteps) else sch.timesteps[i + 1]
        ref = sch.step(model_fn(x_ref, t), t, x_ref, prev_timestep=prev, generator=g_ref)
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        noise = draw_noise(shape, g_ours, "cpu") if timesteps[i] > 0 else None
        x, x0 = diffusion.step(model_fn(x, timesteps[i]), x, timesteps[i], t_prev, noise)
        assert torch.equal(x0, ref.pred_original_sample), f"pred_x0 differs at step {i}"
        assert torch.equal(x, ref.prev_sample), f"x_prev differs at step {i} (max {(x - ref.prev_sample).abs().max()})"
        x_ref = ref.prev_sample
    assert torch.equal(g_ours.get_state(), g_ref.get_state())  # same number of draws, no noise at t = 0

    # the packaged loop gives the same samples, and calls back once per step
    calls = []
    g = torch.Generator().manual_seed(1)
    x_T2 = draw_noise(shape, g, "cpu")
    out = sample_ancestral(
        model_fn, x_T2, diffusion, timesteps, generator=g, callback=lambda i, n: calls.append((i, n))
    )
    assert torch.equal(x_T2, x_T)
    assert torch.equal(out, x_ref)
    assert calls == [(i, steps) for i in range(steps)]
    assert torch.isfinite(out).all() and out.abs().max() > 0.05


def test_last_step_scales_x0_like_diffusers():
    """The step 0 -> -1 returns beta_0 / (1 - abar_0) * x0, which float32 rounding puts at 0.99947, not 1."""
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(prediction="x0", clip_range=1.0))
    x0 = torch.full((1, 4), 3.0)
    x, pred_x0 = diffusion.step(x0, torch.zeros(1, 4), 0, -1, None)
    coef = (diffusion.betas[0] / (1 - diffusion.alphas_cumprod[0])).item()
    assert torch.equal(pred_x0, torch.ones(1, 4))
    assert x[0, 0].item() == pytest.approx(coef, rel=1e-7) and 0.999 < coef < 1.0


def test_step_rejects_bad_inputs():
    decoder = GaussianDiffusion.from_config(DiffusionConfig(variance="learned_range"))
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="6 channels"):
        decoder.step(torch.zeros(1, 3, 2, 2), x, 500, 400, torch.zeros_like(x))
    with pytest.raises(ValueError, match="needs noise"):
        decoder.step(torch.zeros(1, 6, 2, 2), x, 500, 400, None)
    with pytest.raises(ValueError, match="t_prev < t"):
        decoder.step(torch.zeros(1, 6, 2, 2), x, 400, 500, torch.zeros_like(x))
    with pytest.raises(ValueError, match="cosine"):
        GaussianDiffusion.from_config(DiffusionConfig(schedule="linear"))


# ---- DDIM ---------------------------------------------------------------------------------------


def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    config, steps, shape, out_channels = KARLO_SETTINGS["decoder"]
    diffusion = GaussianDiffusion.from_config(config)
    model_fn = fake_model(out_channels, shape[1])
    x_T = draw_noise(shape, torch.Generator().manual_seed(3), "cpu")
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    a = sample_ddim(model_fn, x_T, diffusion, respaced_timesteps(steps), eta=0.0, generator=g)
    assert torch.equal(g.get_state(), state)
    other = torch.Generator().manual_seed(9)
    b = sample_ddim(model_fn, x_T, diffusion, respaced_timesteps(steps), eta=0.0, generator=other)
    assert torch.equal(a, b)
    # eta > 0 draws one noise per step except the last (t_prev = -1)
    sample_ddim(model_fn, x_T, diffusion, respaced_timesteps(steps), eta=1.0, generator=g)
    ref = torch.Generator().manual_seed(5)
    for _ in range(steps - 1):
        torch.randn(shape, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_ddim_step_against_float64():
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(prediction="eps", clip_range=1.0))
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 4, 4, generator=g)
    eps = torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    abar = diffusion.alphas_cumprod.double()  # the stored schedule, maths in float64
    for t, t_prev, eta in [(666, 500, 0.7), (500, 333, 0.0), (166, 0, 1.0), (42, -1, 0.5)]:
        x_prev, x0 = diffusion.ddim_step(eps, x_t, t, t_prev, eta, noise if t_prev >= 0 else None)
        a_t, a_prev = abar[t].item(), abar_at(abar, t_prev)
        x0_64 = ((x_t.double() - math.sqrt(1 - a_t) * eps.double()) / math.sqrt(a_t)).clamp(-1, 1)
        eps_64 = (x_t.double() - math.sqrt(a_t) * x0_64) / math.sqrt(1 - a_t)  # re-derived from the clamped x0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        direction = math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps_64
        expected = math.sqrt(a_prev) * x0_64 + direction + sigma * noise.double()
        assert (x0_64.abs() == 1).any() or t < 100  # the clamp is exercised at high t
        torch.testing.assert_close(x0.double(), x0_64, rtol=0, atol=1e-5)
        torch.testing.assert_close(x_prev.double(), expected, rtol=0, atol=1e-5)


def test_ddim_eta1_equals_ancestral_fixed_small():
    """With eta = 1, DDIM's sigma is the posterior std and its mean the posterior mean (Song et al. 2020, sec. 4.1)."""
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(prediction="eps", clip_range=1.0))
    g = torch.Generator().manual_seed(0)
    x_t, eps, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    # not from t = 999: there the respaced alpha = 1 - beta is ~1 ulp in float32 (see the report)
    for t, t_prev in [(957, 832), (500, 333), (166, 0)]:
        ddim, _ = diffusion.ddim_step(eps, x_t, t, t_prev, 1.0, noise)
        ddpm, _ = diffusion.step(eps, x_t, t, t_prev, noise)
        torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-5)


def test_ddim_ignores_learned_variance_channels():
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(variance="learned_range", clip_range=1.0))
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    a, _ = diffusion.ddim_step(torch.cat([eps, torch.zeros_like(eps)], 1), x_t, 500, 333, 0.0, None)
    b, _ = diffusion.ddim_step(torch.cat([eps, torch.ones_like(eps)], 1), x_t, 500, 333, 0.0, None)
    c, _ = diffusion.ddim_step(torch.cat([-eps, torch.ones_like(eps)], 1), x_t, 500, 333, 0.0, None)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("variance", ["fixed_small_log", "learned_range"])
@pytest.mark.parametrize("refine", [0, 3])
def test_ddim_invert_round_trip(variance, refine):
    """A model that knows the true noise of (x0, eps): inversion lands on q(x_T | x0), DDIM brings back x0.

    On the latent path's timesteps (from 959: at 999, 1 / sqrt(abar) ~ 2e4 amplifies the float32
    rounding of the schedule's coefficients to ~1e-2 on x0, whatever the dtype of x).
    """
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(prediction="eps", variance=variance, clip_range=1.0))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 1.8 - 0.9  # (B, C, H, W) in the clip range
    eps = torch.randn(2, 3, 8, 8, generator=g)
    v = torch.zeros_like(eps)
    calls = []
    for dtype in (torch.float64, torch.float32):
        e = eps.to(dtype)

        def model_fn(x, t):
            calls.append(t)
            return torch.cat([e, v.to(dtype)], 1) if variance == "learned_range" else e

        for steps in (7, 25):
            timesteps = latent_timesteps(steps)
            calls.clear()
            x_T, residuals = ddim_invert_exact(model_fn, x0.to(dtype), diffusion, timesteps, refine=refine)
            # the clean sample at t = 0, then x_t at each timestep, ascending: eps is exact, no step refines
            assert calls == [0] + timesteps[::-1] and len(residuals) == steps
            assert max(residuals) <= INVERT_TOLERANCE
            a_T = diffusion.alphas_cumprod[timesteps[0]].double()
            expected = a_T.sqrt() * x0.double() + (1 - a_T).sqrt() * eps.double()
            torch.testing.assert_close(x_T.double(), expected, rtol=0, atol=1e-6)
            back = sample_ddim(model_fn, x_T, diffusion, timesteps, eta=0.0)
            torch.testing.assert_close(back.double(), x0.double(), rtol=0, atol=2e-5)
