"""Prior stage: text conditioning -> CLIP image embedding (diffusion prior, x0 prediction, guided)."""

from __future__ import annotations

from typing import Callable

import torch

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
    guidance: float,
    generator: torch.Generator | None,
    guided: bool | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sample image embeddings (B, D) for B text conditions, as UnCLIPPipeline's prior loop.

    guided: run the [uncond; cond] batch (default: guidance > 1); `generate` forces it when the
    decoder is guided, as diffusers does.
    """
    device = next(prior.parameters()).device
    batch = len(cond)
    guided = guidance > 1.0 if guided is None else guided
    diffusion = GaussianDiffusion.from_config(prior.cfg.diffusion)
    timesteps = respaced_timesteps(steps, diffusion.num_timesteps)
    cond = cond.to(device)
    both = TextCond.cat(null.to(device).expand(batch), cond) if guided else cond

    def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        x_in = torch.cat([x, x]) if guided else x
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.long, device=device)
        out = prior(x_in, t_in, both.embed, both.hidden, both.mask)
        if guided:
            uncond, text = out.chunk(2)
            out = uncond + guidance * (text - uncond)
        return out

    x_T = draw_noise((batch, prior.cfg.embed_dim), generator, device)
    x0 = sample_ancestral(model_fn, x_T, diffusion, timesteps, generator=generator, callback=callback)
    return prior.denormalize(x0)


def pick_best(candidates: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """Of K candidates per prompt (K, B, D), keep the one with the largest dot product with the text embedding."""
    scores = (candidates * text_embed[None]).sum(-1)  # (K, B)
    best = scores.argmax(0)  # (B,)
    return candidates[best, torch.arange(candidates.shape[1])]
