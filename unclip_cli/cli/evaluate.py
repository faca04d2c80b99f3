"""`unclip eval`: judge a model set on shapes prompts (no CLIP in the judge); `unclip eval train-judge`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from unclip_cli.cli.common import (
    _Group, DeviceOpt, ModelOpt, PrecisionOpt, QuietOpt, app, check_min, open_pipeline, progress,
)
from unclip_cli.errors import UserError

eval_app = typer.Typer(cls=_Group, invoke_without_command=True)
app.add_typer(eval_app, name="eval")

JudgeOpt = Annotated[Optional[str], typer.Option("--judge", help="Judge folder (default: the shipped weights/judge).")]


@eval_app.callback()
def evaluate(
    ctx: typer.Context,
    model: ModelOpt = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Number of prompts (one- and two-object, alternating).")] = 200,
    seed: Annotated[int, typer.Option("--seed", "-s", help="Seed of the prompts and of the sampling noise.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts generated at once.")] = 25,
    upsamplers: Annotated[bool, typer.Option("--upsamplers", help="Also check the upsamplers' PSNR (64 -> 256 -> 1024).")] = False,
    upsample_count: Annotated[int, typer.Option("--upsample-count", help="Images run through the upsamplers.")] = 8,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the full report as JSON ('-': JSON on stdout, no table).")] = None,
    save: Annotated[Optional[str], typer.Option("--save", help="Folder to write the generated 64 px images to (000.png...).")] = None,
    judge_dir: JudgeOpt = None,
    prior_kind: Annotated[Optional[str], typer.Option("--prior-kind", help="diffusion or ar (default: the set's prior_kind, else diffusion).")] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score a model set on shapes prompts, judged without CLIP.

    Generates 64 px images with the set's default sampling settings, judges them by pixel analysis
    and a shape classifier, and prints the fractions right (object colors, background, shape,
    relation) against the targets; --upsamplers adds the upsamplers' PSNR check.
    """
    if ctx.invoked_subcommand is not None:
        return
    from unclip_cli.evaluate.judge import Judge
    from unclip_cli.evaluate.report import format_table, json_safe, run_eval
    from unclip_cli.io import check_output_folder, emit, png_bytes, tensor_to_images, write_folder

    check_min("--count", count)
    check_min("--batch-size", batch_size)
    check_min("--upsample-count", upsample_count)
    check_min("--seed", seed, 0)
    folder = Path(save) if save else None
    if folder is not None:
        check_output_folder(folder)
    from unclip_cli.pipeline import PRIOR_KINDS

    judge = Judge.load(judge_dir)
    pipe = open_pipeline(model, device, precision)
    for component in ("clip", PRIOR_KINDS[pipe.prior_kind(prior_kind)], "decoder"):
        pipe.models.require(component)
    saved: dict[str, bytes] = {}  # written all at once at the end: a failed run leaves no images

    with progress(quiet) as cb:

        def on_batch(start, images, verdicts):
            if folder is not None:
                for i, img in enumerate(tensor_to_images(images), start):
                    saved[f"{i:03d}.png"] = png_bytes(img)
            if cb:
                cb("eval", start + len(verdicts) - 1, count)

        report = run_eval(
            pipe, judge, count=count, seed=seed, batch_size=batch_size,
            upsample=min(upsample_count, count) if upsamplers else 0, prior_kind=prior_kind, on_batch=on_batch,
        )
    if folder is not None:
        write_folder(folder, saved)
    if json_out is not None:
        text = json.dumps(json_safe(report), indent=2) + "\n"
        emit(text.encode(), None if json_out == "-" else json_out)
        if json_out == "-":
            return
    typer.echo(format_table(report), nl=False)
    if not quiet:
        secs = report["seconds"]
        typer.echo(f"generated in {secs['generate']:.1f}s, judged in {secs['judge']:.1f}s", err=True)


@eval_app.command("train-judge")
def train_judge(
    output: Annotated[str, typer.Option("--output", "-o", help="Folder to write config.json + model.safetensors to.")],
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 1500,
    scenes: Annotated[int, typer.Option("--scenes", help="Rendered training scenes (half clean, half degraded).")] = 3000,
    seed: Annotated[int, typer.Option("--seed", "-s", help="Seed of the scenes, the degradations and the initialization.")] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Train the judge's shape classifier on rendered shapes scenes (CPU, a few minutes) and save it."""
    from unclip_cli.evaluate.classifier import save_classifier, train_classifier

    check_min("--steps", steps)
    check_min("--scenes", scenes, 2)
    check_min("--seed", seed, 0)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if not out.resolve().parent.is_dir():
        raise UserError(f"{out.resolve().parent}: folder does not exist")
    say = None if quiet else (lambda msg: typer.echo(msg, err=True))
    with progress(quiet) as cb:
        model, record = train_classifier(
            steps=steps, scenes=scenes, seed=seed, on_step=(lambda i, n, _loss: cb("train-judge", i - 1, n)) if cb else None, log=say,
        )
    save_classifier(out, model, record)
    params = sum(p.numel() for p in model.parameters())
    typer.echo(
        f"wrote {out}: {params} parameters, held-out accuracy {record['heldout_clean_accuracy']:.4f} clean / "
        f"{record['heldout_degraded_accuracy']:.4f} degraded, {record['seconds']:.0f}s",
        err=True,
    )
