"""A tiny CNN that names the shape in a square mask crop, and its training on rendered scenes.

The training crops come from the judge's own pipeline (`pixels.object_crops`) run on rendered
scenes, clean and degraded (blur, noise, color shifts, coarser antialiasing), so the classifier
sees what the judge will hand it. Weights live in a folder: config.json + model.safetensors (the
config is also in the safetensors metadata).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from unclip_cli.data.shapes import SHAPES, MAX_ANGLE, Scene, render, sample_scene
from unclip_cli.errors import UserError
from unclip_cli.evaluate.pixels import PALETTE_NAMES, JudgeSettings, core_mask, object_crops, palette_labels, to_rgb
from unclip_cli.io import atomic_write, load_state_dict, save_weights

FORMAT = "unclip-shape-judge"


@dataclass(frozen=True)
class ShapeClassifierConfig:
    shapes: tuple[str, ...] = SHAPES  # class names, in output order
    crop: int = 32  # side of the input mask crop
    channels: tuple[int, ...] = (8, 16, 32)  # conv widths; each stage is conv3x3-ReLU-maxpool2
    hidden: int = 64  # width of the hidden linear layer


class ShapeClassifier(nn.Module):
    def __init__(self, cfg: ShapeClassifierConfig = ShapeClassifierConfig()):
        super().__init__()
        self.cfg = cfg
        layers, width = [], 1
        for c in cfg.channels:
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width = c
        self.features = nn.Sequential(*layers)
        side = cfg.crop // 2 ** len(cfg.channels)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(width * side * side, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, len(cfg.shapes))
        )

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 1, crop, crop) soft masks in [0, 1] -> (B, n_shapes) logits."""
        return self.head(self.features(crops * 2 - 1))

    @torch.no_grad()
    def predict(self, crops: torch.Tensor) -> list[str]:
        if len(crops) == 0:
            return []
        device = next(self.parameters()).device
        return [self.cfg.shapes[i] for i in self(crops.to(device)).argmax(dim=1).tolist()]


# ---------------------------------------------------------------------- files


def save_classifier(folder: str | Path, model: ShapeClassifier, training: dict | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(model.cfg)
    doc = {"format": FORMAT, "version": 1, "config": cfg, "training": training or {}}
    atomic_write(folder / "config.json", (json.dumps(doc, indent=2) + "\n").encode())
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_weights(folder / "model.safetensors", state, {"format": FORMAT, "config": json.dumps(cfg)})


def load_classifier(folder: str | Path) -> ShapeClassifier:
    folder = Path(folder)
    try:
        doc = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: no judge here (config.json missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder}/config.json: damaged ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{folder}/config.json: not a shape-judge config")
    try:
        raw = doc["config"]
        cfg = ShapeClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except (KeyError, TypeError) as e:
        raise UserError(f"{folder}/config.json: invalid config ({e})") from None
    path = folder / "model.safetensors"
    state = load_state_dict(path)
    model = ShapeClassifier(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the config ({str(e).splitlines()[0]})") from None
    return model.eval()


# ---------------------------------------------------------------------- training data


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Corrupt renders as a generator might: per image, random blur, color shift and noise. (B, 3, H, W) in [-1, 1]."""
    out = []
    for x in images:
        x = x[None]
        r = torch.rand(3, generator=generator)
        if r[0] < 0.5:  # Gaussian blur, sigma up to 1 px
            sigma = 0.3 + 0.7 * float(torch.rand((), generator=generator))
            k = torch.exp(-((torch.arange(5) - 2.0) ** 2) / (2 * sigma**2))
            k = (k / k.sum()).view(1, 1, 1, 5).expand(3, 1, 1, 5)
            x = F.pad(x, (2, 2, 2, 2), mode="replicate")
            x = F.conv2d(F.conv2d(x, k, groups=3), k.transpose(2, 3), groups=3)
        if r[1] < 0.7:  # per-channel gain and offset, up to ~10 RGB levels of shift
            gain = 1 + 0.08 * (torch.rand(1, 3, 1, 1, generator=generator) - 0.5)
            shift = 0.1 * (torch.rand(1, 3, 1, 1, generator=generator) - 0.5)
            x = x * gain + shift
        if r[2] < 0.7:  # Gaussian noise, std up to ~10 RGB levels
            x = x + 0.08 * float(torch.rand((), generator=generator)) * torch.randn(x.shape, generator=generator)
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def training_scenes(count: int, seed: int) -> list[Scene]:
    """Scenes of the grammar (one and two objects), a quarter of them turned up to twice the grammar's angle."""
    rng = random.Random(f"unclip-judge/{seed}")
    scenes = []
    for _ in range(count):
        s = sample_scene(rng)
        if rng.random() < 0.25:
            objs = tuple(
                dataclasses.replace(o, angle=rng.uniform(-2 * MAX_ANGLE, 2 * MAX_ANGLE)) if o.angle else o for o in s.objects
            )
            s = dataclasses.replace(s, objects=objs)
        scenes.append(s)
    return scenes


def scene_crops(scenes: list[Scene], images: torch.Tensor, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every object of the scenes through the judge's own crop pipeline -> (N, 1, crop, crop), (N,) shape index."""
    s = JudgeSettings()
    rgb = to_rgb(images)
    labels = palette_labels(rgb, s.reject)
    core = core_mask(labels, s.core_neighbours)
    index, colors, bgs, targets = [], [], [], []
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            index.append(b)
            colors.append(PALETTE_NAMES.index(o.color))
            bgs.append(PALETTE_NAMES.index(scene.background))
            targets.append(SHAPES.index(o.shape))
    objs = object_crops(rgb, labels, core, index, colors, bgs, crop)
    keep = objs.found
    return objs.crops[keep], torch.tensor(targets)[keep]


def make_dataset(count: int, seed: int, crop: int, degraded: bool, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of `count` scenes: rendered at 64 px, or (degraded) at 64 or 128 px then downscaled, and corrupted."""
    scenes = training_scenes(count, seed)
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for start in range(0, count, batch):
        chunk = scenes[start : start + batch]
        if degraded:  # every other batch rendered at 128 px and averaged down: coarser antialiasing
            fine = start // batch % 2 == 1
            images = F.interpolate(render(chunk, 128), size=(64, 64), mode="area") if fine else render(chunk, 64)
            images = degrade(images, gen)
        else:
            images = render(chunk, 64)
        x, y = scene_crops(chunk, images, crop)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def augment(crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Crop-level jitter: shift by up to 2 px, thicken or thin the mask, sharpen or soften its edge."""
    B = crops.shape[0]
    shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
    x = torch.roll(crops, shifts=shift, dims=(2, 3))
    r = torch.rand(B, 1, 1, 1, generator=generator)
    grown, shrunk = F.max_pool2d(x, 3, 1, 1), -F.max_pool2d(-x, 3, 1, 1)
    x = torch.where(r < 0.15, grown, torch.where(r > 0.85, shrunk, x))
    gamma = torch.exp(0.6 * (torch.rand(B, 1, 1, 1, generator=generator) - 0.5))  # moves the 0.5 level of soft edges
    return x.clamp(0, 1) ** gamma


# ---------------------------------------------------------------------- training


def accuracy(model: ShapeClassifier, crops: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([model(c).argmax(1) for c in crops.split(1024)])
    return float((pred == targets).float().mean())


def train_classifier(
    steps: int = 2000,
    scenes: int = 6000,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    cfg: ShapeClassifierConfig = ShapeClassifierConfig(),
    on_step: Callable[[int, int, float], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[ShapeClassifier, dict]:
    """Train on crops of `scenes` rendered scenes (half clean, half degraded); held-out scenes give the accuracies.

    Returns the model and a training record (settings, accuracies on held-out clean and degraded
    crops, seconds).
    """
    say = log or (lambda _msg: None)
    t0 = time.time()
    half = max(1, scenes // 2)
    clean = make_dataset(half, seed, cfg.crop, degraded=False)
    rough = make_dataset(half, seed + 1, cfg.crop, degraded=True)
    x, y = torch.cat([clean[0], rough[0]]), torch.cat([clean[1], rough[1]])
    test_n = max(1, scenes // 5)
    test_clean = make_dataset(test_n, seed + 1_000_000, cfg.crop, degraded=False)
    test_rough = make_dataset(test_n, seed + 1_000_001, cfg.crop, degraded=True)
    data_s = time.time() - t0
    say(f"{len(y)} training crops, {len(test_clean[1])} + {len(test_rough[1])} held out ({data_s:.0f}s to render)")

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapeClassifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = torch.randint(len(y), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(augment(x[pick], gen)), y[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step:
            on_step(step + 1, steps, loss.item())
    model.eval()
    record = {
        "steps": steps,
        "scenes": scenes,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "train_crops": len(y),
        "heldout_clean_accuracy": round(accuracy(model, *test_clean), 4),
        "heldout_degraded_accuracy": round(accuracy(model, *test_rough), 4),
        "train_accuracy": round(accuracy(model, x, y), 4),
        "seconds": round(time.time() - t0, 1),
    }
    return model, record
