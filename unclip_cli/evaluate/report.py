"""The evaluation run: shapes prompts -> 64 px images with the model set's default sampling -> judge -> figures.

Prompts come from their own stream of the grammar (`unclip-eval/{seed}/{i}`, not the training
stream), one- and two-object scenes alternating. Images come from `Pipeline.generate_tensor`, the
code `unclip generate --size 64` runs, with the set's default settings; all noise comes from one
CPU generator seeded with the seed, batch after batch, so the first batch is exactly what
`unclip generate PROMPTS... --size 64 --seed SEED` makes of its prompts, and the figures are a
function of the model set, the seed, the count and the batch size.

The upsampler check feeds generated 64 px images to upsampler-256 and its outputs to
upsampler-1024, downscales each output back to its input's size (antialiased bicubic, the resize
the upsamplers' training uses to make their low-res inputs) and measures the PSNR against the input.
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable

import torch

from unclip_cli.data.shapes import Scene, sample_scene
from unclip_cli.evaluate.judge import Judge, Verdict
from unclip_cli.stages.images import downscale, psnr

SIZE = 64

# The bars of issue 5 (fractions of the prompts of each kind).
TARGETS = {
    "one_object": {"object_color": 0.95, "background": 0.95, "shape": 0.90},
    "two_objects": {"both_colors": 0.85, "relation": 0.70},
}
PSNR_TARGET = 30.0  # dB: an upsampler's output, downscaled, against its input


def eval_scenes(count: int, seed: int) -> list[Scene]:
    """`count` scenes of the grammar: even items have one object, odd items two."""
    scenes = []
    for i in range(count):
        rng = random.Random(f"unclip-eval/{int(seed)}/{i}")
        want = 1 if i % 2 == 0 else 2
        scene = sample_scene(rng)
        while len(scene.objects) != want:
            scene = sample_scene(rng)
        scenes.append(scene)
    return scenes


# ---------------------------------------------------------------------- figures


def _fraction(verdicts: list[Verdict], key: Callable[[Verdict], bool]) -> float | None:
    return sum(bool(key(v)) for v in verdicts) / len(verdicts) if verdicts else None


def aggregate(verdicts: list[Verdict]) -> dict:
    """Per-image verdicts -> the figures: fractions of the one- and two-object prompts judged right."""
    one = [v for v in verdicts if v.objects == 1]
    two = [v for v in verdicts if v.objects == 2]
    return {
        "one_object": {
            "n": len(one),
            "object_color": _fraction(one, lambda v: v.colors_ok),
            "background": _fraction(one, lambda v: v.background_ok),
            "shape": _fraction(one, lambda v: v.shapes_ok),
        },
        "two_objects": {
            "n": len(two),
            "both_colors": _fraction(two, lambda v: v.colors_ok),
            "relation": _fraction(two, lambda v: v.relation_ok),
            "background": _fraction(two, lambda v: v.background_ok),
            "both_shapes": _fraction(two, lambda v: v.shapes_ok),
        },
    }


def passed(figures: dict) -> dict:
    """{kind: {figure: bool}} for every figure with a target (None when there were no prompts of the kind)."""
    return {
        kind: {k: None if figures[kind][k] is None else figures[kind][k] >= bar for k, bar in bars.items()}
        for kind, bars in TARGETS.items()
    }


# ---------------------------------------------------------------------- upsamplers


def _psnr_summary(values: list[float]) -> dict:
    finite = [min(v, 100.0) for v in values]  # identical images (inf) count as 100 dB
    return {
        "n": len(values),
        "psnr_mean": sum(finite) / len(finite),
        "psnr_min": min(finite),
        "passed": min(finite) >= PSNR_TARGET,
    }


@torch.no_grad()
def check_upsamplers(pipe, low: torch.Tensor, generator: torch.Generator, batch_size: int) -> dict:
    """PSNR of each upsampler's outputs, downscaled, against its inputs: 64 -> 256 -> 1024 from `low` (B, 3, 64, 64)."""
    out: dict = {}
    x = low
    for component, chunk in (("upsampler-256", batch_size), ("upsampler-1024", max(1, batch_size // 8))):
        if not pipe.models.has(component):
            out[component] = {"absent": True}
            break
        steps = pipe.settings(component)["steps"]
        t0 = time.time()
        ups, values = [], []
        for part in x.split(chunk):
            up = pipe.run_upsampler(part, generator, steps=steps)[0].cpu()
            values += psnr(downscale(up, part.shape[-1]), part).tolist()
            ups.append(up)
        out[component] = {**_psnr_summary(values), "input": x.shape[-1], "steps": steps, "seconds": round(time.time() - t0, 2)}
        x = torch.cat(ups)
    return out


# ---------------------------------------------------------------------- the run


def run_eval(
    pipe,
    judge: Judge,
    *,
    count: int = 200,
    seed: int = 0,
    batch_size: int = 25,
    upsample: int = 0,
    prior_kind: str | None = None,
    on_batch: Callable[[int, torch.Tensor, list[Verdict]], None] | None = None,
) -> dict:
    """Generate, judge and aggregate; with `upsample` > 0, also check the upsamplers on that many of the images.

    on_batch(start, images, verdicts) is called after each batch (progress, saving images).
    Returns a JSON-ready report: settings, figures, targets and passes, per-prompt verdicts, timings.
    """
    from unclip_cli.pipeline import PRIOR_KINDS

    scenes = eval_scenes(count, seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    verdicts: list[Verdict] = []
    kept: list[torch.Tensor] = []
    t_gen = t_judge = 0.0
    for start in range(0, count, batch_size):
        prompts = [s.caption for s in scenes[start : start + batch_size]]
        t0 = time.time()
        images, _ = pipe.generate_tensor(prompts, generator, size=SIZE, prior_kind=prior_kind)
        t1 = time.time()
        batch_verdicts = judge(images, prompts)
        t_gen, t_judge = t_gen + t1 - t0, t_judge + time.time() - t1
        verdicts += batch_verdicts
        if len(kept) * batch_size < upsample:
            kept.append(images)
        if on_batch:
            on_batch(start, images, batch_verdicts)
    figures = aggregate(verdicts)
    kind = pipe.prior_kind(prior_kind)
    report = {
        "model": pipe.name,
        "model_dir": str(pipe.models.path),
        "count": count,
        "seed": seed,
        "batch_size": batch_size,
        "size": SIZE,
        "prior_kind": kind,
        "sampling": {"prior": {"kind": kind, **pipe.settings(PRIOR_KINDS[kind])}, "decoder": pipe.settings("decoder")},
        "figures": figures,
        "targets": TARGETS,
        "passed": passed(figures),
        "seconds": {"generate": round(t_gen, 2), "judge": round(t_judge, 2)},
        "verdicts": [v.to_dict() for v in verdicts],
    }
    if upsample > 0:
        low = torch.cat(kept)[:upsample]
        low = low if low.shape[-1] == SIZE else downscale(low, SIZE)
        report["upsamplers"] = check_upsamplers(pipe, low, torch.Generator("cpu").manual_seed(seed), batch_size)
    return report


# ---------------------------------------------------------------------- printing


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(report: dict) -> str:
    """The figures as a plain-text table (one line per figure)."""
    p, d = report["sampling"]["prior"], report["sampling"]["decoder"]
    lines = [
        f"{report['model']}: {report['count']} prompts (seed {report['seed']}), {report['size']} px, "
        f"{p['kind']} prior " + (f"{p['steps']} steps " if "steps" in p else "") +
        f"x{p['guidance']:g}, decoder {d['steps']} steps x{d['guidance']:g}",
        f"{'':<22}{'figure':<14}{'value':>8}{'target':>10}",
    ]
    names = {"one_object": "one object", "two_objects": "two objects"}
    for kind, figs in report["figures"].items():
        label = f"{names[kind]} ({figs['n']})"
        for name, value in figs.items():
            if name == "n":
                continue
            bar = TARGETS.get(kind, {}).get(name)
            ok = report["passed"].get(kind, {}).get(name)
            verdict = "" if ok is None else ("pass" if ok else "FAIL")
            target = f">= {bar:.2f}" if bar is not None else ""
            lines.append(f"{label:<22}{name.replace('_', ' '):<14}{_cell(value):>8}{target:>10}  {verdict}".rstrip())
            label = ""
    for component, u in report.get("upsamplers", {}).items():
        if u.get("absent"):
            lines.append(f"{component:<22}absent from the model set")
            continue
        value = f"{u['psnr_mean']:.1f} / {u['psnr_min']:.1f} dB"
        target = f">= {PSNR_TARGET:g} dB"
        lines.append(
            f"{component:<22}{'PSNR mean/min':<14}{value:>16}{target:>10}  {'pass' if u['passed'] else 'FAIL'}"
            f"  ({u['n']} image{'s' * (u['n'] != 1)}, downscaled to {u['input']} px)"
        )
    return "\n".join(lines) + "\n"


def json_safe(obj):
    """Replace non-finite floats (JSON has none) by None, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
