"""The paper's manipulations (section 3): invert, vary, interpolate, text-diff, mix.

Each works on the bipartite latent (z_i, x_T): z_i the CLIP image embedding, x_T the decoder noise
that DDIM with eta 0 turns into the image. An input is an image (encoded with CLIP, and inverted
where x_T is needed), a latent file from `invert`, or an image-embedding file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from unclip_cli.cli.common import (
    DeviceOpt, GuidanceOpt, KindOpt, ModelOpt, OutputOpt, PrecisionOpt, QuietOpt, SeedOpt, StepsOpt,
    app, check_min, first_record, open_pipeline, progress, report_seed, say,
)
from unclip_cli.errors import UserError

RefineOpt = Annotated[
    int, typer.Option("--refine", help="Fixed-point refinements per inversion step (0: plain DDIM inversion).")
]
InvertGuidanceOpt = Annotated[
    float, typer.Option("--invert-guidance", help="Decoder guidance the inversion (and its decoding) uses.")
]
FramesOutOpt = Annotated[
    Optional[str], typer.Option("--output", "-o", help="strip .png (default, or stdout), .gif, or a folder ending in /.")
]


# ---------------------------------------------------------------------- reading inputs


def _read_item(source: str):
    """An input path (or '-') -> ("image", PIL image) or ("stage", StageFile)."""
    from unclip_cli.io import PNG_MAGIC, decode_image, parse_stage, read_input

    data, name = read_input(source, "an image, latent or embedding file")
    if data.startswith(PNG_MAGIC) or data[:3] == b"\xff\xd8\xff" or data[:4] in (b"GIF8", b"RIFF"):
        return "image", decode_image(data, name)
    try:
        return "stage", parse_stage(data, name)
    except UserError as not_stage:
        try:
            return "image", decode_image(data, name)  # another image format PIL reads
        except UserError:
            raise not_stage from None


def _item(source: str):
    """A path (or '-') -> what the pipeline takes: a PIL image or a StageFile."""
    return _read_item(source)[1]


# ---------------------------------------------------------------------- invert


@app.command("invert")
def invert_cmd(
    images: Annotated[Optional[list[str]], typer.Argument(help="Images (default: PNG(s) on stdin).")] = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    steps: StepsOpt = None,
    guidance: InvertGuidanceOpt = 1.0,
    refine: RefineOpt = 3,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """DDIM-invert images into latent files (z_i, x_T); `decode` of the latent gives the image back.

    The images are encoded with CLIP (z_i), fitted to the decoder's size, and the decoder's DDIM
    steps (conditioned on z_i, empty text) are solved backwards to x_T. The latent records the
    steps and guidance; `decode`, `vary`, `interpolate --invert` and `text-diff` reuse them.
    """
    from unclip_cli.io import read_images, stdout_target, write_stage
    from unclip_cli.record import from_meta

    check_min("--steps", steps, 2)
    if refine < 0:
        raise UserError("--refine must be >= 0")
    items = read_images(images)
    target = stdout_target(output)
    pipe = open_pipeline(model, device, precision)
    names = [name for _, name in items]
    with progress(quiet) as cb:
        latent = pipe.invert([img for img, _ in items], names=names, steps=steps, guidance=guidance, refine=refine, callback=cb)
    record = from_meta(latent.meta)
    for name, p in zip(names, record["reconstruction_psnr"]):
        say(f"{name}: inverted in {record['decoder_steps']} steps (guidance {guidance:g}), reconstruction {p:.1f} dB PSNR")
    write_stage(latent, target)


# ---------------------------------------------------------------------- vary


@app.command("vary")
def vary_cmd(
    source: Annotated[Optional[str], typer.Argument(help="An image or a latent file (from invert), or '-'.")] = None,
    n: Annotated[int, typer.Option("-n", help="Number of variations.")] = 4,
    eta: Annotated[float, typer.Option(help="DDIM eta: 0 gives the image back, larger varies more.")] = 1.0,
    fresh_noise: Annotated[bool, typer.Option("--fresh-noise", help="Start from fresh noise instead of the inverted x_T.")] = False,
    output: OutputOpt = None,
    model: ModelOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    seed: SeedOpt = None,
    refine: RefineOpt = 3,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Variations of an image: DDIM with eta > 0 from its inverted latent (or from fresh noise).

    Writes N 64px PNGs (out-0.png, out-1.png...; back to back on stdout).
    """
    from unclip_cli.io import stdout_target, write_images

    check_min("-n", n)
    check_min("--steps", steps, 2)
    if eta < 0:
        raise UserError("--eta must be >= 0")
    target = stdout_target(output, n)
    pipe = open_pipeline(model, device, precision)
    with progress(quiet) as cb:
        images = pipe.vary(_item(source or "-"), n=n, eta=eta, fresh_noise=fresh_noise, steps=steps, guidance=guidance,
                           seed=seed, refine=refine, name=source or "<stdin>", callback=cb)
    report_seed(seed, first_record(images), "decoder_seed")
    write_images(images, target)


# ---------------------------------------------------------------------- interpolate


@app.command("interpolate")
def interpolate(
    a: Annotated[str, typer.Argument(help="First image, latent or image-embedding file.")],
    b: Annotated[str, typer.Argument(help="Second image, latent or image-embedding file.")],
    frames: Annotated[int, typer.Option("-n", "--frames", help="Number of frames, endpoints included.")] = 5,
    invert: Annotated[bool, typer.Option("--invert", help="Slerp x_T between the inverted latents of A and B (endpoints reconstruct them).")] = False,
    fixed_noise: Annotated[bool, typer.Option("--fixed-noise", help="One x_T for every frame, drawn from --seed (the default).")] = False,
    output: FramesOutOpt = None,
    model: ModelOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    seed: SeedOpt = None,
    eta: Annotated[float, typer.Option(help="DDIM eta (0: only the latent changes across frames).")] = 0.0,
    refine: RefineOpt = 3,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Decode N frames along the slerp of z_i from A to B (the paper's interpolations).

    --fixed-noise (default): every frame from the same x_T; --invert: x_T slerped between the two
    inverted latents. -o strip.png: frames side by side; -o anim.gif; -o DIR/: DIR/frame-000.png...
    """
    from unclip_cli.io import stdout_target
    from unclip_cli.pipeline_edit import refuse_bare_embedding

    if frames < 2:
        raise UserError("-n must be >= 2")
    if invert and fixed_noise:
        raise UserError("--invert and --fixed-noise exclude each other")
    if a == "-" and b == "-":
        raise UserError("only one of A and B can be stdin")
    check_min("--steps", steps, 2)
    if eta < 0:
        raise UserError("--eta must be >= 0")
    kind = frames_kind(output)
    target = stdout_target(output) if kind == "strip" else output
    items = [_read_item(a), _read_item(b)]  # both read (and checked) before any inversion runs
    if invert:
        for source, (item_kind, item) in zip((a, b), items):
            if item_kind == "stage":
                refuse_bare_embedding(item, source)
    pipe = open_pipeline(model, device, precision)
    with progress(quiet) as cb:
        images = pipe.interpolate(items[0][1], items[1][1], frames=frames, invert=invert, steps=steps, guidance=guidance,
                                  seed=seed, eta=eta, refine=refine, names=(a, b), callback=cb)
    report_seed(seed, first_record(images), "decoder_seed")
    write_frames(images, target, kind)


def frames_kind(output: str | None) -> str:
    """What -o names: a folder of frames ("dir"), a .gif, or a .png strip; a file output is checked
    (see io.check_output) before any work."""
    from unclip_cli.io import check_output, show

    if output and (output.endswith("/") or Path(output).is_dir()):
        kind = "dir"
    elif output and output.lower().endswith(".gif"):
        kind = "gif"
    elif output and not output.lower().endswith(".png") and output != "-":
        raise UserError(f"{show(output)}: -o takes a .png (strip), a .gif, or a folder ending in /")
    else:
        return "strip"  # checked by stdout_target
    folder = Path(output)
    check_output(folder / "frame-000.png" if kind == "dir" and folder.is_dir() else folder)
    return kind


def write_frames(pil, target, kind) -> None:
    """Frames to a folder (frame-000.png...: all or nothing), an animated GIF, or one PNG strip."""
    import io as _io

    from PIL import Image

    from unclip_cli.io import emit, png_bytes, write_folder

    if kind == "dir":
        write_folder(target, {f"frame-{i:03d}.png": png_bytes(img) for i, img in enumerate(pil)})
    elif kind == "gif":
        buf = _io.BytesIO()
        pil[0].save(buf, format="GIF", save_all=True, append_images=pil[1:], duration=200, loop=0)
        emit(buf.getvalue(), target)
    else:
        w, h = pil[0].size
        strip = Image.new("RGB", (w * len(pil), h))
        for i, img in enumerate(pil):
            strip.paste(img, (i * w, 0))
        emit(png_bytes(strip), target)


# ---------------------------------------------------------------------- text diffs


@app.command("text-diff")
def text_diff_cmd(
    source: Annotated[Optional[str], typer.Argument(help="An image or a latent file (from invert), or '-'.")] = None,
    from_text: Annotated[str, typer.Option("--from", help="Caption of the image as it is (may be empty).")] = "",
    to_text: Annotated[str, typer.Option("--to", help="Caption of what it should become.", show_default=False)] = ...,
    frames: Annotated[int, typer.Option("-n", "--frames", help="Number of frames, theta from 0 to --max-theta.")] = 5,
    max_theta: Annotated[float, typer.Option("--max-theta", help="Largest slerp position toward the text diff.")] = 0.5,
    output: FramesOutOpt = None,
    model: ModelOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    refine: RefineOpt = 3,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Edit an image toward a caption: z_d = normalize(z_t(to) - z_t(from)), frames slerp(z_i, z_d, theta).

    x_T stays the image's inverted latent, so theta = 0 gives the image back (DDIM, eta 0).
    """
    from unclip_cli.io import stdout_target

    if frames < 2:
        raise UserError("-n must be >= 2")
    if not 0 < max_theta <= 1:
        raise UserError("--max-theta must be in (0, 1]")
    if not to_text.strip():
        raise UserError("--to must be a non-empty caption")
    check_min("--steps", steps, 2)
    kind = frames_kind(output)
    target = stdout_target(output) if kind == "strip" else output
    pipe = open_pipeline(model, device, precision)
    with progress(quiet) as cb:
        images = pipe.text_diff(_item(source or "-"), to_text=to_text, from_text=from_text, frames=frames, max_theta=max_theta,
                                steps=steps, guidance=guidance, refine=refine, name=source or "<stdin>", callback=cb)
    write_frames(images, target, kind)


# ---------------------------------------------------------------------- mix


@app.command("mix")
def mix_cmd(
    items: Annotated[list[str], typer.Argument(help="Images, image-embedding files, or text:PROMPT items.")],
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", help="Comma-separated weights, one per item (default: equal, summing to 1).")] = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    kind: KindOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """A weighted linear mix of image embeddings, as Kandinsky 2.2's `interpolate`: sum_k w_k z_k.

    Images are encoded with CLIP; text:PROMPT items become image embeddings through the prior
    (with --kind, --steps, --guidance, --seed). Linear, unlike slerp: mixing two directions shortens the
    vector. Writes an image-embedding file for `decode`.
    """
    from unclip_cli.io import stdout_target, write_stage
    from unclip_cli.record import from_meta

    if not items:
        raise UserError("no items to mix")
    if sum(1 for it in items if it == "-") > 1:
        raise UserError("only one item can be stdin")
    w = _parse_weights(weights, len(items))
    check_min("--steps", steps, 2)
    target = stdout_target(output)
    pipe = open_pipeline(model, device, precision)
    inputs = [it if it.startswith("text:") else _item(it) for it in items]
    with progress(quiet) as cb:
        mixed = pipe.mix(inputs, w, kind=kind, steps=steps, guidance=guidance, seed=seed, names=items, callback=cb)
    if any(it.startswith("text:") for it in items):
        report_seed(seed, from_meta(mixed.meta), "prior_seed")
    write_stage(mixed, target)


def _parse_weights(text: str | None, n: int) -> list[float]:
    if text is None:
        return [1.0 / n] * n
    try:
        w = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--weights {text!r}: expected comma-separated numbers") from None
    if len(w) != n:
        raise UserError(f"--weights has {len(w)} value(s) for {n} item(s)")
    if any(x != x or abs(x) == float("inf") for x in w):
        raise UserError("--weights must be finite numbers")
    return w
