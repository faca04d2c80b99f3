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
    device, dtype = prior.x_proj.weight.device, prior.x_proj.weight.dtype  # the data statistics stay float32
    batch = len(cond)
    guidance = Guidance.of(guidance)
    batched = guidance.batched  # run the [uncond; cond] batch
    diffusion = GaussianDiffusion.from_config(prior.cfg.diffusion)
    timesteps = respaced_timesteps(steps, diffusion.num_timesteps)
    cond = cond.to(device)
    both = TextCond.cat(null.to(device).expand(batch), cond) if batched else cond
    # inputs in the network's precision, outputs back to float32: the sampler's state stays float32
    embed, hidden = both.embed.to(dtype), both.hidden.to(dtype)
    # The caption's keys and values are the same at every step: computed once, unless the network is
    # float32, where the shorter matmuls change the last bits and Karlo parity (diffusers' full forward) rules.
    prefix = prior.prefix(embed, hidden, both.mask) if dtype != torch.float32 else None

    def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        x_in = (torch.cat([x, x]) if batched else x).to(dtype)
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.long, device=device)
        out = prior(x_in, t_in, embed, hidden, both.mask) if prefix is None else prior.step(x_in, t_in, prefix)
        out = out.float()  # (2B or B, D)
        return guidance.combine(*guidance.split(out)) if batched else out

    x_T = draw_noise((batch, prior.cfg.embed_dim), generator, device)
    x0 = sample_ancestral(model_fn, x_T, diffusion, timesteps, generator=generator, callback=callback)
    return prior.denormalize(x0)


def pick_best(candidates: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """Of K candidates per prompt (K, B, D), keep the one with the largest dot product with the text embedding."""
    scores = (candidates * text_embed[None]).sum(-1)  # (K, B)
    best = scores.argmax(0)  # (B,)
    return candidates[best, torch.arange(candidates.shape[1])]
