"""What every command shares: the app, the error boundary, common options and small helpers."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Annotated, Iterator, Optional

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, Exit, TyperException

from unclip_cli.errors import UserError


_ONE_LINE = {c: f"\\x{c:02x}" for c in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t"}  # control characters, escaped


class _Group(TyperGroup):
    """The error boundary. Exit status: 1 a UserError (or out of memory), one line on stderr; 2 a usage
    error (typer's); 3 an internal error, one line (the traceback with UNCLIP_DEBUG=1); 130 interrupted;
    141 stdout closed early (`| head`), quietly."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (TyperException, Exit, Abort):
            raise
        except UserError as e:
            typer.echo(f"unclip: error: {str(e).translate(_ONE_LINE)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("unclip: interrupted", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            with contextlib.suppress(Exception):  # the reader has gone: nothing more is flushed to stdout
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as e:
            if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch's CUDA/MPS one too
                typer.echo("unclip: error: out of memory (try a smaller --size, fewer prompts, or --device cpu)", err=True)
                raise typer.Exit(1) from None
            if os.environ.get("UNCLIP_DEBUG", "") not in ("", "0"):
                traceback.print_exc()
            first = (str(e).splitlines() or [""])[0].translate(_ONE_LINE)
            typer.echo(f"unclip: internal error: {type(e).__name__}{': ' + first if first else ''}"
                       " (set UNCLIP_DEBUG=1 for the traceback)", err=True)
            raise typer.Exit(3) from None


app = typer.Typer(
    cls=_Group,
    help="unCLIP (DALL-E 2) as Unix-style stages: encode-text | prior | decode | upsample | upsample.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(cls=_Group, help="Create, import and inspect model sets.", no_args_is_help=True)
app.add_typer(model_app, name="model")

# ---------------------------------------------------------------------- shared options

ModelOpt = Annotated[
    Optional[str], typer.Option("--model", "-m", help="Model-set folder (default: $UNCLIP_MODEL, else the shipped set).")
]
OutputOpt = Annotated[
    Optional[str], typer.Option("--output", "-o", help="Output file ('-' or omitted with a pipe: stdout).")
]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="torch device (default: $UNCLIP_DEVICE, else cuda if available, else cpu).")
]
PrecisionOpt = Annotated[
    Optional[str],
    typer.Option("--precision", help="Network weights: auto, fp32, bf16 or fp16 (default: $UNCLIP_PRECISION, else auto: "
                 "fp32 on the CPU, bf16 on CUDA, fp16 where the GPU lacks bf16)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", "-s", help="Random seed (default: a fresh one, recorded in the output).")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Sampling steps (default: the model set's).")]
GuidanceOpt = Annotated[Optional[float], typer.Option("--guidance", "-g", help="Classifier-free guidance scale (default: the model set's).")]
KindOpt = Annotated[
    Optional[str], typer.Option("--kind", help="Prior: diffusion or ar (default: the model set's prior_kind, else diffusion).")
]


def check_min(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UserError(f"{name} must be >= {minimum}")


def say(message: str) -> None:
    """A one-line note on stderr."""
    typer.echo(message, err=True)


@contextlib.contextmanager
def progress(quiet: bool) -> Iterator:
    """Rich progress bars on stderr, one per stage; yields the pipeline's callback(stage, i, n) (None when quiet)."""
    if quiet:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    ) as bar:
        tasks: dict[str, int] = {}

        def callback(stage: str, i: int, n: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=n)
            bar.update(tasks[stage], completed=i + 1, total=n)

        yield callback


def open_pipeline(model: str | None, device: str | None, precision: str | None = None):
    """The pipeline over --model on --device at --precision; its notes go to stderr."""
    from unclip_cli.pipeline import Pipeline

    return Pipeline.load(model, device=device, precision=precision, log=say)


def first_record(images) -> dict:
    """The record (see record.py) the first of a batch of result images carries."""
    from unclip_cli.pipeline import image_record

    return image_record(images[0]) or {}


def report_seed(given: int | None, record: dict | None, key: str) -> None:
    """Without --seed, say on stderr which seed was drawn (the output's record holds it too)."""
    drawn = (record or {}).get(key)
    if given is None and drawn is not None:
        say(f"{key.replace('_', ' ')} {drawn}")  # "seed 123", "prior seed 123", ...


def read_prompts(prompts: list[str] | None) -> list[str]:
    if prompts:
        return list(prompts)
    if sys.stdin.isatty():
        raise UserError("no prompt given: pass PROMPT arguments or pipe lines into stdin")
    lines = [ln.strip() for ln in sys.stdin.read().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise UserError("empty stdin: expected one prompt per line")
    return lines


