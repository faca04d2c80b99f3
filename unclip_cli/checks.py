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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise UserError(f"{name} must be a finite number, got {value}")
    for bound, ok, word in ((low, lambda b: v >= b, ">="), (high, lambda b: v <= b, "<="),
                            (above, lambda b: v > b, ">"), (below, lambda b: v < b, "<")):
        if bound is not None and not ok(bound):
            raise UserError(f"{name} must be {word} {bound:g}, got {value}")


def steps(name: str, value, num_timesteps: int | None) -> None:
    """Sampling steps: an integer from 2 to the training chain's length (None: not known, from 2)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if num_timesteps is None and value < 2:
        raise UserError(f"{name} must be a whole number >= 2, got {value}")
    if num_timesteps is not None and not 2 <= value <= num_timesteps:
        raise UserError(f"{name} must be between 2 and {num_timesteps} (the training chain), got {value}")


# The ranges of the sampling settings (model.json's "sampling" and the options over it), as `number`'s bounds.
SAMPLING_BOUNDS = {
    "guidance": {},
    "temperature": {"above": 0},
    "top_p": {"above": 0, "high": 1},
    "similarity_percentile": {"low": 0, "below": 100},
}


def sampling(settings: dict, prefix: str, num_timesteps: int | None = None, sep: str = " ") -> None:
    """A component's sampling settings in range: steps from 2 to the training chain's length (when known),
    the rest by SAMPLING_BOUNDS; names in messages are `prefix + sep + key`."""
    if "steps" in settings:
        steps(f"{prefix}{sep}steps", settings["steps"], num_timesteps)
    for key, bounds in SAMPLING_BOUNDS.items():
        if key in settings:
            number(f"{prefix}{sep}{key}", settings[key], **bounds)


def finite_result(x: torch.Tensor, stage: str, cause: str) -> torch.Tensor:
    """x, unless it holds NaN or infinity: then one line naming the stage and the likely cause."""
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"{stage}: the result holds NaN or infinite values ({cause}); nothing was written")
    return x
