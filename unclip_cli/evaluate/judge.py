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

from unclip_cli.data.shapes import parse_caption
from unclip_cli.errors import UserError
from unclip_cli.evaluate.classifier import load_classifier
from unclip_cli.evaluate.pixels import (
    PALETTE_NAMES,
    JudgeSettings,
    border_background,
    core_mask,
    object_crops,
    palette_labels,
    to_rgb,
)
from unclip_cli.modelset import shipped_weights_dirs


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
    for root in shipped_weights_dirs():
        if (root / "judge" / "model.safetensors").is_file():
            return root / "judge"
    raise UserError("no judge weights in weights/judge: train them with `unclip eval train-judge -o weights/judge`")
