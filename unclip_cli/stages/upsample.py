"""Upsampler stage: low-res image in [-1, 1] -> image of the upsampler's size (no text, no guidance)."""

from __future__ import annotations

from typing import Callable

import torch

from unclip_cli.diffusion.samplers import draw_noise, sample_ancestral
from unclip_cli.diffusion.schedule import GaussianDiffusion, respaced_timesteps
from unclip_cli.models.upsampler import Upsampler


@torch.no_grad()
def run_upsampler(
    upsampler: Upsampler,
    low: torch.Tensor,
    *,
    steps: int,
    generator: torch.Generator | None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """(B, 3, low_res, low_res) in [-1, 1] -> (B, 3, size, size), as UnCLIPPipeline's super-res loop.

    The last step uses the `last` network when the upsampler has one (Karlo's first/last split).
    """
    device = next(upsampler.parameters()).device
    cfg = upsampler.cfg
    batch = low.shape[0]
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    timesteps = respaced_timesteps(steps, diffusion.num_timesteps)
    x_T = draw_noise((batch, 3, cfg.size, cfg.size), generator, device)
    low_up = upsampler.upsample_low_res(low.to(device))
    final_t = timesteps[-1]

    def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        t_in = torch.full((batch,), t, dtype=torch.long, device=device)
        return upsampler(x, t_in, low_up, last_step=(t == final_t))

    x = sample_ancestral(model_fn, x_T, diffusion, timesteps, generator=generator, callback=callback)
    return x.clamp(-1, 1)
