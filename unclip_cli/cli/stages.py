"""The pipeline stage commands: encode-text, encode-image, prior, decode, upsample, slerp, generate, info."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from unclip_cli.cli.common import (
    DeviceOpt, GuidanceOpt, KindOpt, ModelOpt, OutputOpt, QuietOpt, SeedOpt, StepsOpt,
    resolve_device, make_generator, null_text, open_model_set, check_min, progress, read_prompts, stage_meta, app,
)
from unclip_cli.errors import UserError


# ---------------------------------------------------------------------- stages


@app.command("encode-text")
def encode_text(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompts (default: one per line on stdin).")] = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Encode prompts with CLIP into a text conditioning file."""
    from unclip_cli.io import StageFile, stdout_target, write_stage
    from unclip_cli.stages.conditioning import TextCond

    texts = read_prompts(prompts)
    target = stdout_target(output)
    ms = open_model_set(model)
    clip = ms.load("clip", resolve_device(device))
    cond = TextCond(*clip.encode_text(texts))
    write_stage(StageFile("text", cond.tensors(), stage_meta(ms, prompts=texts)), target)


@app.command("encode-image")
def encode_image(
    images: Annotated[Optional[list[str]], typer.Argument(help="Image files (default: PNG(s) on stdin).")] = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Encode images with CLIP into an image-embedding file."""
    from unclip_cli.io import StageFile, read_images, stdout_target, write_stage

    items = read_images(images)
    target = stdout_target(output)
    ms = open_model_set(model)
    clip = ms.load("clip", resolve_device(device))
    embed = clip.encode_image([img for img, _ in items])
    meta = stage_meta(ms, images=[name for _, name in items])
    write_stage(StageFile("image", {"image_embed": embed}, meta), target)


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
    quiet: QuietOpt = False,
) -> None:
    """Run a prior: text conditioning -> CLIP image embedding (text carried along).

    --kind diffusion (the diffusion prior) or ar (the autoregressive one); both write the same file.
    --candidates K draws K embeddings per prompt and keeps the one with the largest dot product
    with the text embedding (K = 1: one draw).
    """
    from unclip_cli.io import StageFile, read_stage, stdout_target, write_stage
    from unclip_cli.stages.conditioning import TextCond
    from unclip_cli.stages.priors import KINDS, prior_kind, sample_prior

    check_min("--steps", steps, 2)
    check_min("--candidates", candidates)
    stage = read_stage(source, "a text conditioning file (from encode-text)")
    if stage.kind != "text":
        raise UserError(f"prior reads text conditioning (from encode-text), got a {stage.kind} file")
    target = stdout_target(output)
    ms = open_model_set(model)
    cond = TextCond.from_tensors(stage.tensors)
    if cond is None:
        raise UserError("text conditioning file lacks text_hidden / text_mask")
    ms.check_clip(stage.clip, cond.embed.shape[-1], source or "<stdin>")
    dev = resolve_device(device)
    gen, seed = make_generator(seed)
    ar = dict(temperature=temperature, top_p=top_p, similarity_percentile=similarity_percentile)
    with progress(KINDS[prior_kind(ms, kind)], quiet) as cb:
        embed, settings = sample_prior(ms, dev, kind, cond, null_text(ms, dev), gen, steps=steps, guidance=guidance,
                                       candidates=candidates, callback=cb, **ar)
    meta = dict(stage.meta)
    meta.update(stage_meta(ms, seed=seed, **{f"prior_{k}": v for k, v in settings.items()}))
    write_stage(StageFile("image", {"image_embed": embed, **cond.tensors()}, meta), target)


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
    quiet: QuietOpt = False,
) -> None:
    """Decode image embeddings into 64x64 images (PNG; a batch gives out-0.png, out-1.png...).

    A latent file from `invert` is decoded from its x_T with DDIM (eta 0 unless --eta) over the
    latent timesteps, with the steps and guidance it was inverted with: that gives the image back.
    """
    from unclip_cli.io import read_stage, stdout_target, tensor_to_images, write_images
    from unclip_cli.stages.conditioning import TextCond
    from unclip_cli.stages.decode import run_decoder

    check_min("--steps", steps, 2)
    if eta is not None and eta < 0:
        raise UserError("--eta must be >= 0")
    stage = read_stage(source, "an image-embedding file")
    if stage.kind == "text":
        raise UserError("decode reads image embeddings: run `unclip prior` on text conditioning first")
    target = stdout_target(output)
    ms = open_model_set(model)
    embed = stage.tensors["image_embed"].float()
    ms.check_clip(stage.clip, embed.shape[-1], source or "<stdin>")
    dev = resolve_device(device)
    null = null_text(ms, dev, embed.shape[0])
    cond = TextCond.from_tensors(stage.tensors) or null
    settings = ms.sampling("decoder")
    x_T = None
    if stage.kind == "latent":  # from `invert`: its x_T, with DDIM and the steps / guidance it was inverted with
        x_T = stage.tensors["noise"].float()
        eta = 0.0 if eta is None else eta
        settings = {"steps": int(stage.meta.get("decoder_steps", settings["steps"])),
                    "guidance": float(stage.meta.get("decoder_guidance", settings["guidance"]))}
    steps = steps or settings["steps"]
    guidance = settings["guidance"] if guidance is None else guidance
    net = ms.load("decoder", dev)
    size, channels = net.cfg.unet.sample_size, net.cfg.unet.in_channels
    if x_T is not None and tuple(x_T.shape[1:]) != (channels, size, size):
        raise UserError(f"{source or '<stdin>'}: latent noise of shape {tuple(x_T.shape[1:])}, the decoder takes {(channels, size, size)}")
    gen, seed = make_generator(seed)
    with progress("decoder", quiet) as cb:
        if x_T is None:
            images = run_decoder(net, embed, cond, null, steps=steps, guidance=guidance, generator=gen, eta=eta, callback=cb)
        else:
            from unclip_cli.stages.manipulate import decode_latent

            images = decode_latent(net, embed, x_T, null, steps=steps, guidance=guidance, eta=eta, generator=gen, callback=cb)
    # the exact floats and the generator's state ride along, so `decode | upsample` is one pipeline run
    carry = [{"image": x.float().cpu(), "rng_state": gen.get_state()} for x in images]
    write_images(tensor_to_images(images), target, carry=carry)


@app.command("upsample")
def upsample(
    source: Annotated[Optional[str], typer.Argument(help="A 64px or 256px image (PNG), or '-'.")] = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    steps: StepsOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Upsample 64px -> 256px or 256px -> 1024px (chosen by the input size).

    Without --seed, a PNG from `decode` (or `upsample`) continues that stage's random generator, and
    its exact float values are used instead of the 8-bit pixels: `decode --seed S | upsample` draws
    and computes what one pipeline run with seed S does.
    """
    from unclip_cli.io import carried, exact_images_to_tensor, read_images, stdout_target, tensor_to_images, write_images
    from unclip_cli.stages.upsample import run_upsampler

    check_min("--steps", steps, 2)
    items = read_images([source] if source else None, "a 64px or 256px PNG")
    target = stdout_target(output)
    sizes = {img.size for img, _ in items}
    if len(sizes) != 1:
        raise UserError(f"images of different sizes {sorted(sizes)}: upsample one size at a time")
    (w, h), = sizes
    ms = open_model_set(model)
    component = {64: "upsampler-256", 256: "upsampler-1024"}.get(w) if w == h else None
    if component is None:
        raise UserError(f"{items[0][1]}: a {w}x{h} image; upsample takes 64x64 (to 256) or 256x256 (to 1024)")
    dev = resolve_device(device)
    net = ms.load(component, dev)
    if net.cfg.low_res != w:
        raise UserError(f"{component} of {ms.name!r} takes {net.cfg.low_res}px input, got {w}px")
    steps = steps or ms.sampling(component)["steps"]
    pils = [img for img, _ in items]
    gen = _continued_generator(carried(pils, "rng_state")) if seed is None else None
    if gen is None:
        gen, seed = make_generator(seed)
    with progress(component, quiet) as cb:
        images = run_upsampler(net, exact_images_to_tensor(pils), steps=steps, generator=gen, callback=cb)
    write_images(tensor_to_images(images), target, carry=[{"rng_state": gen.get_state()}] * len(images))


def _continued_generator(states):
    """A CPU generator in the state the images carry (all the same), else None."""
    import torch

    if not states or any(not torch.equal(s, states[0]) for s in states):
        return None
    gen = torch.Generator("cpu")
    try:
        gen.set_state(states[0])
    except (RuntimeError, TypeError):
        return None
    return gen


@app.command("slerp")
def slerp_cmd(
    a: Annotated[str, typer.Argument(help="First image-embedding file (.safetensors or .npy).")],
    b: Annotated[str, typer.Argument(help="Second image-embedding file.")],
    t: Annotated[float, typer.Option("-t", help="Position on the arc: 0 gives A, 1 gives B.")] = 0.5,
    output: OutputOpt = None,
) -> None:
    """Spherical interpolation between two image embeddings."""
    from unclip_cli.io import StageFile, read_stage, stdout_target, write_stage
    from unclip_cli.stages.interpolate import slerp

    if a == "-" and b == "-":
        raise UserError("only one of A and B can be stdin")
    sa, sb = read_stage(a, "an image-embedding file"), read_stage(b, "an image-embedding file")
    for s, name in ((sa, a), (sb, b)):
        if s.kind == "text":
            raise UserError(f"{name}: text conditioning; slerp takes image embeddings (run `unclip prior` first)")
    ea, eb = sa.tensors["image_embed"].float(), sb.tensors["image_embed"].float()
    if ea.shape[-1] != eb.shape[-1]:
        raise UserError(f"embedding dimensions differ: {ea.shape[-1]} vs {eb.shape[-1]}")
    if sa.clip and sb.clip and sa.clip != sb.clip:
        raise UserError(f"{a} and {b} were made with different CLIPs ({sa.clip} vs {sb.clip})")
    if ea.shape[0] != eb.shape[0] and 1 not in (ea.shape[0], eb.shape[0]):
        raise UserError(f"batch sizes differ: {ea.shape[0]} vs {eb.shape[0]}")
    target = stdout_target(output)
    meta = {k: v for k, v in (sa.meta or sb.meta).items() if k in ("clip", "clip_dim", "model")}
    meta["slerp"] = json.dumps({"a": a, "b": b, "t": t})
    write_stage(StageFile("image", {"image_embed": slerp(ea, eb, t)}, meta), target)


@app.command("generate")
def generate(
    prompts: Annotated[list[str], typer.Argument(help="Prompt(s); several give out-0.png, out-1.png...")],
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
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Prompt -> image through every stage, with one random generator (as diffusers' UnCLIPPipeline)."""
    from unclip_cli.io import stdout_target, tensor_to_images, write_images
    from unclip_cli.stages.conditioning import TextCond
    from unclip_cli.stages.decode import run_decoder
    from unclip_cli.stages.priors import KINDS, prior_kind, sample_prior
    from unclip_cli.stages.upsample import run_upsampler

    if size not in (64, 256, 1024):
        raise UserError("--size must be 64, 256 or 1024")
    for name, v in (("--prior-steps", prior_steps), ("--decoder-steps", decoder_steps), ("--upsampler-steps", upsampler_steps)):
        check_min(name, v, 2)
    if not prompts:
        raise UserError("no prompt given")
    target = stdout_target(output)
    ms = open_model_set(model)
    kind = prior_kind(ms, prior_kind_opt)
    p_component = KINDS[kind]
    needed = ["clip", p_component, "decoder"] + ["upsampler-256"] * (size >= 256) + ["upsampler-1024"] * (size == 1024)
    for component in needed:
        ms.require(component)
    dev = resolve_device(device)
    p_set, d_set = ms.sampling(p_component), ms.sampling("decoder")
    pg = p_set["guidance"] if prior_guidance is None else prior_guidance
    dg = d_set["guidance"] if decoder_guidance is None else decoder_guidance
    clip = ms.load("clip", dev)
    cond = TextCond(*clip.encode_text(list(prompts)))
    null = TextCond(*clip.encode_text([""] * len(prompts)))  # batched as diffusers: the same last bits
    gen, seed = make_generator(seed)
    guided = pg > 1.0 or dg > 1.0  # diffusers guides both stages when either scale is > 1 (diffusion prior)
    with progress(p_component, quiet) as cb:
        embed, _ = sample_prior(ms, dev, kind, cond, null, gen, steps=prior_steps, guidance=pg, guided=guided, callback=cb)
    with progress("decoder", quiet) as cb:
        image = run_decoder(
            ms.load("decoder", dev), embed, cond, null, steps=decoder_steps or d_set["steps"], guidance=dg,
            generator=gen, guided=guided, callback=cb,
        )
    for component in needed[3:]:
        with progress(component, quiet) as cb:
            image = run_upsampler(
                ms.load(component, dev), image, steps=upsampler_steps or ms.sampling(component)["steps"],
                generator=gen, callback=cb,
            )
    write_images(tensor_to_images(image), target)


@app.command("info")
def info(
    path: Annotated[str, typer.Argument(help="A stage file, .npy, image, or model-set folder ('-': stdin).")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the summary to a file.")] = None,
) -> None:
    """Print a human-readable summary of a stage file, image or model set."""
    from unclip_cli.info import describe
    from unclip_cli.io import emit

    text = "\n".join(describe(path)) + "\n"
    if output is None or output == "-":
        typer.echo(text, nl=False)
    else:
        emit(text.encode(), output)


