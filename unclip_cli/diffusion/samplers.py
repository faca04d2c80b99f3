"""Sampling loops over a `GaussianDiffusion`: ancestral (Karlo / diffusers UnCLIPPipeline) and DDIM.

One signature for all, after crowsonkb/k-diffusion `sampling.py`: a model function, the starting
tensor, the chain, the respaced timesteps (descending), and an optional `callback(i, n)` called
after each step. No progress bars, no I/O. All randomness goes through `draw_noise`: one CPU
generator for the batch, or a list sharing its rows (`device.generator_rows`). A loop draws all its
step noise before its first step (`step_noise`), in the order the steps would draw it, into pinned
host memory on CUDA, and copies each step's slice without waiting: no host round trip per step.
DDIM inversion (the way back from x_0 to x_T) is in `inversion.py`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from unclip_cli.device import Generators, generator_rows
from unclip_cli.diffusion.schedule import GaussianDiffusion

ModelFn = Callable[[torch.Tensor, int], torch.Tensor]  # (x_t, t) -> model output; guidance lives inside
Callback = Callable[[int, int], None]  # (step index, number of steps)

# A loop's step noise is drawn ahead in windows of at most this many bytes of host memory (all of it
# at once for every usual size: 25 steps of a batch of 8 at 256 px are 160 MB).
NOISE_AHEAD_BYTES = 1 << 30


def draw_noise(
    shape: tuple[int, ...] | torch.Size,
    generator: Generators,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """N(0, I) drawn in float32 on the CPU, then moved: same seed, same noise on any device (diffusers randn_tensor).

    A list of generators draws each one's rows with its own randn call, as a batch of those rows would."""
    shape = tuple(shape)
    parts = [
        torch.randn((rows, *shape[1:]), generator=g, dtype=torch.float32, device="cpu")
        for g, rows in generator_rows(generator, shape[0])
    ]
    noise = parts[0] if len(parts) == 1 else torch.cat(parts)
    return noise.to(device=device, dtype=dtype)


def step_noise(
    shape: tuple[int, ...] | torch.Size,
    count: int,
    generator: Generators,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Iterator[torch.Tensor]:
    """The noise of a loop's next `count` steps on `device`, drawn ahead on the host (one draw_noise per
    step, in step order: the stream of drawing each step's noise in turn), pinned on CUDA and copied
    with non_blocking=True; in windows of NOISE_AHEAD_BYTES."""
    shape, device = tuple(shape), torch.device(device)
    window = max(1, NOISE_AHEAD_BYTES // (4 * math.prod(shape)))

    def draw(n: int) -> torch.Tensor:
        host = torch.empty((n, *shape), dtype=torch.float32, pin_memory=device.type == "cuda")  # (n, *shape)
        for i in range(n):
            host[i] = draw_noise(shape, generator, "cpu")
        return host

    def steps(host: torch.Tensor, done: int) -> Iterator[torch.Tensor]:
        while True:
            for i in range(host.shape[0]):
                yield host[i].to(device=device, dtype=dtype, non_blocking=True)
            done += host.shape[0]
            if done >= count:
                return
            host = draw(min(window, count - done))

    return steps(draw(min(window, count)), 0) if count > 0 else iter(())  # the first window drawn now


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
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling over respaced timesteps (Ho et al. 2020, alg. 2; the loop of diffusers' UnCLIPPipeline)."""
    ts = _check_timesteps(timesteps, diffusion)
    # diffusers draws each step's noise after its model call; no model call draws, so the stream is the same
    noises = step_noise(x_T.shape, sum(t > 0 for t in ts), generator, x_T.device, x_T.dtype)
    x = x_T
    for i, t in enumerate(ts):
        model_output = model_fn(x, t)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x, _ = diffusion.step(model_output, x, t, t_prev, next(noises) if t > 0 else None)
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
    generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM sampling over respaced timesteps; eta = 0 is deterministic (Song et al. 2020, eq. 12)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts = _check_timesteps(timesteps, diffusion)
    noises = step_noise(x_T.shape, (len(ts) - 1) * (eta > 0), generator, x_T.device, x_T.dtype)
    x = x_T
    for i, t in enumerate(ts):
        model_output = model_fn(x, t)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        noise = next(noises) if eta > 0 and t_prev >= 0 else None
        x, _ = diffusion.ddim_step(model_output, x, t, t_prev, eta, noise)
        if callback is not None:
            callback(i, len(ts))
    return x
