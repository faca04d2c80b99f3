"""`unclip train COMPONENT`: train one component of a model set (the training code loads lazily)."""

from __future__ import annotations

import contextlib
import os
from typing import Annotated, Iterator, Optional

import typer

from unclip_cli.cli.common import DeviceOpt, ModelOpt, QuietOpt, app

COMPONENTS_HELP = "clip, prior, decoder, upsampler-256 or upsampler-1024"


@contextlib.contextmanager
def _progress(label: str, quiet: bool) -> Iterator:
    """A rich bar on stderr showing the loss; yields on_step(step, steps, loss)."""
    if quiet:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=None, loss="-")

        def on_step(step: int, steps: int, loss: float) -> None:
            bar.update(task, completed=step, total=steps, loss=f"{loss:.4f}")

        yield on_step


@app.command("train")
def train(
    component: Annotated[str, typer.Argument(help=f"What to train: {COMPONENTS_HELP}.", show_default=False)],
    steps: Annotated[int, typer.Option("--steps", help="Total optimizer steps (a resumed run continues up to this).", show_default=False)],
    model: ModelOpt = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Training data: 'shapes', a folder of captioned images, a .tar, or a glob.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size per process.")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 1e-4,
    warmup: Annotated[int, typer.Option("--warmup", help="Linear learning-rate warm-up steps.")] = 500,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (matrices only).")] = 0.01,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Max gradient norm (0: no clipping).")] = 1.0,
    ema_decay: Annotated[float, typer.Option("--ema-decay", help="Decay of the EMA weights written to the model set.")] = 0.9999,
    seed: Annotated[int, typer.Option("--seed", "-s", help="Seed of every random draw of the run.")] = 0,
    save_every: Annotated[int, typer.Option("--save-every", help="Steps between writes of the component and the training state.")] = 1000,
    log: Annotated[Optional[str], typer.Option("--log", help="JSONL log file (default: DIR/COMPONENT/train.jsonl).")] = None,
    log_every: Annotated[int, typer.Option("--log-every", help="Steps averaged into one log line.")] = 10,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from DIR/COMPONENT/train-state.pt if present.")] = True,
    cache: Annotated[Optional[str], typer.Option("--cache", help="Precomputed CLIP embeddings (prior, decoder).")] = None,
    fixed_batch: Annotated[bool, typer.Option("--fixed-batch", help="Train on one fixed batch (overfitting checks).")] = False,
    color_jitter: Annotated[
        Optional[float],
        typer.Option("--color-jitter", help="Upsamplers: largest per-channel color offset of a training crop, on the [-1, 1] scale.", show_default="0.1"),
    ] = None,
    crop: Annotated[
        Optional[int],
        typer.Option("--crop", help="Upsamplers: side of the random training crops, in output pixels.", show_default="a quarter of the output size"),
    ] = None,
    hard_negatives: Annotated[
        Optional[int],
        typer.Option(
            "--hard-negatives",
            help="clip on --data shapes: build each batch from groups of this many scenes that share the background and colors "
            "and differ in shape, size, relation or color order, so the contrastive loss must tell them apart.",
            show_default="1: independent scenes",
        ),
    ] = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train a component of a model set and write it back (EMA weights); resumable.

    Data parallel with torchrun: `torchrun --nproc-per-node K -m unclip_cli train ...`.
    """
    from unclip_cli.train import TrainOptions, train as run_training

    opts = TrainOptions(
        steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip,
        ema_decay=ema_decay, seed=seed, save_every=save_every, log_every=log_every, log_file=log, resume=resume,
        fixed_batch=fixed_batch, device=device, color_jitter=color_jitter, crop=crop,
        hard_negatives=hard_negatives,
    )
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    with _progress(component, quiet or not main_rank) as on_step:
        result = run_training(component, model, data, opts, cache=cache, say=_say, on_step=on_step)
    if result["stopped"]:
        raise typer.Exit(130)
    if result["loss"] is not None and main_rank:
        _say(f"{component}: step {result['step']}, loss {result['loss']:.4f}; wrote its EMA weights to the model set")


def _say(msg: str) -> None:
    typer.echo(msg, err=True)
