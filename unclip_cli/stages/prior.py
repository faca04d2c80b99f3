"""Prior stage: text conditioning -> CLIP image embedding (diffusion prior, x0 prediction, guided)."""

from __future__ import annotations

from typing import Callable

import torch

from unclip_cli.diffusion.guidance import Guidance
from unclip_cli.diffusion.samplers import draw_noise, sample_ancestral
from unclip_cli.diffusion.schedule import GaussianDiffusion, respaced_timesteps
from unclip_cli.models.prior import DiffusionPrior
from unclip_cli.stages.conditioning import TextCond


@torch.no_grad()
def run_prior(
    prior: DiffusionPrior,
    cond: TextCond,
    null: TextCond,
    *,
    steps: int,
    guidance: float | Guidance,
    generator: torch.Generator | None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sample image embeddings (B, D) for B text conditions, as UnCLIPPipeline's prior loop.

    guidance: a scale (the [uncond; cond] batch runs when it is not 1) or a `Guidance` that says
    whether it runs (`Guidance.diffusers_pair`, for Karlo parity).
    """
    device = next(prior.parameters()).device
    batch = len(cond)
    guidance = Guidance.of(guidance)
    batched = guidance.batched  # run the [uncond; cond] batch
    diffusion = GaussianDiffusion.from_config(prior.cfg.diffusion)
    timesteps = respaced_timesteps(steps, diffusion.num_timesteps)
    cond = cond.to(device)
    both = TextCond.cat(null.to(device).expand(batch), cond) if batched else cond

    def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        x_in = torch.cat([x, x]) if batched else x
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.long, device=device)
        out = prior(x_in, t_in, both.embed, both.hidden, both.mask)
        return guidance.combine(*guidance.split(out)) if batched else out

    x_T = draw_noise((batch, prior.cfg.embed_dim), generator, device)
    x0 = sample_ancestral(model_fn, x_T, diffusion, timesteps, generator=generator, callback=callback)
    return prior.denormalize(x0)


def pick_best(candidates: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """Of K candidates per prompt (K, B, D), keep the one with the largest dot product with the text embedding."""
    scores = (candidates * text_embed[None]).sum(-1)  # (K, B)
    best = scores.argmax(0)  # (B,)
    return candidates[best, torch.arange(candidates.shape[1])]
