"""Checks on what flows through the pipeline: option values (finite, in range) and results (finite).

The readers check files (validate.py); these check the numbers a caller passes and the tensors a
stage returns, so that nothing non-finite is ever written and each refusal names its option or its
stage in one line (a UserError).
"""

from __future__ import annotations

import math

import torch

from unclip_cli.errors import UserError


def number(name: str, value, *, low: float | None = None, high: float | None = None,
           above: float | None = None, below: float | None = None) -> None:
    """Refuse a non-finite or out-of-range option value (None: not given, nothing to check)."""
    if value is None:
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise UserError(f"{name} must be a finite number, got {value}")
    for bound, ok, word in ((low, lambda b: v >= b, ">="), (high, lambda b: v <= b, "<="),
                            (above, lambda b: v > b, ">"), (below, lambda b: v < b, "<")):
        if bound is not None and not ok(bound):
            raise UserError(f"{name} must be {word} {bound:g}, got {value}")


def steps(name: str, value, num_timesteps: int) -> None:
    """Sampling steps: an integer from 2 to the training chain's length."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if not 2 <= value <= num_timesteps:
        raise UserError(f"{name} must be between 2 and {num_timesteps} (the training chain), got {value}")


def finite_result(x: torch.Tensor, stage: str, cause: str) -> torch.Tensor:
    """x, unless it holds NaN or infinity: then one line naming the stage and the likely cause."""
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"{stage}: the result holds NaN or infinite values ({cause}); nothing was written")
    return x
