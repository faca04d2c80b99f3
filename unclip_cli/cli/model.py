"""`unclip model ...`: create, import and inspect model sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from unclip_cli.cli.common import model_app


# ---------------------------------------------------------------------- model sets


@model_app.command("init")
def model_init(
    output: Annotated[str, typer.Option("--output", "-o", help="Folder to create.")],
    preset: Annotated[str, typer.Option(help="Named preset (tiny).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Initialization seed.")] = 0,
    name: Annotated[Optional[str], typer.Option(help="Model-set name (default: PRESET-random).")] = None,
) -> None:
    """Write a randomly initialized model set from a preset (training starts from it; tests use it)."""
    from unclip_cli.modelset import init_model_set

    init_model_set(Path(output), preset, seed=seed, name=name)
    typer.echo(f"wrote {preset} model set to {output}", err=True)


