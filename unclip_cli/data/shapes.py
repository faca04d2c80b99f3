"""The procedural "shapes" dataset: scenes drawn from a caption grammar, rendered with torch.

A scene is one object (`a {size} {color} {shape} on a {color} background`) or two objects in a
spatial relation (`a {color} {shape} {relation} a {color} {shape} on a {color} background`).
Object colors differ from the background and, in two-object scenes, from each other, so that every
object can be found again by its exact palette color. Positions are chosen so that the caption is
true: for a relation, the objects' bounding circles are separated along the relation's axis by a
clear gap, and the offset across that axis is at most half the distance along it.

Geometry is in fractions of the image side, y pointing down (as in pixel rows), so "above" means a
smaller cy. An object's `radius` is its circumradius: the shape fits in that circle.

Rendering evaluates each shape's exact signed distance (in pixels) at the pixel centres and covers
a pixel by `clamp(0.5 - distance, 0, 1)`: flat regions are exactly the palette color, only the
edges are blended (antialiasing). Each object is rendered in a window around it, batched over the
objects of one shape, on any torch device.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 215, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
SIZES: tuple[str, ...] = ("small", "medium", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# Circumradius range per size, as a fraction of the image side. The ranges do not overlap, so for
# one shape a larger size always covers more pixels.
SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.09, 0.12), "medium": (0.15, 0.19), "large": (0.24, 0.30)}
PAIR_SIZES = ("small", "medium")  # two-object scenes: sizes not in the caption, small enough to separate
MARGIN = 0.03  # free border around every object (fraction of the side)
GAP = 0.04  # least gap between the bounding circles of a related pair, along the relation's axis
MAX_ANGLE = math.pi / 12  # rotation of the polygonal shapes: uniform in +-15 degrees
RING_INNER = 0.55  # ring: inner radius / outer radius
STAR_INNER = 0.5  # star: inner vertices' radius / tip radius
CROSS_ARM = 1 / 3  # cross: arm half-width / arm half-length

SINGLE_TEMPLATE = "a {size} {color} {shape} on a {background} background"
PAIR_TEMPLATE = "a {color0} {shape0} {relation} a {color1} {shape1} on a {background} background"


@dataclass(frozen=True)
class ShapeObject:
    shape: str  # one of SHAPES
    color: str  # one of COLORS
    size: str  # one of SIZES (named in the caption only for one-object scenes)
    cx: float  # centre x, fraction of the image side (0 = left)
    cy: float  # centre y, fraction of the image side (0 = top)
    radius: float  # circumradius, fraction of the image side
    angle: float  # rotation in radians (0 for circle and ring); positive turns clockwise on screen


@dataclass(frozen=True)
class Scene:
    background: str  # one of COLORS
    objects: tuple[ShapeObject, ...]  # 1 or 2
    relation: str | None  # for two objects: objects[0] {relation} objects[1]
    caption: str


# ---------------------------------------------------------------------- grammar


def _caption(background: str, objects: Sequence[ShapeObject], relation: str | None) -> str:
    if relation is None:
        (o,) = objects
        return SINGLE_TEMPLATE.format(size=o.size, color=o.color, shape=o.shape, background=background)
    a, b = objects
    return PAIR_TEMPLATE.format(
        color0=a.color, shape0=a.shape, relation=relation, color1=b.color, shape1=b.shape, background=background
    )


def _angle(rng: random.Random, shape: str) -> float:
    return 0.0 if shape in ("circle", "ring") else rng.uniform(-MAX_ANGLE, MAX_ANGLE)


def _single(rng: random.Random, background: str) -> Scene:
    shape, size = rng.choice(SHAPES), rng.choice(SIZES)
    color = rng.choice([c for c in COLORS if c != background])
    r = rng.uniform(*SIZE_RADIUS[size])
    cx, cy = (rng.uniform(MARGIN + r, 1 - MARGIN - r) for _ in range(2))
    obj = ShapeObject(shape, color, size, cx, cy, r, _angle(rng, shape))
    return Scene(background, (obj,), None, _caption(background, (obj,), None))


def _pair(rng: random.Random, background: str) -> Scene:
    relation = rng.choice(RELATIONS)
    shapes = (rng.choice(SHAPES), rng.choice(SHAPES))
    color0, color1 = rng.sample([c for c in COLORS if c != background], 2)
    sizes = (rng.choice(PAIR_SIZES), rng.choice(PAIR_SIZES))
    r0, r1 = (rng.uniform(*SIZE_RADIUS[s]) for s in sizes)
    # Along the axis: distance d between the centres leaves a clear gap between the bounding circles.
    d = rng.uniform(r0 + r1 + GAP, 1 - 2 * MARGIN - r0 - r1)
    first_leads = relation in ("left of", "above")  # objects[0] has the smaller coordinate
    r_lead, r_trail = (r0, r1) if first_leads else (r1, r0)
    lead = rng.uniform(MARGIN + r_lead, 1 - MARGIN - r_trail - d)
    a0, a1 = (lead, lead + d) if first_leads else (lead + d, lead)
    # Across the axis: within the image, and offset by at most d / 2 so the relation is the dominant one.
    p0 = rng.uniform(MARGIN + r0, 1 - MARGIN - r0)
    lo, hi = max(MARGIN + r1, p0 - d / 2), min(1 - MARGIN - r1, p0 + d / 2)
    p1 = rng.uniform(lo, max(lo, hi))
    horizontal = relation in ("left of", "right of")
    (x0, y0), (x1, y1) = ((a0, p0), (a1, p1)) if horizontal else ((p0, a0), (p1, a1))
    objs = (
        ShapeObject(shapes[0], color0, sizes[0], x0, y0, r0, _angle(rng, shapes[0])),
        ShapeObject(shapes[1], color1, sizes[1], x1, y1, r1, _angle(rng, shapes[1])),
    )
    return Scene(background, objs, relation, _caption(background, objs, relation))


def sample_scene(rng: random.Random) -> Scene:
    """A scene from the grammar (one or two objects, even odds); its caption is true by construction."""
    background = rng.choice(list(COLORS))
    return _single(rng, background) if rng.random() < 0.5 else _pair(rng, background)


def _restyled(o: ShapeObject, shape: str, size: str, rng: random.Random) -> ShapeObject:
    """`o`'s color with another shape and size, at a fresh position."""
    r = rng.uniform(*SIZE_RADIUS[size])
    cx, cy = (rng.uniform(MARGIN + r, 1 - MARGIN - r) for _ in range(2))
    return ShapeObject(shape, o.color, size, cx, cy, r, _angle(rng, shape))


def scene_group(rng: random.Random, k: int) -> list[Scene]:
    """`k` scenes that share the background and the object colors and differ in what a CLIP trained
    on independent scenes can ignore: one-object scenes in shape (distinct ones while there are
    enough) and size; two-object scenes in shapes, relation, placement and which object has which
    color. Batches of such groups are the hard negatives of `unclip train clip --hard-negatives`."""
    first = sample_scene(rng)
    if first.relation is None:
        (o,) = first.objects
        shapes = rng.sample(SHAPES, min(k, len(SHAPES))) + [rng.choice(SHAPES) for _ in range(k - len(SHAPES))]
        objects = [_restyled(o, shape, rng.choice(SIZES), rng) for shape in shapes]
        return [Scene(first.background, (obj,), None, _caption(first.background, (obj,), None)) for obj in objects]
    colors = [o.color for o in first.objects]
    scenes = [first]
    while len(scenes) < k:
        pair = _pair(rng, first.background)  # new shapes, relation and placement; colors put back below
        order = colors[::-1] if rng.random() < 0.5 else colors
        objs = tuple(ShapeObject(o.shape, c, o.size, o.cx, o.cy, o.radius, o.angle) for o, c in zip(pair.objects, order))
        scenes.append(Scene(first.background, objs, pair.relation, _caption(first.background, objs, pair.relation)))
    return scenes


def scene_for_index(seed: int, index: int) -> Scene:
    """Item `index` of the shapes stream `seed`: the same scene on any machine and Python version."""
    return sample_scene(random.Random(f"unclip-shapes/{int(seed)}/{int(index)}"))


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_SINGLE_RE = re.compile(
    rf"an? (?P<size>{'|'.join(SIZES)}) (?P<color>{_COLOR_RE}) (?P<shape>{_SHAPE_RE})"
    rf" on an? (?P<background>{_COLOR_RE}) background"
)
_PAIR_RE = re.compile(
    rf"an? (?P<color0>{_COLOR_RE}) (?P<shape0>{_SHAPE_RE}) (?P<relation>{'|'.join(RELATIONS)})"
    rf" an? (?P<color1>{_COLOR_RE}) (?P<shape1>{_SHAPE_RE}) on an? (?P<background>{_COLOR_RE}) background"
)


def parse_caption(caption: str) -> dict:
    """Inverse of the grammar: {"background", "objects": [{"color", "shape", "size"?}, ...], "relation"}.

    Case, surrounding spaces, repeated spaces, a final period and "an" for "a" are forgiven. Raises
    ValueError for anything else, including an object colored like its background.
    """
    text = " ".join(caption.strip().lower().rstrip(".").split())
    if m := _SINGLE_RE.fullmatch(text):
        objects = [{"color": m["color"], "shape": m["shape"], "size": m["size"]}]
        relation = None
    elif m := _PAIR_RE.fullmatch(text):
        objects = [{"color": m["color0"], "shape": m["shape0"]}, {"color": m["color1"], "shape": m["shape1"]}]
        relation = m["relation"]
    else:
        raise ValueError(f"not a shapes caption: {caption!r}")
    if any(o["color"] == m["background"] for o in objects):
        raise ValueError(f"object colored like its background: {caption!r}")
    return {"background": m["background"], "objects": objects, "relation": relation}


# ---------------------------------------------------------------------- signed distances
# Each takes points (qx, qy) in the shape's frame, scaled so that the circumradius is 1, y down,
# and returns the signed distance in the same units (negative inside).


def _regular_polygon(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star_vertices() -> list[tuple[float, float]]:
    tips, inner = _regular_polygon(5), _regular_polygon(5, STAR_INNER, -math.pi / 2 + math.pi / 5)
    return [v for pair in zip(tips, inner) for v in pair]


def _cross_vertices() -> list[tuple[float, float]]:
    length = 1 / math.hypot(1, CROSS_ARM)  # arm half-length; the arm ends' corners lie on the unit circle
    w = CROSS_ARM * length
    quarter = [(w, -length), (w, -w), (length, -w)]  # one arm end and the inner corner, turning clockwise
    verts = []
    for k in range(4):  # rotate the quarter by k * 90 degrees
        c, s = round(math.cos(k * math.pi / 2)), round(math.sin(k * math.pi / 2))
        verts += [(c * x - s * y, s * x + c * y) for x, y in quarter]
    return verts


POLYGONS: dict[str, list[tuple[float, float]]] = {
    "triangle": _regular_polygon(3),  # pointing up, centroid at the centre
    "star": _star_vertices(),  # five points, one pointing up
    "cross": _cross_vertices(),  # a plus sign
}


def _sd_polygon(qx: torch.Tensor, qy: torch.Tensor, verts: list[tuple[float, float]]) -> torch.Tensor:
    """Exact signed distance to a simple polygon (Inigo Quilez, "2D distance functions": sdPolygon)."""
    d2 = (qx - verts[0][0]) ** 2 + (qy - verts[0][1]) ** 2
    inside = torch.zeros_like(qx, dtype=torch.bool)
    for i, (vx, vy) in enumerate(verts):
        ux, uy = verts[i - 1]
        ex, ey = ux - vx, uy - vy  # edge from v to its predecessor u
        wx, wy = qx - vx, qy - vy
        t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
        d2 = torch.minimum(d2, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        # Crossing-number test along a horizontal ray.
        c1, c2, c3 = qy >= vy, qy < uy, ex * wy > ey * wx
        inside ^= (c1 & c2 & c3) | ~(c1 | c2 | c3)
    d = d2.sqrt()
    return torch.where(inside, -d, d)


def _sd_box(qx: torch.Tensor, qy: torch.Tensor, half: float) -> torch.Tensor:
    dx, dy = qx.abs() - half, qy.abs() - half
    outside = torch.hypot(dx.clamp(min=0), dy.clamp(min=0))
    return outside + torch.maximum(dx, dy).clamp(max=0)


def signed_distance(shape: str, qx: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
    if shape == "circle":
        return torch.hypot(qx, qy) - 1
    if shape == "ring":
        mid, half = (1 + RING_INNER) / 2, (1 - RING_INNER) / 2
        return (torch.hypot(qx, qy) - mid).abs() - half
    if shape == "square":
        return _sd_box(qx, qy, 1 / math.sqrt(2))
    if shape in POLYGONS:
        return _sd_polygon(qx, qy, POLYGONS[shape])
    raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------------- rendering

_CHUNK = 1 << 22  # most window pixels evaluated at once (bounds the temporaries' memory)


def palette_value(color: str) -> tuple[float, float, float]:
    """A palette color in the [-1, 1] pixel range (x / 127.5 - 1), which maps back to the exact RGB."""
    return tuple(c / 127.5 - 1 for c in COLORS[color])


def _coverage(objs: list[ShapeObject], shape: str, size: int, R: int, device: torch.device) -> torch.Tensor:
    """(n, W, W) pixel coverage of each object in its window of side W = 2R + 1 around its centre."""
    W = 2 * R + 1
    t = torch.tensor([[o.cx, o.cy, o.radius, o.angle] for o in objs], dtype=torch.float64)
    origin = torch.tensor([[math.floor(o.cx * size) - R, math.floor(o.cy * size) - R] for o in objs], dtype=torch.float64)
    # Pixel centres relative to the object's centre, in pixels.
    grid = torch.arange(W, dtype=torch.float64) + 0.5
    dx = (origin[:, 0, None] + grid - t[:, 0, None] * size).float().to(device)[:, None, :]  # (n, 1, W)
    dy = (origin[:, 1, None] + grid - t[:, 1, None] * size).float().to(device)[:, :, None]  # (n, W, 1)
    scale = (t[:, 2] * size).float().to(device)[:, None, None]  # circumradius in pixels
    cos, sin = (f(t[:, 3]).float().to(device)[:, None, None] for f in (torch.cos, torch.sin))
    qx = (cos * dx + sin * dy) / scale  # (n, W, W): rotated back into the shape's frame
    qy = (cos * dy - sin * dx) / scale
    sd = signed_distance(shape, qx, qy) * scale  # in pixels
    return (0.5 - sd).clamp(0, 1)


def render(scenes: Sequence[Scene], size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Scenes -> (B, 3, size, size) float32 in [-1, 1], antialiased, exact palette colors in flat regions."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    device = torch.device(device)
    B = len(scenes)
    bg = torch.tensor([palette_value(s.background) for s in scenes], dtype=torch.float32).reshape(B, 3)
    img = bg.to(device)[:, :, None, None].expand(B, 3, size, size).contiguous()  # (B, 3, S, S)
    used = {o.color for s in scenes for o in s.objects}
    colors = {c: torch.tensor(palette_value(c), dtype=torch.float32).to(device)[:, None, None] for c in used}  # (3, 1, 1)
    groups: dict[str, list[tuple[int, ShapeObject]]] = defaultdict(list)
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            groups[obj.shape].append((b, obj))
    for shape, items in groups.items():
        R = math.ceil(max(o.radius for _, o in items) * size) + 1  # the window holds every covered pixel
        W = 2 * R + 1
        step = max(1, _CHUNK // (W * W))
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            cover = _coverage([o for _, o in chunk], shape, size, R, device)  # (n, W, W)
            for (b, o), a in zip(chunk, cover):
                x0, y0 = math.floor(o.cx * size) - R, math.floor(o.cy * size) - R
                xs, ys = slice(max(x0, 0), min(x0 + W, size)), slice(max(y0, 0), min(y0 + W, size))
                if xs.start >= xs.stop or ys.start >= ys.stop:
                    continue
                a = a[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]  # (h, w)
                region = img[b, :, ys, xs]
                img[b, :, ys, xs] = region * (1 - a) + colors[o.color] * a  # a = 1 gives the color exactly
    return img
