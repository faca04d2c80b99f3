"""`unclip metrics FAKE_DIR [--real REAL_DIR]`: the CLIP score, fd_clip and Inception FID of folders of
images (evaluate/metrics.py). Under torchrun the ranks share the images; rank 0 prints."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from unclip_cli.cli.common import DeviceOpt, ModelOpt, QuietOpt, app, check_min, open_pipeline, progress, say
from unclip_cli.errors import UserError


@app.command("metrics")
def metrics(
    fake_dir: Annotated[str, typer.Argument(
        help="Generated images: a `generate --out-dir` folder (manifest.jsonl, or shard-*.tar), or a folder of images.",
        show_default=False)],
    real: Annotated[Optional[str], typer.Option("--real", help="Reference images (a folder or shards): adds fd_clip, and fid.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout: clip_score, fd_clip, fid (null where not computed).")] = False,
    model: ModelOpt = None,
    clip: Annotated[Optional[str], typer.Option(
        "--clip", help="Score with this CLIP instead of the model set's: an open_clip local-dir folder, or a model set.")] = None,
    inception_weights: Annotated[Optional[str], typer.Option(
        "--inception-weights", help="torch-fidelity's Inception-v3 FID weights (.pth or .safetensors), a local file: adds fid (needs --real).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 32,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score generated images: the CLIP score against their prompts; with --real, Frechet distances.

    clip_score is 100 x the mean of max(cos(image, prompt), 0) in CLIP space, each prompt from the
    folder's manifest.jsonl, the shards' key.txt, a .txt beside the image or its unclip record.
    fd_clip is the Frechet distance between the two folders' CLIP image embeddings; fid the same over
    Inception-v3 features, when --inception-weights points at a local weights file (never downloaded).
    Runs under torchrun too: `torchrun --nproc-per-node K -m unclip_cli metrics FAKE_DIR ...`.
    """
    check_min("--batch-size", batch_size)
    from unclip_cli.distributed import setup_distributed, shutdown
    from unclip_cli.evaluate.metrics import Inception, compute_metrics, open_images

    fake = open_images(fake_dir, "FAKE_DIR")
    ref = None if real is None else open_images(real, "--real")
    if inception_weights is not None and ref is None:
        raise UserError("--inception-weights: the FID compares two folders; give --real REAL_DIR too")
    d, dev = setup_distributed(device)
    try:
        if clip is not None:
            from unclip_cli.convert.open_clip_dir import load_clip

            encoder, clip_name = load_clip(clip, dev)
        else:
            from unclip_cli.modelset import clip_name as set_clip_name

            pipe = open_pipeline(model, dev)
            encoder, clip_name = pipe.net("clip"), set_clip_name(pipe.models.manifest)
        inception = None if inception_weights is None else Inception(inception_weights, dev)
        with progress(quiet or not d.main) as cb:
            result = compute_metrics(fake, encoder, real=ref, inception=inception, batch_size=batch_size, d=d,
                                     progress=cb, log=say if d.main else None)
    except UserError:
        if d.main:
            raise
        raise typer.Exit(1) from None  # every rank fails alike; rank 0 says why
    finally:
        shutdown(d)
    if not d.main:
        return
    result["clip"] = clip_name
    if json_out:
        typer.echo(json.dumps(result, sort_keys=True))
        return
    counts = f"{result['fake_images']} vs {result['real_images']} images" if ref is not None else ""
    rows = [
        ("clip_score", result["clip_score"], f"100 x max(cos, 0), {result['fake_images']} images, CLIP {clip_name}"
         if result["clip_score"] is not None else "the images have no prompts"),
        ("fd_clip", result["fd_clip"], counts or "give --real REAL_DIR"),
        ("fid", result["fid"], counts if result["fid"] is not None else "give --real and --inception-weights FILE"),
    ]
    for name, value, note in rows:
        typer.echo(f"{name:<11} {'-' if value is None else f'{value:.4f}':>10}  ({note})")
