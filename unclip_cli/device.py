"""Where tensors live and where noise comes from: the torch device (--device, else $UNCLIP_DEVICE,
else CUDA when present, else the CPU) and the seeded CPU random generator every stage draws from."""

from __future__ import annotations

import os

import torch

from unclip_cli.errors import UserError


def resolve_device(option: str | None) -> torch.device:
    name = option or os.environ.get("UNCLIP_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UserError(f"--device {name}: not a device that can run the networks (cpu, cuda, mps or xpu)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available")
    return device


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """One CPU generator, so the same seed gives the same noise on any device; seed None draws a fresh
    one (returned, for the record)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise UserError(f"--seed must be in [0, 2^63), got {seed}")
    return torch.Generator("cpu").manual_seed(seed), seed
