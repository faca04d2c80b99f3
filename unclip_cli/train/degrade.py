"""Corruptions of the upsamplers' conditioning images (unCLIP, Ramesh et al. 2022, sec. 2.1 / appendix C).

- 64 -> 256: Gaussian blur, kernel 3, sigma 0.6.
- 256 -> 1024: a BSR-style degradation (Zhang et al. 2021, "Designing a Practical Degradation
  Model for Deep Blind Image Super-Resolution"; the `degradation_bsrgan_variant` of latent
  diffusion): blur, resize and Gaussian noise in a random order with random strengths, then JPEG.

Before any of these, `color_jitter` moves each training crop's colors a little (this project's
addition, not the paper's): the crop and its low-res version are made from the same moved image, so
an upsampler learns to keep its input's colors. Trained on rendered scenes alone it learns the
palette instead, and snaps a generated image's slightly-off background to it (measured on the
shipped set's phase-5 upsampler-256, trained without it: a red background at (222, 50, 42) came
out at (223, 40, 32), costing 5-8 dB of PSNR).

Images are (B, 3, H, W) float in [-1, 1] on the CPU; randomness only from the given generator, so a
corruption is a function of the generator's seed. The result keeps the input's size and range.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BLUR_KERNEL = 3  # 64 -> 256 conditioning blur (paper)
BLUR_SIGMA = 0.6
BSR_BLUR_SIGMA = (0.2, 1.5)  # isotropic Gaussian blur, sigma in pixels of the low-res image
BSR_RESIZE = (0.5, 1.0)  # down-resize factor, then back up (bilinear / bicubic / area, at random)
BSR_NOISE = (1.0 / 255, 25.0 / 255)  # std of additive Gaussian noise on the [0, 1] scale
BSR_JPEG_QUALITY = (30, 95)
JITTER_OFFSET = 0.1  # per-channel color offset, uniform in +-0.1 on the [-1, 1] scale (+-13 of 255)
JITTER_GAIN = (0.9, 1.1)  # per-channel contrast about the image's mean color


def gaussian_kernel(kernel_size: int, sigma: float) -> torch.Tensor:
    """Normalized 1-D Gaussian, (kernel_size,)."""
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def gaussian_blur(x: torch.Tensor, kernel_size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, (B, C, H, W) -> same."""
    C = x.shape[1]
    k = gaussian_kernel(kernel_size, sigma).to(x.device, x.dtype)
    pad = kernel_size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)  # along W
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)  # along H


def color_jitter(x: torch.Tensor, generator: torch.Generator, offset: float = JITTER_OFFSET) -> torch.Tensor:
    """Per image and channel, scale about the image's mean color and shift by up to +-`offset`, then
    clamp: (B, C, H, W) -> same. The draws do not depend on `offset` (0 leaves only the gain)."""
    B, C = x.shape[:2]
    gain = torch.empty(B, C, 1, 1).uniform_(*JITTER_GAIN, generator=generator).to(x.device, x.dtype)
    offset = offset * torch.empty(B, C, 1, 1).uniform_(-1, 1, generator=generator).to(x.device, x.dtype)
    mean = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    return ((x - mean) * gain + mean + offset).clamp(-1, 1)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    sigma = _uniform(g, *BSR_BLUR_SIGMA)
    size = min(2 * int(np.ceil(2 * sigma)) + 1, 2 * (min(x.shape[-2:]) // 2) - 1)
    return gaussian_blur(x, size, sigma)


def _resize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    H, W = x.shape[-2:]
    factor = _uniform(g, *BSR_RESIZE)
    mode = ("bilinear", "bicubic", "area")[int(torch.randint(3, (), generator=g))]
    small = (max(1, round(H * factor)), max(1, round(W * factor)))
    kw = {} if mode == "area" else {"align_corners": False, "antialias": True}
    x = F.interpolate(x, size=small, mode=mode, **kw)
    return F.interpolate(x, size=(H, W), mode="bicubic", align_corners=False)


def _noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    std = 2 * _uniform(g, *BSR_NOISE)  # [0, 1] scale -> [-1, 1] scale
    return x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip through PIL of one image (1, 3, H, W) in [-1, 1]."""
    arr = ((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32)
    return (torch.from_numpy(back.copy()).permute(2, 0, 1)[None] / 127.5 - 1).to(x.dtype)


def bsr_degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """BSR-style degradation of each image: blur, resize, noise in a random order, then JPEG."""
    out = []
    for img in x.split(1):  # (1, 3, H, W) each: every image gets its own parameters
        for i in torch.randperm(3, generator=generator).tolist():
            img = (_blur, _resize, _noise)[i](img, generator).clamp(-1, 1)
        quality = int(torch.randint(BSR_JPEG_QUALITY[0], BSR_JPEG_QUALITY[1] + 1, (), generator=generator))
        out.append(jpeg(img, quality))
    return torch.cat(out)
