"""Sampling loops over a `GaussianDiffusion`: ancestral (Karlo / diffusers UnCLIPPipeline) and DDIM.

One signature for all, after crowsonkb/k-diffusion `sampling.py`: a model function, the starting
tensor, the chain, the respaced timesteps (descending), and an optional `callback(i, n)` called
after each step. No progress bars, no I/O. All randomness goes through `draw_noise`. DDIM
inversion (the way back from x_0 to x_T) is in `inversion.py`.
"""

from __future__ import annotations

from typing import Callable

import torch

from unclip_cli.diffusion.schedule import GaussianDiffusion

ModelFn = Callable[[torch.Tensor, int], torch.Tensor]  # (x_t, t) -> model output; guidance lives inside
Callback = Callable[[int, int], None]  # (step index, number of steps)


def draw_noise(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """N(0, I) drawn in float32 on the CPU, then moved: same seed, same noise on any device (diffusers randn_tensor)."""
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device="cpu")
    return noise.to(device=device, dtype=dtype)


def _check_timesteps(timesteps: list[int], diffusion: GaussianDiffusion) -> list[int]:
    """Timesteps as ints, strictly descending, inside the training chain."""
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("no timesteps to sample")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts}")
    if ts[0] >= diffusion.num_timesteps or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {diffusion.num_timesteps - 1}], got {ts[0]}..{ts[-1]}")
    return ts


def sample_ancestral(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    diffusion: GaussianDiffusion,
    timesteps: list[int],
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling over respaced timesteps (Ho et al. 2020, alg. 2; the loop of diffusers' UnCLIPPipeline)."""
    ts = _check_timesteps(timesteps, diffusion)
    x = x_T
    for i, t in enumerate(ts):
        model_output = model_fn(x, t)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        # drawn after the model call, as diffusers does inside scheduler.step
        noise = draw_noise(x.shape, generator, x.device, x.dtype) if t > 0 else None
        x, _ = diffusion.step(model_output, x, t, t_prev, noise)
        if callback is not None:
            callback(i, len(ts))
    return x


def sample_ddim(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    diffusion: GaussianDiffusion,
    timesteps: list[int],
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM sampling over respaced timesteps; eta = 0 is deterministic (Song et al. 2020, eq. 12)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts = _check_timesteps(timesteps, diffusion)
    x = x_T
    for i, t in enumerate(ts):
        model_output = model_fn(x, t)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        noise = draw_noise(x.shape, generator, x.device, x.dtype) if eta > 0 and t_prev >= 0 else None
        x, _ = diffusion.ddim_step(model_output, x, t, t_prev, eta, noise)
        if callback is not None:
            callback(i, len(ts))
    return x
