"""The pipeline stage commands: encode-text, encode-image, prior, decode, upsample, slerp, generate, info.

Each parses its options, reads its input, calls the Pipeline (unclip_cli/pipeline.py) and writes the result.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from unclip_cli.cli.common import (
    DeviceOpt, GuidanceOpt, KindOpt, ModelOpt, OutputOpt, PrecisionOpt, QuietOpt, SeedOpt, StepsOpt,
    app, check_min, first_record, open_pipeline, progress, read_prompts, report_seed,
)
from unclip_cli.errors import UserError


@app.command("encode-text")
def encode_text(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompts (default: one per line on stdin).")] = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Encode prompts with CLIP into a text conditioning file."""
    from unclip_cli.io import stdout_target, write_stage

    texts = read_prompts(prompts)
    target = stdout_target(output)
    write_stage(open_pipeline(model, device).encode_text(texts), target)


@app.command("encode-image")
def encode_image(
    images: Annotated[Optional[list[str]], typer.Argument(help="Image files (default: PNG(s) on stdin).")] = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Encode images with CLIP into an image-embedding file."""
    from unclip_cli.io import read_images, stdout_target, write_stage

    items = read_images(images)
    target = stdout_target(output)
    pipe = open_pipeline(model, device)
    write_stage(pipe.encode_image([img for img, _ in items], names=[name for _, name in items]), target)


@app.command("prior")
def prior(
    source: Annotated[Optional[str], typer.Argument(help="Text conditioning file, or '-' for stdin.")] = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    kind: KindOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    seed: SeedOpt = None,
    candidates: Annotated[int, typer.Option("--candidates", "-k", help="Samples per prompt; keep the one closest to the text (the paper: 2).")] = 1,
    temperature: Annotated[Optional[float], typer.Option(help="AR prior: sampling temperature.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="AR prior: nucleus sampling mass.")] = None,
    similarity_percentile: Annotated[Optional[float], typer.Option("--similarity-percentile", help="AR prior: draw the similarity token from this percentile of its training distribution up (50: the top half).")] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run a prior: text conditioning -> CLIP image embedding (text carried along).

    --kind diffusion (the diffusion prior) or ar (the autoregressive one); both write the same file.
    --candidates K draws K embeddings per prompt and keeps the one with the largest dot product
    with the text embedding (K = 1: one draw).
    """
    from unclip_cli.io import read_stage, stdout_target, write_stage
    from unclip_cli.record import from_meta

    check_min("--steps", steps, 2)
    check_min("--candidates", candidates)
    stage = read_stage(source, "a text conditioning file (from encode-text)")
    if stage.kind != "text":
        raise UserError(f"prior reads text conditioning (from encode-text), got a {stage.kind} file")
    target = stdout_target(output)
    pipe = open_pipeline(model, device, precision)
    pipe.check_stage(stage, source or "<stdin>")
    pipe.prior_kind(kind)
    with progress(quiet) as cb:
        result = pipe.prior(stage, kind=kind, steps=steps, guidance=guidance, seed=seed, candidates=candidates,
                            temperature=temperature, top_p=top_p, similarity_percentile=similarity_percentile, callback=cb)
    report_seed(seed, from_meta(result.meta), "prior_seed")
    write_stage(result, target)


@app.command("decode")
def decode(
    source: Annotated[Optional[str], typer.Argument(help="Image-embedding file (.safetensors or .npy), or '-'.")] = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    seed: SeedOpt = None,
    eta: Annotated[Optional[float], typer.Option(help="Use DDIM with this eta instead of the ancestral sampler.")] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Decode image embeddings into 64x64 images (PNG; a batch gives out-0.png, out-1.png...).

    A latent file from `invert` is decoded from its x_T with DDIM (eta 0 unless --eta) over the
    latent timesteps, with the steps and guidance it was inverted with: that gives the image back.
    """
    from unclip_cli.io import read_stage, stdout_target, write_images

    check_min("--steps", steps, 2)
    if eta is not None and eta < 0:
        raise UserError("--eta must be >= 0")
    stage = read_stage(source, "an image-embedding file")
    if stage.kind == "text":
        raise UserError("decode reads image embeddings: run `unclip prior` on text conditioning first")
    target = stdout_target(output, stage.main.shape[0] if stage.main.ndim > 1 else 1)
    pipe = open_pipeline(model, device, precision)
    pipe.check_stage(stage, source or "<stdin>")
    with progress(quiet) as cb:
        images = pipe.decode(stage, steps=steps, guidance=guidance, seed=seed, eta=eta, callback=cb)
    report_seed(seed, first_record(images), "decoder_seed")
    write_images(images, target)


@app.command("upsample")
def upsample(
    source: Annotated[Optional[str], typer.Argument(help="A 64px or 256px image (PNG), or '-'.")] = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    steps: StepsOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Upsample 64px -> 256px or 256px -> 1024px (chosen by the input size).

    Without --seed, a PNG from `decode` (or `upsample`) continues that stage's random generator, and
    its exact float values are used instead of the 8-bit pixels: `decode --seed S | upsample` draws
    and computes what one pipeline run with seed S does.
    """
    from unclip_cli.io import read_images, stdout_target, write_images

    check_min("--steps", steps, 2)
    items = read_images([source] if source else None, "a 64px or 256px PNG")
    target = stdout_target(output, len(items))
    sizes = {img.size for img, _ in items}
    if len(sizes) != 1:
        raise UserError(f"images of different sizes {sorted(sizes)}: upsample one size at a time")
    (w, h), = sizes
    if w != h or w not in (64, 256):
        raise UserError(f"{items[0][1]}: a {w}x{h} image; upsample takes 64x64 (to 256) or 256x256 (to 1024)")
    pipe = open_pipeline(model, device, precision)
    pipe.models.require({64: "upsampler-256", 256: "upsampler-1024"}[w])
    with progress(quiet) as cb:
        images = pipe.upsample([img for img, _ in items], steps=steps, seed=seed, callback=cb)
    report_seed(seed, first_record(images), f"upsampler_{w * 4}_seed")
    write_images(images, target)


@app.command("slerp")
def slerp_cmd(
    a: Annotated[str, typer.Argument(help="First image-embedding file (.safetensors or .npy).")],
    b: Annotated[str, typer.Argument(help="Second image-embedding file.")],
    t: Annotated[float, typer.Option("-t", help="Position on the arc: 0 gives A, 1 gives B.")] = 0.5,
    output: OutputOpt = None,
) -> None:
    """Spherical interpolation between two image embeddings."""
    from unclip_cli.io import read_stage, stdout_target, write_stage
    from unclip_cli.pipeline import slerp_embeddings

    if a == "-" and b == "-":
        raise UserError("only one of A and B can be stdin")
    sa, sb = read_stage(a, "an image-embedding file"), read_stage(b, "an image-embedding file")
    result = slerp_embeddings(sa, sb, t, names=(a, b))
    write_stage(result, stdout_target(output))


@app.command("generate")
def generate(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompt(s); several give out-0.png, out-1.png...")] = None,
    size: Annotated[int, typer.Option("--size", help="Output size: 64, 256 or 1024.")] = 256,
    output: OutputOpt = None,
    model: ModelOpt = None,
    seed: SeedOpt = None,
    prior_kind_opt: Annotated[Optional[str], typer.Option("--prior-kind", help="diffusion or ar (default: the model set's prior_kind, else diffusion).")] = None,
    prior_steps: Annotated[Optional[int], typer.Option(help="Prior steps (default: the model set's).")] = None,
    prior_guidance: Annotated[Optional[float], typer.Option(help="Prior guidance scale.")] = None,
    decoder_steps: Annotated[Optional[int], typer.Option(help="Decoder steps.")] = None,
    decoder_guidance: Annotated[Optional[float], typer.Option(help="Decoder guidance scale.")] = None,
    upsampler_steps: Annotated[Optional[int], typer.Option(help="Steps of each upsampler.")] = None,
    upsampler_256_steps: Annotated[Optional[int], typer.Option("--upsampler-256-steps", help="Steps of the 64->256 upsampler (over --upsampler-steps).")] = None,
    upsampler_1024_steps: Annotated[Optional[int], typer.Option("--upsampler-1024-steps", help="Steps of the 256->1024 upsampler (over --upsampler-steps).")] = None,
    prompts_file: Annotated[Optional[str], typer.Option("--prompts", help="A prompt file (one per line, or JSON lines with prompt and seed; '-': stdin): with --out-dir.")] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out-dir", help="With --prompts: the folder of images and manifest.jsonl (a rerun resumes).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="With --prompts: items per forward pass.")] = 1,
    out_format: Annotated[str, typer.Option("--format", help="With --prompts: png (DIR/000000.png...) or tar (webdataset shards).")] = "png",
    shard_size: Annotated[int, typer.Option("--shard-size", help="With --format tar: items per shard.")] = 1000,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Prompt -> image through every stage, with one random generator (as diffusers' UnCLIPPipeline).

    Each PNG records its prompts, seed and every stage's settings; `unclip info --command FILE`
    prints the line that makes it again.
    """
    from unclip_cli.io import stdout_target, write_images

    if size not in (64, 256, 1024):
        raise UserError("--size must be 64, 256 or 1024")
    for name, v in (("--prior-steps", prior_steps), ("--decoder-steps", decoder_steps), ("--upsampler-steps", upsampler_steps),
                    ("--upsampler-256-steps", upsampler_256_steps), ("--upsampler-1024-steps", upsampler_1024_steps)):
        check_min(name, v, 2)
    ups = {"upsampler-256": upsampler_256_steps or upsampler_steps, "upsampler-1024": upsampler_1024_steps or upsampler_steps}
    if prompts_file is not None or out_dir is not None:
        from unclip_cli.cli.bulk import generate_from_file

        if prompts_file is None or out_dir is None or prompts or output is not None:
            raise UserError("--prompts FILE and --out-dir DIR go together, without PROMPT arguments or -o")
        sampling = dict(prior_kind=prior_kind_opt, prior_steps=prior_steps, prior_guidance=prior_guidance,
                        decoder_steps=decoder_steps, decoder_guidance=decoder_guidance, upsampler_steps=ups)
        return generate_from_file(prompts_file, out_dir, fmt=out_format, batch_size=batch_size, shard_size=shard_size,
                                  size=size, seed=seed, model=model, device=device, quiet=quiet, sampling=sampling,
                                  load={"precision": precision})
    if not prompts:
        raise UserError("no prompt given (PROMPT arguments, or --prompts FILE with --out-dir)")
    target = stdout_target(output, len(prompts))
    pipe = open_pipeline(model, device, precision)
    with progress(quiet) as cb:
        images = pipe.generate(
            prompts, size=size, seed=seed, prior_kind=prior_kind_opt, prior_steps=prior_steps, prior_guidance=prior_guidance,
            decoder_steps=decoder_steps, decoder_guidance=decoder_guidance, upsampler_steps=ups, callback=cb,
        )
    report_seed(seed, first_record(images), "seed")
    write_images(images, target)


@app.command("info")
def info(
    path: Annotated[str, typer.Argument(help="A stage file, .npy, image, or model-set folder ('-': stdin).")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the summary to a file.")] = None,
    command: Annotated[bool, typer.Option("--command", help="Print one shell command line that makes FILE's pixels again.")] = False,
) -> None:
    """Print a human-readable summary of a stage file, image or model set (--command: how to remake an image)."""
    from unclip_cli.info import describe, remake_command
    from unclip_cli.io import check_output, emit

    if output is not None and output != "-":
        check_output(output)  # before reading the input, which may be stdin
    text = (remake_command(path) if command else "\n".join(describe(path))) + "\n"
    if output is None or output == "-":
        typer.echo(text, nl=False)
    else:
        emit(text.encode(), output)
