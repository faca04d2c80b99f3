"""`unclip model ...`: create, import and inspect model sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from unclip_cli.cli.common import model_app

ClipOpt = Annotated[
    Optional[str],
    typer.Option(
        "--clip",
        help="Use this open_clip checkpoint folder as the set's CLIP: local-dir:PATH, PATH, or another model set.",
    ),
]


# ---------------------------------------------------------------------- model sets


@model_app.command("init")
def model_init(
    output: Annotated[str, typer.Option("--output", "-o", help="Folder to create.")],
    preset: Annotated[str, typer.Option(help="Named preset: tiny (tests, seconds per stage) or small (the shipped default's shapes).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Initialization seed.")] = 0,
    name: Annotated[Optional[str], typer.Option(help="Model-set name (default: PRESET-random).")] = None,
    clip: ClipOpt = None,
) -> None:
    """Write a randomly initialized model set from a preset (training starts from it; tests use it)."""
    from unclip_cli.modelset import init_model_set

    write_clip = None
    if clip is not None:
        from unclip_cli.convert.open_clip_dir import clip_writer

        write_clip = clip_writer(clip)
    init_model_set(Path(output), preset, seed=seed, name=name, write_clip=write_clip)
    typer.echo(f"wrote {preset} model set to {output}", err=True)


@model_app.command("add")
def model_add(
    component: Annotated[str, typer.Argument(help="Component to add, e.g. prior-ar.", show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model-set folder (default: $UNCLIP_MODEL).")] = None,
    preset: Annotated[str, typer.Option(help="Preset whose config for the component is used (tiny, small).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Initialization seed.")] = 0,
    replace: Annotated[bool, typer.Option("--replace", help="Start an existing component over.")] = False,
) -> None:
    """Add a randomly initialized component to a model set, sized to its CLIP (then train it)."""
    from unclip_cli.modelset import add_component, resolve_model_dir

    path = resolve_model_dir(model)
    add_component(path, component, preset, seed=seed, replace=replace)
    typer.echo(f"added a {preset} {component} to {path}; train it with `unclip train {component}`", err=True)


@model_app.command("export")
def model_export(
    source: Annotated[str, typer.Argument(help="The model set to copy (e.g. one in training).", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Folder to write: new, empty, or a model set to replace.")],
    default: Annotated[bool, typer.Option("--default", help="Also name it the default set in its parent's DEFAULT file (as weights/DEFAULT).")] = False,
) -> None:
    """Copy a set's weights, configs and manifest only (no training state, logs or caches), as shipped.

    A model set already at OUTPUT keeps its model card (README.md) and pictures (*.png); a folder that is not a model set is never replaced; a file over 16 MiB is refused.
    """
    from unclip_cli.modelset import export_model_set, name_default

    dest = Path(output)
    copied = export_model_set(Path(source), dest)
    for path, size in copied:
        typer.echo(f"{size / 2**20:7.2f} MiB  {path}", err=True)
    typer.echo(f"{sum(size for _, size in copied) / 2**20:7.2f} MiB  in all", err=True)
    if default:
        name_default(dest)
        typer.echo(f"{dest.parent / 'DEFAULT'}: {dest.name}", err=True)


@model_app.command("import")
def model_import(
    source: Annotated[str, typer.Argument(help="A local diffusers unCLIP snapshot (e.g. kakaobrain/karlo-v1-alpha).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Folder to create (must not exist, or be empty).")],
    name: Annotated[Optional[str], typer.Option(help="Model-set name (default: the folder's name).")] = None,
    clip: ClipOpt = None,
) -> None:
    """Convert a diffusers-format unCLIP snapshot (Karlo v1 alpha, or its image-variations sibling) into a model set."""
    from unclip_cli.convert.diffusers import import_snapshot

    def report(line: str) -> None:
        typer.echo(f"unclip: {line}", err=True)

    manifest = import_snapshot(Path(source), Path(output), name=name, clip=clip, report=report)
    typer.echo(f"wrote model set {manifest['name']!r} ({', '.join(manifest['components'])}) to {output}", err=True)
