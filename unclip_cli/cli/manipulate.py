"""The paper's manipulations (section 3): invert, vary, interpolate, text-diff, mix.

Each works on the bipartite latent (z_i, x_T): z_i the CLIP image embedding, x_T the decoder noise
that DDIM with eta 0 turns into the image. An input is an image (encoded with CLIP, and inverted
where x_T is needed), a latent file from `invert`, or an image-embedding file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from unclip_cli.cli.common import (
    DeviceOpt, GuidanceOpt, KindOpt, ModelOpt, OutputOpt, QuietOpt, SeedOpt, StepsOpt,
    app, check_min, make_generator, null_text, open_model_set, progress, resolve_device, stage_meta,
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


@dataclass
class Latent:
    """One input as far as it is known: its embedding (1, D), its x_T (1, C, S, S) or None."""

    embed: "object"
    noise: "object | None"
    steps: int | None = None  # the decoder steps and guidance x_T was inverted with
    guidance: float | None = None
    source: str = ""


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


def _invert_images(ms, dev, images, steps, guidance, refine, quiet):
    """PIL images -> (z (B, D), x_T (B, C, S, S), reconstruction PSNRs): CLIP embedding, then DDIM inversion."""
    import torch

    from unclip_cli.io import exact_images_to_tensor
    from unclip_cli.stages.manipulate import decode_latent, fit_image, invert

    clip = ms.load("clip", dev)
    decoder = ms.load("decoder", dev)
    size = decoder.cfg.unet.sample_size
    embed = clip.encode_image(images).cpu()
    # each image alone: sizes may differ; a PNG from decode gives its exact float values
    pixels = torch.stack([fit_image(exact_images_to_tensor([img])[0], size) for img in images])
    null = null_text(ms, dev, len(images))
    with progress("invert", quiet) as cb:
        x_T, _ = invert(decoder, pixels, embed, null, null, steps=steps, guidance=guidance, refine=refine, callback=cb)
    back = decode_latent(decoder, embed, x_T, null, steps=steps, guidance=guidance)
    mse = ((back.cpu() - pixels) ** 2).flatten(1).mean(1)  # pixels in [-1, 1]: peak-to-peak 2
    psnr = [float(10 * torch.log10(4 / m.clamp_min(1e-12))) for m in mse]
    return embed, x_T.cpu(), psnr


def _latent_of(source, ms, dev, *, steps, guidance, refine, quiet, need_noise: bool, read=None) -> Latent:
    """An image, latent file or embedding file -> Latent (inverting an image when need_noise).

    read: the (kind, content) `_read_item(source)` already gave, else it is read here."""
    kind, item = read or _read_item(source)
    if kind == "image":
        if not need_noise:
            return Latent(ms.load("clip", dev).encode_image([item]).cpu(), None, source=source)
        embed, x_T, psnr = _invert_images(ms, dev, [item], steps, guidance, refine, quiet)
        _say(f"{source}: inverted in {steps} steps (guidance {guidance:g}), reconstruction {psnr[0]:.1f} dB PSNR")
        return Latent(embed, x_T, steps, guidance, source)
    stage = item
    if stage.kind == "text":
        raise UserError(f"{source}: text conditioning; expected an image, a latent or an image embedding")
    embed = stage.tensors["image_embed"].float()
    ms.check_clip(stage.clip, embed.shape[-1], source)
    if embed.shape[0] != 1:
        _say(f"{source}: a batch of {embed.shape[0]}; using the first")
    if stage.kind == "latent":
        noise = stage.tensors["noise"].float()[:1]
        return Latent(
            embed[:1], noise, int(stage.meta.get("decoder_steps", 0)) or None,
            float(stage.meta["decoder_guidance"]) if "decoder_guidance" in stage.meta else None, source,
        )
    if need_noise:
        _refuse_bare_embedding(source, item)
    return Latent(embed[:1], None, source=source)


def _refuse_bare_embedding(source: str, stage) -> None:
    """Where x_T is needed, an image-embedding file (no x_T) is refused."""
    if stage.kind == "image":
        raise UserError(f"{source}: an image embedding has no x_T to keep; pass the image or its latent (unclip invert)")


def _decoder_settings(ms, steps, guidance, *latents):
    """Steps and guidance: given, else those the latents were inverted with, else the set's defaults."""
    settings = ms.sampling("decoder")
    known = [lat for lat in latents if lat is not None and lat.steps is not None]
    steps = steps or (known[0].steps if known else settings["steps"])
    if guidance is None:
        guidance = known[0].guidance if known else settings["guidance"]
    return steps, guidance


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


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
    quiet: QuietOpt = False,
) -> None:
    """DDIM-invert images into latent files (z_i, x_T); `decode` of the latent gives the image back.

    The images are encoded with CLIP (z_i), fitted to the decoder's size, and the decoder's DDIM
    steps (conditioned on z_i, empty text) are solved backwards to x_T. The latent records the
    steps and guidance; `decode`, `vary`, `interpolate --invert` and `text-diff` reuse them.
    """
    from unclip_cli.io import StageFile, read_images, stdout_target, write_stage

    check_min("--steps", steps, 2)
    if refine < 0:
        raise UserError("--refine must be >= 0")
    items = read_images(images)
    target = stdout_target(output)
    ms = open_model_set(model)
    dev = resolve_device(device)
    steps = steps or ms.sampling("decoder")["steps"]
    pils, names = [img for img, _ in items], [name for _, name in items]
    embed, x_T, psnr = _invert_images(ms, dev, pils, steps, guidance, refine, quiet)
    for name, p in zip(names, psnr):
        _say(f"{name}: inverted in {steps} steps (guidance {guidance:g}), reconstruction {p:.1f} dB PSNR")
    meta = stage_meta(ms, images=names, decoder_steps=steps, decoder_guidance=guidance, reconstruction_psnr=psnr)
    write_stage(StageFile("latent", {"image_embed": embed, "noise": x_T}, meta), target)


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
    quiet: QuietOpt = False,
) -> None:
    """Variations of an image: DDIM with eta > 0 from its inverted latent (or from fresh noise).

    Writes N 64px PNGs (out-0.png, out-1.png...; back to back on stdout).
    """
    from unclip_cli.io import stdout_target, tensor_to_images, write_images
    from unclip_cli.stages.decode import draw_latent_noise
    from unclip_cli.stages.manipulate import vary

    check_min("-n", n)
    check_min("--steps", steps, 2)
    if eta < 0:
        raise UserError("--eta must be >= 0")
    target = stdout_target(output)
    ms = open_model_set(model)
    dev = resolve_device(device)
    inv_steps = steps or ms.sampling("decoder")["steps"]
    lat = _latent_of(
        source or "-", ms, dev, steps=inv_steps, guidance=1.0 if guidance is None else guidance, refine=refine,
        quiet=quiet, need_noise=not fresh_noise,
    )
    steps, guidance = _decoder_settings(ms, steps, guidance, lat if not fresh_noise else None)
    decoder = ms.load("decoder", dev)
    gen, seed = make_generator(seed)
    x_T = draw_latent_noise(decoder, n, gen) if fresh_noise else lat.noise
    embed = lat.embed.expand(n, -1) if fresh_noise else lat.embed
    with progress("vary", quiet) as cb:
        images = vary(
            decoder, embed, x_T, null_text(ms, dev), n=1 if fresh_noise else n, eta=eta, steps=steps,
            guidance=guidance, generator=gen, callback=cb,
        )
    write_images(tensor_to_images(images), target)


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
    quiet: QuietOpt = False,
) -> None:
    """Decode N frames along the slerp of z_i from A to B (the paper's interpolations).

    --fixed-noise (default): every frame from the same x_T; --invert: x_T slerped between the two
    inverted latents. -o strip.png: frames side by side; -o anim.gif; -o DIR/: DIR/frame-000.png...
    """
    from unclip_cli.io import stdout_target, tensor_to_images
    from unclip_cli.stages.decode import draw_latent_noise, run_decoder
    from unclip_cli.stages.manipulate import decode_latent, slerp_frames

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
    ms = open_model_set(model)
    dev = resolve_device(device)
    inv_steps = steps or ms.sampling("decoder")["steps"]
    common = dict(steps=inv_steps, guidance=1.0 if guidance is None else guidance, refine=refine, quiet=quiet, need_noise=invert)
    items = [_read_item(a), _read_item(b)]  # both read (and checked) before any inversion runs
    if invert:
        for source, (kind, item) in zip((a, b), items):
            if kind == "stage":
                _refuse_bare_embedding(source, item)
    la, lb = (_latent_of(s, ms, dev, read=it, **common) for s, it in zip((a, b), items))
    steps, guidance = _decoder_settings(ms, steps, guidance, *((la, lb) if invert else ()))
    embeds = slerp_frames(la.embed, lb.embed, frames)  # (N, D)
    net = ms.load("decoder", dev)
    gen, seed = make_generator(seed)
    null = null_text(ms, dev)
    with progress("interpolate", quiet) as cb:
        if invert:  # x_T slerped between the inverted latents: the endpoints reconstruct A and B
            x_T = slerp_frames(la.noise, lb.noise, frames)  # (N, C, S, S)
            images = decode_latent(net, embeds, x_T, null, steps=steps, guidance=guidance, eta=eta, generator=gen, callback=cb)
        else:
            x_T = draw_latent_noise(net, 1, gen).expand(frames, -1, -1, -1).contiguous()
            images = run_decoder(
                net, embeds, null.expand(frames), null, steps=steps, guidance=guidance, generator=gen, eta=eta,
                x_T=x_T, callback=cb,
            )
    write_frames(tensor_to_images(images), target, kind)


def frames_kind(output: str | None) -> str:
    if output and (output.endswith("/") or Path(output).is_dir()):
        return "dir"
    if output and output.lower().endswith(".gif"):
        return "gif"
    if output and not output.lower().endswith(".png") and output != "-":
        raise UserError(f"{output}: -o takes a .png (strip), a .gif, or a folder ending in /")
    return "strip"


def write_frames(pil, target, kind) -> None:
    import io as _io

    from PIL import Image

    from unclip_cli.io import emit, png_bytes

    if kind == "dir":
        folder = Path(target)
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(pil):
            emit(png_bytes(img), str(folder / f"frame-{i:03d}.png"))
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
    quiet: QuietOpt = False,
) -> None:
    """Edit an image toward a caption: z_d = normalize(z_t(to) - z_t(from)), frames slerp(z_i, z_d, theta).

    x_T stays the image's inverted latent, so theta = 0 gives the image back (DDIM, eta 0).
    """
    from unclip_cli.io import stdout_target, tensor_to_images
    from unclip_cli.stages.manipulate import decode_latent, text_diff

    if frames < 2:
        raise UserError("-n must be >= 2")
    if not 0 < max_theta <= 1:
        raise UserError("--max-theta must be in (0, 1]")
    if not to_text.strip():
        raise UserError("--to must be a non-empty caption")
    check_min("--steps", steps, 2)
    kind = frames_kind(output)
    target = stdout_target(output) if kind == "strip" else output
    ms = open_model_set(model)
    dev = resolve_device(device)
    inv_steps = steps or ms.sampling("decoder")["steps"]
    lat = _latent_of(
        source or "-", ms, dev, steps=inv_steps, guidance=1.0 if guidance is None else guidance, refine=refine,
        quiet=quiet, need_noise=True,
    )
    steps, guidance = _decoder_settings(ms, steps, guidance, lat)
    text_embed, _, _ = ms.load("clip", dev).encode_text([from_text, to_text])
    thetas = [max_theta * i / (frames - 1) for i in range(frames)]
    try:
        embeds = text_diff(lat.embed, text_embed[:1].cpu(), text_embed[1:].cpu(), thetas)
    except ValueError as e:
        raise UserError(str(e)) from None
    null = null_text(ms, dev)
    with progress("text-diff", quiet) as cb:
        images = decode_latent(
            ms.load("decoder", dev), embeds, lat.noise.expand(frames, -1, -1, -1), null, steps=steps,
            guidance=guidance, callback=cb,
        )
    write_frames(tensor_to_images(images), target, kind)


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
    quiet: QuietOpt = False,
) -> None:
    """A weighted linear mix of image embeddings, as Kandinsky 2.2's `interpolate`: sum_k w_k z_k.

    Images are encoded with CLIP; text:PROMPT items become image embeddings through the prior
    (with --kind, --steps, --guidance, --seed). Linear, unlike slerp: mixing two directions shortens the
    vector. Writes an image-embedding file for `decode`.
    """
    import torch

    from unclip_cli.io import StageFile, stdout_target, write_stage
    from unclip_cli.stages.conditioning import TextCond
    from unclip_cli.stages.manipulate import mix

    if not items:
        raise UserError("no items to mix")
    if sum(1 for it in items if it == "-") > 1:
        raise UserError("only one item can be stdin")
    w = _parse_weights(weights, len(items))
    check_min("--steps", steps, 2)
    target = stdout_target(output)
    ms = open_model_set(model)
    dev = resolve_device(device)
    texts = [it[len("text:"):] for it in items if it.startswith("text:")]
    prompt_embeds = iter(())
    if texts:
        from unclip_cli.stages.priors import sample_prior

        clip = ms.load("clip", dev)
        cond = TextCond(*clip.encode_text(texts))
        gen, seed = make_generator(seed)
        with progress("prior", quiet) as cb:
            found, _ = sample_prior(ms, dev, kind, cond, null_text(ms, dev), gen, steps=steps, guidance=guidance, callback=cb)
        prompt_embeds = iter(found.cpu())
    embeds = []
    for it in items:
        if it.startswith("text:"):
            embeds.append(next(prompt_embeds)[None])
        else:
            embeds.append(_latent_of(it, ms, dev, steps=None, guidance=None, refine=0, quiet=quiet, need_noise=False).embed)
    mixed = mix(torch.cat(embeds), w)
    meta = stage_meta(ms, mix=json.dumps({"items": items, "weights": w}), seed=seed if texts else None)
    write_stage(StageFile("image", {"image_embed": mixed}, meta), target)


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
