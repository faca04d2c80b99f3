"""The paper's image manipulations on the bipartite latent (z_i, x_T) (Ramesh et al. 2022, section 3).

z_i is the CLIP image embedding, x_T the decoder's initial noise that DDIM with eta = 0 turns back
into the image. Tensors in, tensors out: inversion, variations, text diffs, linear mixes, and
best-of-K prior sampling. No I/O, no progress bars (samplers take a callback).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from unclip_cli.diffusion.samplers import Callback, ModelFn
from unclip_cli.diffusion.schedule import GaussianDiffusion, respaced_timesteps
from unclip_cli.models.decoder import Decoder
from unclip_cli.stages.conditioning import TextCond
from unclip_cli.stages.decode import decoder_model_fn, run_decoder
from unclip_cli.stages.interpolate import slerp
from unclip_cli.stages.prior import pick_best

# Inversion stops refining a step once DDIM from x_t lands this close to x_{t_prev} (pixels in [-1, 1]).
INVERT_TOLERANCE = 1e-5


# ---------------------------------------------------------------------- DDIM inversion


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

    Plain inversion (Song et al. 2020, sec. 4.3; `samplers.ddim_invert`) evaluates eps at x_{t_prev}
    where the sampler will evaluate it at x_t. Here each step starts from that estimate and takes up
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


def fit_image(x: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> (3, size, size): shortest side to size (bicubic, antialiased), centre crop."""
    _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top : top + size, left : left + size].clamp(-1, 1)


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


@torch.no_grad()
def invert(
    decoder: Decoder,
    images: torch.Tensor,
    image_embed: torch.Tensor,
    cond: TextCond,
    null: TextCond,
    *,
    steps: int,
    guidance: float,
    refine: int = 3,
    callback: Callback | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Images (B, 3, S, S) in [-1, 1] with their CLIP embeddings (B, D) -> x_T (B, 3, S, S), per-step residuals.

    DDIM (eta 0) over `latent_timesteps(steps)` from x_T, with the same guidance and conditioning,
    gives the images back, as closely as the decoder's DDIM steps can be solved (see
    ddim_invert_exact).
    """
    device = next(decoder.parameters()).device
    model_fn, diffusion = as_eps_model(
        decoder_model_fn(decoder, image_embed, cond, null, guidance), GaussianDiffusion.from_config(decoder.cfg.diffusion)
    )
    timesteps = latent_timesteps(steps, diffusion.num_timesteps)
    x_T, residuals = ddim_invert_exact(
        model_fn, images.to(device).float(), diffusion, timesteps, refine=refine, callback=callback
    )
    return x_T, residuals


# ---------------------------------------------------------------------- variations, interpolation, text diffs, mixes


@torch.no_grad()
def vary(
    decoder: Decoder,
    image_embed: torch.Tensor,
    x_T: torch.Tensor | None,
    null: TextCond,
    *,
    n: int,
    eta: float,
    steps: int,
    guidance: float,
    generator: torch.Generator | None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """n variations of each of B latents: (B, D), x_T (B, C, S, S) or None (fresh noise) -> (B * n, 3, S, S).

    DDIM with eta > 0 from the image's own x_T (the paper's variations); eta = 0 gives the image back.
    Rows are grouped by input: variations 0..n-1 of the first, then of the second...
    """
    batch = image_embed.shape[0]
    embeds = image_embed.repeat_interleave(n, dim=0)  # (B * n, D)
    null = null if len(null) == batch * n else null.expand(batch * n)  # one row, or one per output
    if x_T is None:
        return run_decoder(
            decoder, embeds, null, null, steps=steps, guidance=guidance, generator=generator, eta=eta, callback=callback
        )
    return decode_latent(
        decoder, embeds, x_T.repeat_interleave(n, dim=0), null, steps=steps, guidance=guidance, eta=eta,
        generator=generator, callback=callback,
    )


@torch.no_grad()
def decode_latent(
    decoder: Decoder,
    image_embed: torch.Tensor,
    x_T: torch.Tensor,
    null: TextCond,
    *,
    steps: int,
    guidance: float,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Decode latents (z_i (B, D), x_T (B, C, S, S)) with DDIM over latent_timesteps, empty text.

    With eta = 0 and the steps and guidance of the inversion, this is the inverse of `invert`.
    """
    batch = image_embed.shape[0]
    null = null if len(null) == batch else null.expand(batch)
    return run_decoder(
        decoder, image_embed, null, null, steps=steps, guidance=guidance, generator=generator, eta=eta,
        x_T=x_T.contiguous(), timesteps=latent_timesteps(steps, decoder.cfg.diffusion.num_timesteps),
        callback=callback,
    )


def slerp_frames(a: torch.Tensor, b: torch.Tensor, frames: int) -> torch.Tensor:
    """frames points on the slerp from a to b, endpoints included: (1, ...) each -> (frames, ...).

    Works on the whole flattened tensor, so it serves image embeddings (1, D) and noises (1, C, H, W).
    """
    flat_a, flat_b = a.reshape(1, -1), b.reshape(1, -1)
    ts = [i / (frames - 1) for i in range(frames)]
    return torch.cat([slerp(flat_a, flat_b, t) for t in ts]).reshape(frames, *a.shape[1:])


def text_diff(
    image_embed: torch.Tensor, from_text: torch.Tensor, to_text: torch.Tensor, thetas: Sequence[float]
) -> torch.Tensor:
    """The paper's text diff: z_d = normalize(z_t(to) - z_t(from)), frames slerp(z_i, z_d, theta).

    image_embed (1, D); from_text, to_text (1, D) CLIP text embeddings -> (len(thetas), D).
    The paper slerps unit vectors; here z_d is scaled to |z_i| before the slerp, so every frame keeps
    the norm of the image embedding the decoder was trained on, and theta = 0 is z_i exactly.
    """
    diff = (to_text - from_text).double()
    norm = diff.norm(dim=-1, keepdim=True)
    if float(norm.min()) < 1e-6 * float(to_text.double().norm()):
        raise ValueError("the two captions have the same CLIP text embedding")
    z_d = (diff / norm * image_embed.double().norm(dim=-1, keepdim=True)).to(image_embed.dtype)  # (1, D)
    return torch.cat([slerp(image_embed, z_d, float(theta)) for theta in thetas])


def mix(embeds: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """A linear combination sum_k w_k z_k of K embeddings (K, D) -> (1, D), as Kandinsky 2.2's `interpolate`.

    Linear, not spherical: mixing two different directions shortens the vector (slerp does not);
    weights are used as given (not renormalized).
    """
    if embeds.shape[0] != len(weights):
        raise ValueError(f"{embeds.shape[0]} embeddings but {len(weights)} weights")
    w = torch.tensor(list(weights), dtype=torch.float64)
    return (w[:, None] * embeds.double()).sum(0, keepdim=True).to(embeds.dtype)


# ---------------------------------------------------------------------- best of K prior samples (the paper draws 2)


def best_of(sample: Callable[[TextCond, TextCond], torch.Tensor], cond: TextCond, null: TextCond, candidates: int) -> torch.Tensor:
    """K samples per prompt from any prior (`sample(cond, null)` -> (B', D)), the best kept by pick_best.

    The K * B samples run as one batch, rows grouped by prompt (the K candidates of prompt 0, then of
    prompt 1...), so their noise is drawn in one go; K = 1 is a plain `sample(cond, null)`.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if candidates == 1:
        return sample(cond, null)
    batch = len(cond)
    if len(null) > 1:  # one empty-prompt row per prompt: one per sample
        null = null.repeat_interleave(candidates)
    samples = sample(cond.repeat_interleave(candidates), null)  # (B * K, D)
    per_prompt = samples.reshape(batch, candidates, -1).transpose(0, 1)  # (K, B, D)
    return pick_best(per_prompt, cond.embed.to(samples.device))
