"""Super-resolution (unCLIP section 2.1; Karlo v1 alpha's super_res_first / super_res_last).

A UNet without text or attention denoises the high-res image given the bicubic-upsampled low-res
image as 3 extra input channels. Karlo has two such networks: `last` for the final step only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unclip_cli.models.configs import UpsamplerConfig
from unclip_cli.models.unet import UNet


class Upsampler(nn.Module):
    def __init__(self, cfg: UpsamplerConfig):
        super().__init__()
        self.cfg = cfg
        self.first = UNet(cfg.first)
        self.last = UNet(cfg.last) if cfg.last is not None else None

    def upsample_low_res(self, low: torch.Tensor) -> torch.Tensor:
        """(B, 3, low_res, low_res) in [-1, 1] -> (B, 3, size, size), as UnCLIPPipeline (no clamp)."""
        size = (self.cfg.size, self.cfg.size)
        return F.interpolate(low, size=size, mode="bicubic", align_corners=False, antialias=True)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, low_up: torch.Tensor, last_step: bool) -> torch.Tensor:
        """x_t (B, 3, size, size), low_up (B, 3, size, size) -> eps (B, 3, size, size)."""
        net = self.last if last_step and self.last is not None else self.first
        return net(torch.cat([x_t, low_up], dim=1), t)
