"""The judge's pixel analysis: palette labels, core pixels, background, objects' crops and centroids.

Shared by the judge (evaluate/judge.py, which reads verdicts from it) and the shape classifier's
training (evaluate/classifier.py, which trains on crops made exactly as the judge makes them).
See judge.py's docstring for the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from unclip_cli.data.shapes import COLORS

PALETTE_NAMES: tuple[str, ...] = tuple(COLORS)
PALETTE = torch.tensor([COLORS[c] for c in PALETTE_NAMES], dtype=torch.float32)  # (K, 3) RGB in 0..255
JUDGE_SIZE = 64  # images are judged at this side
NONE = -1  # label of a pixel far from every palette color


@dataclass(frozen=True)
class JudgeSettings:
    reject: float = 60.0  # RGB distance (0..255 scale) beyond which a pixel has no palette color
    core_neighbours: int = 5  # a pixel is core when >= this many of its 3x3 neighbourhood (itself included) share its color
    min_fraction: float = 0.004  # core pixels, as a fraction of the image, for an object color to be present
    border: int = 2  # width in pixels of the border ring whose dominant color is the background
    crop: int = 32  # side of the mask crop given to the shape classifier


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, 64, 64) float RGB in 0..255 (area-resized if needed)."""
    x = images.detach().float().cpu()
    if x.shape[-2:] != (JUDGE_SIZE, JUDGE_SIZE):
        x = F.interpolate(x, size=(JUDGE_SIZE, JUDGE_SIZE), mode="area")
    return ((x.clamp(-1, 1) + 1) * 127.5)


def palette_labels(rgb: torch.Tensor, reject: float) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, H, W) index of the nearest palette color, NONE beyond `reject`."""
    B, _, H, W = rgb.shape
    pixels = rgb.permute(0, 2, 3, 1).reshape(-1, 3)  # (B*H*W, 3)
    dist, label = torch.cdist(pixels, PALETTE).min(dim=1)
    label[dist > reject] = NONE
    return label.reshape(B, H, W)


def _max3(x: torch.Tensor) -> torch.Tensor:
    """3x3 max filter over the last two dims, zero-padded (separable shifted maxima: much faster than max_pool2d on CPU)."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(p[..., :, :-2], p[..., :, 1:-1]), p[..., :, 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def _sum3(x: torch.Tensor) -> torch.Tensor:
    """3x3 box sum over the last two dims, zero-padded."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = p[..., :, :-2] + p[..., :, 1:-1] + p[..., :, 2:]
    return rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]


def core_mask(labels: torch.Tensor, neighbours: int) -> torch.Tensor:
    """(B, H, W) labels -> (B, H, W) bool: pixels with >= `neighbours` same-colored pixels in their 3x3 (itself included)."""
    core = torch.zeros_like(labels, dtype=torch.bool)
    for k in range(len(PALETTE_NAMES)):
        mask = labels == k
        core |= mask & (_sum3(mask.to(torch.int16)) >= neighbours)
    return core


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool -> (B, H, W) bool: the largest 8-connected region of each mask (empty if none)."""
    B, H, W = mask.shape
    # Every pixel takes the largest pixel id of its region: propagate through the mask until stable.
    ids = torch.arange(1, H * W + 1, dtype=torch.int32).reshape(1, H, W) * mask  # (B, H, W), 0 outside
    ids = ids.to(torch.int16) if H * W < 2**15 else ids
    while True:
        grown = _max3(ids) * mask
        if torch.equal(grown, ids):
            break
        ids = grown
    out = torch.zeros_like(mask)
    for b in range(B):
        values, counts = ids[b][mask[b]].unique(return_counts=True)
        if len(values):
            out[b] = ids[b] == values[counts.argmax()]
    return out


def border_background(labels: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, W) labels -> (B,) the dominant palette color of the border ring (else of the image; NONE if no color)."""
    ring = torch.ones_like(labels[0], dtype=torch.bool)
    ring[width:-width, width:-width] = False
    K = len(PALETTE_NAMES)
    out = []
    for lab in labels:
        for region in (lab[ring], lab.flatten()):
            counts = torch.bincount(region[region != NONE], minlength=K)
            if counts.sum() > 0:
                out.append(int(counts.argmax()))
                break
        else:
            out.append(NONE)
    return torch.tensor(out, dtype=torch.long)


@dataclass
class ObjectCrops:
    """The objects of a batch of (image, color) queries."""

    found: torch.Tensor  # (N,) bool: the color has pixels in the image
    crops: torch.Tensor  # (N, 1, crop, crop) soft mask of the object's largest region, square, in [0, 1]
    centroids: torch.Tensor  # (N, 2) (x, y) centroid of that region in pixels (NaN when not found)


def object_crops(
    rgb: torch.Tensor, labels: torch.Tensor, core: torch.Tensor, index: Sequence[int], colors: Sequence[int],
    backgrounds: Sequence[int], crop: int,
) -> ObjectCrops:
    """For each query (image index[i], color colors[i] on background backgrounds[i], palette indices): the object's
    crop and centroid.

    The region is the largest connected set of pixels labelled with the color. The soft mask is each
    pixel's position on the segment from the background's mean color to the region's mean color
    (clamped to [0, 1]), with the core pixels of any third color cleared (another object). The
    crop is the region's bounding box grown by one pixel, made square about its centre.
    """
    N = len(index)
    found = torch.zeros(N, dtype=torch.bool)
    crops = torch.zeros(N, 1, crop, crop)
    centroids = torch.full((N, 2), float("nan"))
    if N == 0:
        return ObjectCrops(found, crops, centroids)
    idx = torch.as_tensor(list(index), dtype=torch.long)
    col = torch.as_tensor(list(colors), dtype=torch.long)
    regions = largest_component(labels[idx] == col[:, None, None])  # (N, H, W)
    H, W = labels.shape[-2:]
    for n in range(N):
        region = regions[n]
        if not region.any():
            continue
        b, c, bg = int(idx[n]), int(col[n]), int(backgrounds[n])
        ys, xs = torch.nonzero(region, as_tuple=True)
        found[n] = True
        centroids[n] = torch.stack([xs.float().mean() + 0.5, ys.float().mean() + 0.5])
        img = rgb[b]  # (3, H, W)
        obj_rgb = img[:, region].mean(dim=1)  # (3,)
        bg_pixels = labels[b] == bg
        bg_rgb = img[:, bg_pixels].mean(dim=1) if bg_pixels.any() else PALETTE[bg]
        axis = obj_rgb - bg_rgb
        soft = ((img - bg_rgb[:, None, None]) * axis[:, None, None]).sum(0) / axis.dot(axis).clamp(min=1.0)
        soft = soft.clamp(0, 1)
        other = core[b] & (labels[b] != c) & (labels[b] != bg)
        soft[other] = 0
        # Square window about the grown bounding box, zero-padded where it leaves the image.
        y0, y1, x0, x1 = int(ys.min()) - 1, int(ys.max()) + 2, int(xs.min()) - 1, int(xs.max()) + 2
        side = max(y1 - y0, x1 - x0)
        y0 -= (side - (y1 - y0)) // 2
        x0 -= (side - (x1 - x0)) // 2
        window = torch.zeros(side, side)
        sy, sx = slice(max(y0, 0), min(y0 + side, H)), slice(max(x0, 0), min(x0 + side, W))
        window[sy.start - y0 : sy.stop - y0, sx.start - x0 : sx.stop - x0] = soft[sy, sx]
        resized = F.interpolate(window[None, None], size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)
        crops[n] = resized[0]  # (1, crop, crop)
    return ObjectCrops(found, crops, centroids)
