"""Read a shapes image against its caption: pixel analysis against the exact palette, plus a shape classifier.

Nothing here uses CLIP. Every pixel is mapped to its nearest palette color (or to none, when it is
far from all of them); the background is the dominant color of the border; an object color is
present when it covers enough "core" pixels (pixels whose 3x3 neighbourhood mostly shares their
color, so that the thin seams where two colors blend, which can land near a third palette color,
never count); an object is the largest connected region of its color, its position is that region's
centroid, and its shape is read by a small CNN from a square crop of its soft mask (the pixel's
position between the background and the object color, so antialiased edges count partially).

The judge works at 64 px: other sizes are first resized to 64 (antialiased area averaging).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from unclip_cli.data.shapes import COLORS, parse_caption
from unclip_cli.errors import UserError

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


# ---------------------------------------------------------------------- pixel analysis


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


def relation_of(a: torch.Tensor, b: torch.Tensor) -> str:
    """The relation of centroid a to centroid b (x, y; y down) along the axis where they differ most."""
    dx, dy = float(a[0] - b[0]), float(a[1] - b[1])
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


# ---------------------------------------------------------------------- verdicts


@dataclass
class Verdict:
    """What the judge read in one image, against what its caption asked for."""

    caption: str
    objects: int  # objects in the caption: 1 or 2
    background: str | None  # background color found
    background_ok: bool
    colors: list[str]  # object colors present, largest first
    colors_ok: bool  # one object: the largest object color is the caption's; two: both caption colors present
    shapes: list[str | None]  # per caption object: the shape read (None: no object to read)
    shapes_ok: bool  # every caption object has the caption's shape
    relation: str | None = None  # two objects: the relation read (None when a color is missing)
    relation_ok: bool | None = None  # two objects: the relation read is the caption's
    expected: dict = field(default_factory=dict)  # parse_caption(caption)

    def to_dict(self) -> dict:
        return asdict(self)


class Judge:
    """Judges (B, 3, H, W) images in [-1, 1] against shapes captions; see the module docstring."""

    def __init__(self, classifier, settings: JudgeSettings = JudgeSettings()):
        self.classifier = classifier.eval()
        self.settings = settings

    @classmethod
    def load(cls, folder: str | Path | None = None) -> "Judge":
        from unclip_cli.evaluate.classifier import load_classifier

        return cls(load_classifier(folder or default_judge_dir()))

    def analyse(self, images: torch.Tensor):
        """-> rgb (B, 3, 64, 64), labels (B, 64, 64), core (B, 64, 64), background (B,), core area per color (B, K)."""
        s = self.settings
        rgb = to_rgb(images)
        labels = palette_labels(rgb, s.reject)
        core = core_mask(labels, s.core_neighbours)
        background = border_background(labels, s.border)
        K = len(PALETTE_NAMES)
        areas = torch.stack([torch.bincount(lab[cm], minlength=K) for lab, cm in zip(labels, core)])  # (B, K)
        return rgb, labels, core, background, areas

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: Sequence[str]) -> list[Verdict]:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(captions):
            raise ValueError(f"expected (B, 3, H, W) images for {len(captions)} captions, got {tuple(images.shape)}")
        expected = []
        for c in captions:
            try:
                expected.append(parse_caption(c))
            except ValueError as e:
                raise UserError(str(e)) from None
        s = self.settings
        rgb, labels, core, background, areas = self.analyse(images)
        least = s.min_fraction * labels.shape[-1] * labels.shape[-2]

        present: list[list[int]] = []
        queries: list[tuple[int, int]] = []  # (image, color) of every object to read
        for b, exp in enumerate(expected):
            bg = int(background[b])
            order = [k for k in areas[b].argsort(descending=True).tolist() if k != bg and areas[b, k] >= least]
            present.append(order)
            for obj in exp["objects"]:
                want = PALETTE_NAMES.index(obj["color"])
                # Read the caption's object if its color is there; a one-object image with another
                # color still has its shape read, from its largest object.
                use = want if want in order else (order[0] if len(exp["objects"]) == 1 and order else want)
                queries.append((b, use))
        objs = object_crops(
            rgb, labels, core, [q[0] for q in queries], [q[1] for q in queries],
            [int(background[q[0]]) for q in queries], s.crop,
        )
        shapes = self.classifier.predict(objs.crops)

        verdicts, q = [], 0
        for b, (caption, exp) in enumerate(zip(captions, expected)):
            n = len(exp["objects"])
            names = [PALETTE_NAMES[k] for k in present[b]]
            want = [o["color"] for o in exp["objects"]]
            read = [shapes[q + i] if objs.found[q + i] and queries[q + i][1] in present[b] else None for i in range(n)]
            bg = PALETTE_NAMES[background[b]] if background[b] >= 0 else None
            v = Verdict(
                caption, n, bg, bg == exp["background"], names,
                colors_ok=(names[:1] == want) if n == 1 else all(c in names for c in want),
                shapes=read, shapes_ok=read == [o["shape"] for o in exp["objects"]], expected=exp,
            )
            if n == 2:
                v.relation = relation_of(objs.centroids[q], objs.centroids[q + 1]) if v.colors_ok else None
                v.relation_ok = v.relation == exp["relation"]
            verdicts.append(v)
            q += n
        return verdicts


def default_judge_dir() -> Path:
    """The shipped judge: weights/judge (config.json + model.safetensors; not a model set)."""
    from unclip_cli.modelset import shipped_weights_dirs

    for root in shipped_weights_dirs():
        if (root / "judge" / "model.safetensors").is_file():
            return root / "judge"
    raise UserError("no judge weights in weights/judge: train them with `unclip eval train-judge -o weights/judge`")
