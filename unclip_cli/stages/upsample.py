"""Upsampler stage: low-res image in [-1, 1] -> image of the upsampler's size (no text, no guidance)."""

from __future__ import annotations

from typing import Callable

import torch

from unclip_cli.device import Generators
from unclip_cli.diffusion.samplers import draw_noise, sample_ancestral
from unclip_cli.diffusion.schedule import GaussianDiffusion, respaced_timesteps
from unclip_cli.models.upsampler import Upsampler


@torch.no_grad()
def run_upsampler(
    upsampler: Upsampler,
    low: torch.Tensor,
    *,
    steps: int,
    generator: Generators,
    micro_batch: int | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """(B, 3, low_res, low_res) in [-1, 1] -> (B, 3, size, size), as UnCLIPPipeline's super-res loop.

    The last step uses the `last` network when the upsampler has one (Karlo's first/last split).
    micro_batch: the network sees at most this many rows at once (None: the whole batch); the sampler
    state and the noise stay whole-batch, so the result is the whole-batch run's (to float rounding of
    batched maths) at the activation memory of micro_batch rows. The network sees its own dtype; the
    sampler stays float32.
    """
    param = next(upsampler.parameters())
    device, dtype = param.device, param.dtype
    cfg = upsampler.cfg
    batch = low.shape[0]
    micro = batch if micro_batch is None else max(1, min(int(micro_batch), batch))
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    timesteps = respaced_timesteps(steps, diffusion.num_timesteps)
    x_T = draw_noise((batch, 3, cfg.size, cfg.size), generator, device)
    low_up = upsampler.upsample_low_res(low.to(device).float()).to(dtype)  # (B, 3, size, size), resized in float32
    final_t = timesteps[-1]

    def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        outs = []
        for start in range(0, batch, micro):
            x_part = x[start : start + micro].to(dtype)  # (micro, 3, size, size)
            t_in = torch.full((x_part.shape[0],), t, dtype=torch.long, device=device)
            out = upsampler(x_part, t_in, low_up[start : start + micro], last_step=(t == final_t))
            outs.append(out.float())
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    x = sample_ancestral(model_fn, x_T, diffusion, timesteps, generator=generator, callback=callback)
    return x.clamp(-1, 1)
