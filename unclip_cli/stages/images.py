"""Image tensor helpers shared by the stages and the evaluation: fit to a size, downscale, PSNR.

Images are float tensors in [-1, 1], (3, H, W) or (B, C, H, W) as each function says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_image(x: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> (3, size, size): shortest side to size (bicubic, antialiased), centre crop."""
    _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top : top + size, left : left + size].clamp(-1, 1)


def downscale(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), antialiased bicubic, in float32."""
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB (B,) of (B, C, H, W) x against ref (values spanning `data_range`); inf where identical."""
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(data_range**2 / mse)).float()  # mse = 0 gives inf
