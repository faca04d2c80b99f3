"""`unclip data ...`: write the shapes dataset to a folder, cache a dataset's CLIP embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from unclip_cli.cli.common import _Group, DeviceOpt, ModelOpt, QuietOpt, app, check_min, open_pipeline, progress
from unclip_cli.errors import UserError

data_app = typer.Typer(cls=_Group, help="Training data: the procedural shapes, CLIP embedding caches.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DataOpt = Annotated[
    str,
    typer.Option(
        "--data", "-d",
        help="'shapes', a folder of images with .txt captions, a .tar shard, a folder of shards, or 'd/{00000..00009}.tar'.",
    ),
]
MAX_SIZE = 4096


@data_app.command("shapes")
def shapes(
    output: Annotated[str, typer.Option("--output", "-o", help="Folder to create (must not exist or be empty).")],
    count: Annotated[int, typer.Option("--count", "-n", help="Number of image/caption pairs.")],
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option("--seed", "-s", help="Stream seed: item i is the same scene for the same seed.")] = 0,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write items 0..N-1 of the shapes stream as DIR/000000.png + DIR/000000.txt (caption), ..."""
    from unclip_cli.data.shapes import render, scene_for_index
    from unclip_cli.io import new_folder, png_bytes, tensor_to_images

    check_min("--count", count)
    check_min("--size", size, 8)
    if size > MAX_SIZE:
        raise UserError(f"--size must be <= {MAX_SIZE}")
    check_min("--seed", seed, 0)
    from unclip_cli.device import resolve_device

    out = Path(output)
    with new_folder(out) as tmp:
        dev = resolve_device(device)
        width = max(6, len(str(count - 1)))
        batch = max(1, min(64, (64 * 256 * 256) // (size * size)))
        with progress(quiet) as cb:
            for start in range(0, count, batch):
                scenes = [scene_for_index(seed, i) for i in range(start, min(start + batch, count))]
                for i, (scene, img) in enumerate(zip(scenes, tensor_to_images(render(scenes, size, dev))), start):
                    (tmp / f"{i:0{width}d}.png").write_bytes(png_bytes(img))
                    (tmp / f"{i:0{width}d}.txt").write_text(scene.caption + "\n")
                if cb:
                    cb("shapes", start + len(scenes) - 1, count)
    typer.echo(f"wrote {count} shapes ({size}px, seed {seed}) to {out}", err=True)


@data_app.command("embed")
def embed(
    data: DataOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="Cache file to write (.safetensors).")],
    model: ModelOpt = None,
    count: Annotated[Optional[int], typer.Option("--count", "-n", help="Embed items 0..N-1 (required for shapes; default: all).")] = None,
    seed: Annotated[int, typer.Option("--seed", "-s", help="Shapes stream seed.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Items per CLIP batch.")] = 64,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the model set's CLIP once over a dataset and write image/text embeddings for training."""
    from unclip_cli.data.cache import build_embedding_cache
    from unclip_cli.data.sources import SHAPES_LENGTH, open_source

    check_min("--count", count)
    check_min("--batch-size", batch_size)
    check_min("--seed", seed, 0)
    source = open_source(data, seed=seed)
    total = len(source)
    if count is None and total >= SHAPES_LENGTH:
        raise UserError("--data shapes is endless: pass --count N")
    if count is not None and count > total:
        raise UserError(f"--count {count}, but {source.name} has {total} items")
    n = total if count is None else count
    pipe = open_pipeline(model, device)
    clip = pipe.net("clip")
    with progress(quiet) as cb:
        build_embedding_cache(
            source, clip, output, indices=range(n), batch_size=batch_size, clip_identity=pipe.models.clip_identity,
            callback=(lambda i, total: cb("embed", i, total)) if cb else None,
        )
    typer.echo(f"wrote {n} embeddings of {source.name} to {output}", err=True)
