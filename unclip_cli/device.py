"""Where tensors live and where noise comes from: the torch device (--device, else $UNCLIP_DEVICE,
else CUDA when present, else the CPU) and the seeded CPU random generator every stage draws from."""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch

from unclip_cli.errors import UserError

# One generator for a whole batch, or a list of them sharing the batch's rows in order (per-row or
# per-item seeds: an item's noise then does not depend on the batch it runs in).
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


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


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(option: str | None, device: torch.device) -> tuple[str, torch.dtype]:
    """--precision (auto, fp32, bf16, fp16), else $UNCLIP_PRECISION, else auto: fp32 off CUDA (the exact
    parity path), on CUDA bf16 where supported, else fp16. Returns (name, dtype) of the networks' weights."""
    name = (option or os.environ.get("UNCLIP_PRECISION") or "auto").lower()
    if name == "auto":
        name = "fp32" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if name not in PRECISIONS:
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, got {name!r}")
    return name, PRECISIONS[name]


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """One CPU generator, so the same seed gives the same noise on any device; seed None draws a fresh
    one (returned, for the record)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise UserError(f"--seed must be in [0, 2^63), got {seed}")
    return torch.Generator("cpu").manual_seed(seed), seed


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed, for per-item randomness (a stage given the list draws row r from the r-th)."""
    return [make_generator(int(seed))[0] for seed in seeds]


def generator_rows(generator: Generators, batch: int) -> list[tuple[torch.Generator | None, int]]:
    """[(generator, rows)] in batch order: one generator draws all `batch` rows; a list of G shares them,
    batch / G consecutive rows each (G prompts with K candidates or variations: K rows per generator), so
    rows drawn with generator g are what a batch of batch / G rows would draw with g alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return [(generator, batch)]
    gens = list(generator)
    if not gens or batch % len(gens):
        raise ValueError(f"{len(gens)} generators cannot share a batch of {batch} rows")
    return [(g, batch // len(gens)) for g in gens]
