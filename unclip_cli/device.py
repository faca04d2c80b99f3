"""Choosing the torch device: --device, else $UNCLIP_DEVICE, else CUDA when present, else the CPU."""

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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available")
    return device
