"""The paper's image manipulations on the bipartite latent (z_i, x_T) (Ramesh et al. 2022, section 3).

z_i is the CLIP image embedding, x_T the decoder's initial noise that DDIM with eta = 0 turns back
into the image. Tensors in, tensors out, given the networks: inversion, variations, text diffs,
linear mixes, and best-of-K prior sampling. No I/O, no progress bars (samplers take a callback).
The inversion maths (the DDIM step solver, the latent path's timesteps) is diffusion/inversion.py's;
image tensor helpers (`fit_image`, `psnr`, `downscale`) are in stages/images.py.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from unclip_cli.device import Generators
from unclip_cli.diffusion.inversion import as_eps_model, ddim_invert_exact, latent_timesteps
from unclip_cli.diffusion.samplers import Callback
from unclip_cli.diffusion.schedule import GaussianDiffusion
from unclip_cli.models.decoder import Decoder
from unclip_cli.stages.conditioning import TextCond
from unclip_cli.stages.decode import decoder_model_fn, run_decoder
from unclip_cli.stages.interpolate import slerp
from unclip_cli.stages.prior import pick_best


# ---------------------------------------------------------------------- DDIM inversion


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
    generator: Generators,
    callback: Callback | None = None,
) -> torch.Tensor:
    """n variations of each of B latents: (B, D), x_T (B, C, S, S) or None (fresh noise) -> (B * n, 3, S, S).

    DDIM with eta > 0 from the image's own x_T (the paper's variations); eta = 0 gives the image back.
    Rows are grouped by input: variations 0..n-1 of the first, then of the second... (a list of B
    generators: each draws its input's n rows).
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
    generator: Generators = None,
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
