"""DDIM inversion: the x_T that deterministic DDIM (eta 0) takes back to a given x_0.

Pure maths on a `GaussianDiffusion` and a model function (x_t, t) -> output, as the samplers take
(no nn.Module, no I/O): each sampling step solved exactly for its x0 clamp (`solve_ddim_step`),
refined with secant-Newton iterations (`ddim_invert_exact`), on the latent path's timesteps
(`latent_timesteps`); `as_eps_model` lets an x0-predicting model invert through its eps form.
The network-level wrappers (`invert`, `decode_latent`, ...) are in stages/manipulate.py.
"""

from __future__ import annotations

import dataclasses

import torch

from unclip_cli.diffusion.samplers import Callback, ModelFn
from unclip_cli.diffusion.schedule import GaussianDiffusion, respaced_timesteps

# Inversion stops refining a step once DDIM from x_t lands this close to x_{t_prev} (pixels in [-1, 1]).
INVERT_TOLERANCE = 1e-5


def latent_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """The timesteps of the latent path (inversion, and every decode from an inverted x_T): the
    top `steps` levels of a `steps + 1` respacing, e.g. 25 -> [959, 919, ..., 0].

    The usual grid starts at t = 999, where alpha_bar ~ 2e-9: there the x0-clamped DDIM step is a
    near-step function of x_t wherever predicted x0 changes sign, values no x_T reaches, and the
    unclamped one amplifies eps errors ~3500 times. One level lower (alpha_bar ~ 4e-3 at 959) the
    step is well conditioned and inversion converges (DDIM inversion practice: diffusers' DDIM
    schedules also start below 999). x_T there is still noise-like (std ~1).
    """
    return respaced_timesteps(steps + 1, num_timesteps)[1:]


def as_eps_model(model_fn: ModelFn, diffusion: GaussianDiffusion) -> tuple[ModelFn, GaussianDiffusion]:
    """An x0-predicting model as the eps model with the same DDIM steps (eps = (x_t - sqrt(abar) x0) /
    sqrt(1 - abar), x0 unclamped; the chain's clamp then acts on the same x0); eps models unchanged."""
    if diffusion.config.prediction == "eps":
        return model_fn, diffusion

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        return diffusion.predict_eps_from_x0(x, t, model_fn(x, t)[:, : x.shape[1]])  # variance channels dropped

    eps_config = dataclasses.replace(diffusion.config, prediction="eps", variance="fixed_small_log")
    return eps_fn, GaussianDiffusion.from_config(eps_config)


def solve_ddim_step(
    diffusion: GaussianDiffusion, eps: torch.Tensor, slope: float, x: torch.Tensor, x_prev: torch.Tensor, t: int, t_prev: int
) -> torch.Tensor:
    """The x_t that the DDIM step t -> t_prev (eta 0, x0 clamped) takes to x_prev, eps linearized around x.

    With eps(x') ~= eps + slope * (x' - x), the step is, pixel by pixel, an increasing piecewise-linear
    function of x' (three pieces: x0 clamped low, free, clamped high), so it has one solution, found
    here in closed form. slope = 0 is the classic inversion step with the clamp respected.
    """
    r = diffusion.config.clip_range
    s0, s1 = diffusion.alpha_bar(t).sqrt(), (1 - diffusion.alpha_bar(t)).sqrt()
    p0, p1 = diffusion.alpha_bar(t_prev).sqrt(), (1 - diffusion.alpha_bar(t_prev)).sqrt()
    lam = 1 - s1 * slope  # d(predicted x0)/dx' * s0, > 0
    eps0 = eps - slope * x  # eps(x') = eps0 + slope * x'
    k = p0 - p1 * s0 / s1  # > 0: abar falls with t
    free = (x_prev + k * s1 * eps0 / s0) / (p1 / s1 + k * lam / s0)
    if r is None or p1 == 0:  # no clamp, or the last step (its output is the clamped x0 itself)
        return free
    x0 = (lam * free - s1 * eps0) / s0
    c = x0.clamp(-r, r)
    clamped = (s1 / p1) * (x_prev - p0 * c) + s0 * c  # the step with x0 = c is affine in x'
    return torch.where(x0.abs() > r, clamped, free)


def ddim_invert_exact(
    model_fn: ModelFn,
    x0: torch.Tensor,
    diffusion: GaussianDiffusion,
    timesteps: list[int],
    *,
    refine: int = 3,
    callback: Callback | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """DDIM inversion x_0 -> x_T that solves each sampling step instead of assuming eps constant across it.

    Plain inversion (Song et al. 2020, sec. 4.3) evaluates eps at x_{t_prev} where the sampler will
    evaluate it at x_t. Here each step starts from that estimate and takes up
    to `refine` secant-Newton iterations on "DDIM from x_t lands on x_{t_prev}" (fixed-point inversion,
    as in Pan et al. 2023, "Effective real image editing with accelerated iterative diffusion
    inversion", with the x0 clamp solved exactly and one secant slope for eps). refine = 0 is the
    plain inversion, clamp-aware. Returns x_T and, per step, the largest |DDIM(x_t) - x_{t_prev}|.
    Cost: 1 + (refine + 1) model calls per step at most (a step stops refining at INVERT_TOLERANCE).
    """
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    ts = [int(t) for t in timesteps]
    levels = [-1] + ts[::-1]  # -1 (clean), then ascending
    channels = x0.shape[1]
    y = x0
    eps = model_fn(y, 0)[:, :channels]
    slope = 0.0  # secant estimate of d eps / d x, carried from step to step
    residuals = []
    for i, (t_prev, t) in enumerate(zip(levels, levels[1:])):
        s1 = float((1 - diffusion.alpha_bar(t)).sqrt())
        x = solve_ddim_step(diffusion, eps, 0.0, y, y, t, t_prev)
        best, prev = None, None
        for k in range(refine + 1):
            out = model_fn(x, t)
            e = out[:, :channels]
            landed, _ = diffusion.ddim_step(out, x, t, t_prev, 0.0, None)
            res = float((landed - y).abs().max())
            improved = best is None or res < best[0]
            if improved:
                best = (res, x, e)
            if k == refine or res <= INVERT_TOLERANCE:
                break
            if improved and prev is not None:  # secant slope of eps along the last move
                dx, de = x - prev[0], e - prev[1]
                den = float((dx * dx).sum())
                if den > 0:
                    slope = min(max(float((de * dx).sum()) / den, -1.0 / s1), (1 - 1e-4) / s1)
            elif not improved:  # the secant step made it worse: back to the best x, plain fixed-point step
                if slope == 0.0:
                    break
                slope, x, e = 0.0, best[1], best[2]
            prev = (x, e)
            x = solve_ddim_step(diffusion, e, slope, x, y, t, t_prev)
        res, y, eps = best
        residuals.append(res)
        if callback is not None:
            callback(i, len(ts))
    return y, residuals
