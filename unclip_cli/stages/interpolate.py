"""Operations on CLIP embeddings: spherical interpolation."""

from __future__ import annotations

import torch


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation over the whole vector (Shoemake 1985), norms interpolated linearly.

    a, b: (..., D). The direction moves along the great circle from a to b; the length goes
    linearly from |a| to |b|, so slerp(a, b, 0) = a, slerp(a, b, 1) = b, and unit vectors stay unit.
    """
    if t == 0.0:
        return a.clone()  # exact endpoints, whatever the dtype
    if t == 1.0:
        return b.clone()
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
    ua, ub = a64 / na, b64 / nb
    dot = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    so = torch.sin(omega)
    near = so.abs() < 1e-7  # (anti)parallel: fall back to linear interpolation of directions
    safe = torch.where(near, torch.ones_like(so), so)
    wa = torch.where(near, torch.full_like(so, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    wb = torch.where(near, torch.full_like(so, t), torch.sin(t * omega) / safe)
    direction = wa * ua + wb * ub
    if near.any():
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    norm = (1.0 - t) * na + t * nb
    return (direction * norm).to(a.dtype)
