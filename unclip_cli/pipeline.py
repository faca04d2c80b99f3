"""The one orchestration layer and the Python API: a model set on a device, every stage as a method.

    from unclip_cli import Pipeline
    pipe = Pipeline.load("weights/shapes-small")        # or Pipeline.load() for $UNCLIP_MODEL / the shipped set
    images = pipe.generate(["a large red star on a blue background"], size=64, seed=3)
    images[0].save("star.png")

Every CLI command, `unclip eval` and the scripts run through here; the Typer layer only parses
options, reads and writes files. Methods take and return what the command-line stages pass
between them: stage files (`StageFile`: named tensors + a record) for text conditioning and
embeddings, PIL images for pictures. Each image carries its record (`img.info["unclip"]`, see
record.py) and, where the next stage can continue exactly, the float image behind its pixels and
the random generator's state (`img.info[io.CARRY_KEY]`); `io.png_bytes` writes both into the PNG.

Randomness: a method draws its noise from one CPU `torch.Generator` seeded with `seed` (drawn at
random and recorded when None), so a seed means the same noise on any device; `generate` draws
prior, decoder and upsampler noise from one generator in pipeline order, as diffusers'
UnCLIPPipeline. Guidance follows diffusion/guidance.py's rule; `generate` uses its diffusers pair.
The image manipulations (invert, vary, interpolate, text_diff, mix) live in pipeline_edit.py and
are methods of the same object.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from unclip_cli import __version__, checks
from unclip_cli.device import Generators, make_generator, resolve_device, resolve_precision
from unclip_cli.diffusion.guidance import Guidance
from unclip_cli.errors import UserError
from unclip_cli.io import CARRY_KEY, RECORD_KEY, StageFile, exact_images_to_tensor, tensor_to_images
from unclip_cli.modelset import ModelSet
from unclip_cli.pipeline_edit import EditMixin
from unclip_cli.record import from_meta, from_png_text, png_text, to_meta
from unclip_cli.stages.conditioning import TextCond

PRIOR_KINDS = {"diffusion": "prior", "ar": "prior-ar"}  # kind -> component
SIZES = (64, 256, 1024)
UPSAMPLERS = {64: "upsampler-256", 256: "upsampler-1024"}  # input size -> component
# rows the upsampler's network sees at once (default: the whole batch): at 1024 px one image's activations
# dwarf the batch's state and noise, so a batch of 8 needs the memory of one (the pixels do not change)
MICRO_BATCH = {"upsampler-1024": 1}
AR_OPTIONS = ("temperature", "top_p", "similarity_percentile")
Callback = Callable[[str, int, int], None]  # (stage, step index, number of steps)


def model_identity(ms: ModelSet) -> str:
    """A fingerprint of a set's weights: each component file's header, size, first and last MiB (cheap at any size)."""
    h = hashlib.sha256()
    for component in ms.manifest.get("components", []):
        folder = ms.path / component
        for path in sorted(folder.glob("*.safetensors")):
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
                h.update(f"{component}/{path.name}:{size}".encode())
                h.update(f.read(min(n, size) + (1 << 20)))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read())
    return h.hexdigest()[:16]


def _stage_callback(callback: Callback | None, stage: str):
    return None if callback is None else (lambda i, n: callback(stage, i, n))


class Pipeline(EditMixin):
    """A model set loaded on a device, with the sampling defaults of its manifest.

    Networks load on first use and stay loaded. `log`, when given, receives one-line notes (an
    image inverted, a batch cut to its first row); nothing here prints.
    """

    def __init__(self, models: ModelSet, device: torch.device | str = "cpu", *, precision: str | None = None,
                 log: Callable[[str], None] | None = None):
        self.models = models
        self.device = torch.device(device)
        self.precision, self.dtype = resolve_precision(precision, self.device)  # the networks' weights, e.g. "bf16"
        self.log = log or (lambda message: None)
        self._identity: str | None = None

    @classmethod
    def load(cls, model: str | os.PathLike | ModelSet | None = None, *, device: str | torch.device | None = None,
             precision: str | None = None, log: Callable[[str], None] | None = None) -> "Pipeline":
        """model: a model-set folder, or None for $UNCLIP_MODEL, else the shipped set; device: None picks
        $UNCLIP_DEVICE, else cuda when present, else the CPU; precision: the networks' weights, auto (None:
        $UNCLIP_PRECISION, else auto), fp32, bf16 or fp16; auto is fp32 off CUDA, bf16 (fp16 where the GPU
        lacks it) on CUDA. CLIP, the samplers' state and the random stream stay float32 at every precision."""
        ms = model if isinstance(model, ModelSet) else ModelSet.open(None if model is None else str(model))
        return cls(ms, resolve_device(None if device is None else str(device)), precision=precision, log=log)

    # ------------------------------------------------------------------ the set

    @property
    def name(self) -> str:
        return self.models.name

    def net(self, component: str) -> torch.nn.Module:
        """A component's network on this pipeline's device, in its precision (loaded once)."""
        return self.models.load(component, self.device, self.dtype)

    def settings(self, component: str, **given) -> dict:
        """The set's sampling defaults for a component, with the given (non-None) values on top, checked:
        steps within the component's training chain, finite guidance, the AR prior's ranges."""
        merged = self.models.sampling(component)
        merged.update({k: v for k, v in given.items() if v is not None})
        chain = self.models.load_config(component).diffusion.num_timesteps if "steps" in merged else None
        checks.sampling(merged, component, chain)
        return merged

    def _finite(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        """A stage's result, refused (one line, nothing written) if it holds NaN or infinity: its inputs and
        options were checked finite, so the weights or an input far outside the training data are to blame."""
        cause = f"its inputs and options are finite: check {stage}'s weights in {self.models.path}, or an extreme input"
        return checks.finite_result(x, stage, cause)

    def prior_kind(self, kind: str | None = None) -> str:
        """`kind`, else the set's `prior_kind`, else diffusion (ar if that is all the set has)."""
        ms = self.models
        kind = kind or ms.manifest.get("prior_kind") or ("ar" if ms.has("prior-ar") and not ms.has("prior") else "diffusion")
        if kind not in PRIOR_KINDS:
            raise UserError(f"--kind (prior kind) must be diffusion or ar, got {kind!r}")
        return kind

    def record(self, **fields) -> dict:
        """What every result records about how it was made (see record.py), with `fields` added."""
        if self._identity is None:
            self._identity = model_identity(self.models)
        base = {
            "unclip_version": __version__, "model": self.name, "model_identity": self._identity,
            "model_dir": str(Path(self.models.path).resolve()), "clip": self.models.clip_identity,
            "clip_dim": self.models.clip_dim, "precision": self.precision,
        }
        return {**base, **{k: v for k, v in fields.items() if v is not None}}

    def check_stage(self, stage: StageFile, name: str = "input") -> None:
        """Refuse a stage file made with another CLIP (identity or width)."""
        self.models.check_clip(stage.clip, stage.main.shape[-1], name)

    # ------------------------------------------------------------------ encoders

    def text_cond(self, prompts: Sequence[str]) -> TextCond:
        """CLIP text conditioning of a batch of prompts, encoded as one batch."""
        embed, hidden, mask = self.net("clip").encode_text(list(prompts))
        return TextCond(self._finite(embed, "clip"), self._finite(hidden, "clip"), mask)

    def null(self, batch: int = 1) -> TextCond:
        """The empty prompt's conditioning (guidance's unconditional branch), `batch` rows encoded as one
        batch, as diffusers does (a batch of B can differ from one row in the last bits)."""
        return self.text_cond([""] * batch)

    def encode_text(self, prompts: Sequence[str] | str) -> StageFile:
        """Prompts -> a text conditioning stage file (text_embed, text_hidden, text_mask)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise UserError("no prompt given")
        record = self.record(stages=["encode-text"], prompts=prompts)
        return StageFile("text", self.text_cond(prompts).tensors(), to_meta(record))

    def encode_image(self, images: Sequence[Image.Image], names: Sequence[str] | None = None) -> StageFile:
        """PIL images (any size: shortest side resized, centre crop) -> an image-embedding stage file."""
        embed = self._finite(self.net("clip").encode_image(list(images)).cpu(), "clip")
        record = self.record(stages=["encode-image"], images=list(names) if names else None)
        return StageFile("image", {"image_embed": embed}, to_meta(record))

    # ------------------------------------------------------------------ prior

    def sample_prior(
        self, cond: TextCond, null: TextCond, generator: Generators, *, kind: str | None = None,
        steps: int | None = None, guidance: float | Guidance | None = None, candidates: int = 1,
        callback: Callback | None = None, **ar,
    ) -> tuple[torch.Tensor, dict]:
        """Image embeddings (B, D) from either prior for text conditioning; returns them and the settings
        used (prefixed `prior_` for a record). candidates K > 1: the best of K per prompt."""
        from unclip_cli.stages.manipulate import best_of

        kind = self.prior_kind(kind)
        component = PRIOR_KINDS[kind]
        scale = guidance.scale if isinstance(guidance, Guidance) else guidance
        if kind == "diffusion":
            s = self.settings(component, steps=steps, guidance=scale)
        else:
            s = self.settings(component, guidance=scale, **{k: ar.get(k) for k in AR_OPTIONS})
        g = guidance if isinstance(guidance, Guidance) else Guidance.of(s["guidance"])
        net = self.net(component)
        cb = _stage_callback(callback, component)
        if kind == "diffusion":
            from unclip_cli.stages.prior import run_prior

            def sample(c: TextCond, n: TextCond) -> torch.Tensor:
                return run_prior(net, c, n, steps=s["steps"], guidance=g, generator=generator, callback=cb)
        else:
            from unclip_cli.stages.prior_ar import run_ar_prior

            def sample(c: TextCond, n: TextCond) -> torch.Tensor:
                try:
                    return run_ar_prior(net, c, n, guidance=g, generator=generator, callback=cb, **{k: s[k] for k in AR_OPTIONS})
                except ValueError as e:
                    raise UserError(f"prior-ar: {e}") from None

        embed = self._finite(best_of(sample, cond, null, candidates), component)
        return embed, {"prior_kind": kind, **{f"prior_{k}": v for k, v in s.items()}, "prior_candidates": candidates}

    def prior(
        self, text: StageFile | Sequence[str] | str, *, kind: str | None = None, steps: int | None = None,
        guidance: float | None = None, seed: int | None = None, candidates: int = 1, temperature: float | None = None,
        top_p: float | None = None, similarity_percentile: float | None = None, callback: Callback | None = None,
    ) -> StageFile:
        """Text conditioning (a stage file, or prompts) -> an image-embedding stage file (the text carried along)."""
        if not isinstance(text, StageFile):
            text = self.encode_text(text)
        if text.kind != "text":
            raise UserError(f"the prior reads text conditioning (from encode-text), got a {text.kind} file")
        cond = TextCond.from_tensors(text.tensors)
        if cond is None:
            raise UserError("text conditioning file lacks text_hidden / text_mask")
        self.check_stage(text)
        generator, seed = make_generator(seed)
        embed, settings = self.sample_prior(
            cond, self.null(len(cond)), generator, kind=kind, steps=steps, guidance=guidance, candidates=candidates,
            callback=callback, temperature=temperature, top_p=top_p, similarity_percentile=similarity_percentile,
        )
        record = {**from_meta(text.meta), **self.record(**settings, prior_seed=seed)}
        record["stages"] = [*record.get("stages", []), "prior"]
        return StageFile("image", {"image_embed": embed.cpu(), **cond.tensors()}, to_meta(record))

    # ------------------------------------------------------------------ decoder and upsamplers

    def run_decoder(
        self, embed: torch.Tensor, cond: TextCond, null: TextCond, generator: Generators, *, steps: int | None = None,
        guidance: float | Guidance | None = None, eta: float | None = None, callback: Callback | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Embeddings (B, D) -> 64 px images (B, 3, 64, 64) in [-1, 1]; returns them and the settings used."""
        from unclip_cli.stages.decode import run_decoder

        scale = guidance.scale if isinstance(guidance, Guidance) else guidance
        s = self.settings("decoder", steps=steps, guidance=scale)
        g = guidance if isinstance(guidance, Guidance) else Guidance.of(s["guidance"])
        checks.number("eta", eta, low=0)
        images = run_decoder(self.net("decoder"), embed, cond, null, steps=s["steps"], guidance=g, generator=generator,
                             eta=eta, callback=_stage_callback(callback, "decoder"))
        self._finite(images, "decoder")
        return images, {"decoder_steps": s["steps"], "decoder_guidance": s["guidance"], "decoder_eta": eta}

    def decode(
        self, embedding: StageFile | torch.Tensor, *, steps: int | None = None, guidance: float | None = None,
        seed: int | None = None, eta: float | None = None, callback: Callback | None = None,
    ) -> list[Image.Image]:
        """Image embeddings -> 64 px images. A stage file from `prior` is decoded with its text; an
        embedding alone (a (B, D) tensor or array, an `encode-image` file) with the empty prompt; a
        latent from `invert` from its x_T with DDIM (eta 0 unless given) and the steps and guidance
        it was inverted with, which gives the image back."""
        stage = embedding if isinstance(embedding, StageFile) else StageFile("image", {"image_embed": torch.as_tensor(embedding)}, bare=True)
        if stage.kind == "text":
            raise UserError("decode reads image embeddings: run the prior on text conditioning first")
        embed = stage.tensors["image_embed"].float()
        embed = embed[None] if embed.ndim == 1 else embed
        checks.finite_result(embed, "decode", "the input embedding holds NaN or infinity")
        self.check_stage(stage)
        null = self.null(embed.shape[0])
        cond = TextCond.from_tensors(stage.tensors) or null
        generator, seed = make_generator(seed)
        if stage.kind == "latent":
            images, settings = self._decode_latent_file(stage, embed, null, generator, steps, guidance, eta, callback)
        else:
            images, settings = self.run_decoder(embed, cond, null, generator, steps=steps, guidance=guidance, eta=eta, callback=callback)
        record = {**from_meta(stage.meta), **self.record(**settings, decoder_seed=seed)}
        record["stages"] = [*record.get("stages", []), "decode"] if not stage.bare else ["array", "decode"]
        carry = [{"image": x.float().cpu(), "rng_state": generator.get_state()} for x in images]
        return self._images(images, record, carry)

    def _decode_latent_file(self, stage, embed, null, generator, steps, guidance, eta, callback):
        from unclip_cli.stages.manipulate import decode_latent

        s = self.settings("decoder")
        steps = steps or int(stage.meta.get("decoder_steps", s["steps"]))
        guidance = float(stage.meta.get("decoder_guidance", s["guidance"])) if guidance is None else guidance
        eta = 0.0 if eta is None else eta
        checks.number("eta", eta, low=0)
        checks.steps("decoder steps", steps, self.models.load_config("decoder").diffusion.num_timesteps)
        checks.number("decoder guidance", guidance)
        x_T = stage.tensors["noise"].float()
        net = self.net("decoder")
        want = (net.cfg.unet.in_channels, net.cfg.unet.sample_size, net.cfg.unet.sample_size)
        if tuple(x_T.shape[1:]) != want:
            raise UserError(f"latent noise of shape {tuple(x_T.shape[1:])}, the decoder takes {want}")
        images = decode_latent(net, embed, x_T, null, steps=steps, guidance=guidance, eta=eta, generator=generator,
                               callback=_stage_callback(callback, "decoder"))
        return images, {"decoder_steps": steps, "decoder_guidance": guidance, "decoder_eta": eta}

    def run_upsampler(self, low: torch.Tensor, generator: Generators, *, steps: int | None = None,
                      micro_batch: int | None = None, callback: Callback | None = None) -> tuple[torch.Tensor, dict]:
        """(B, 3, 64 or 256, same) in [-1, 1] -> 4x larger images; returns them and the settings used.
        micro_batch: rows per network call (default MICRO_BATCH's; same pixels, less memory)."""
        from unclip_cli.stages.upsample import run_upsampler

        size = low.shape[-1]
        component = UPSAMPLERS.get(size) if low.shape[-2] == size else None
        if component is None:
            raise UserError(f"a {low.shape[-1]}x{low.shape[-2]} image; upsample takes 64x64 (to 256) or 256x256 (to 1024)")
        net = self.net(component)
        if net.cfg.low_res != size:
            raise UserError(f"{component} of {self.name!r} takes {net.cfg.low_res}px input, got {size}px")
        s = self.settings(component, steps=steps)
        micro_batch = micro_batch or MICRO_BATCH.get(component)
        out = run_upsampler(net, low, steps=s["steps"], generator=generator, micro_batch=micro_batch,
                            callback=_stage_callback(callback, component))
        self._finite(out, component)
        return out, {f"upsampler_{size * 4}_steps": s["steps"]}

    def upsample(self, images: Sequence[Image.Image], *, steps: int | None = None, seed: int | None = None,
                 callback: Callback | None = None) -> list[Image.Image]:
        """64 px -> 256 px or 256 px -> 1024 px images (by their size). Without a seed, images from
        `decode` or `upsample` continue that stage's generator from their exact float values, so
        `decode(seed=S)` then `upsample` computes what one pipeline run with seed S does."""
        images = list(images)
        sizes = {img.size for img in images}
        if len(sizes) != 1:
            raise UserError(f"images of different sizes {sorted(sizes)}: upsample one size at a time")
        generator = _continued_generator(images) if seed is None else None
        upstream = _shared_record(images) if generator is not None else None
        if generator is None:
            generator, seed = make_generator(seed)
        low, exact = exact_images_to_tensor(images)
        out, settings = self.run_upsampler(low, generator, steps=steps, callback=callback)
        size = out.shape[-1]
        if upstream is None or not exact:
            upstream = {"stages": ["image"]}
        record = {**upstream, **self.record(**settings, **{f"upsampler_{size}_seed": seed})}
        record["stages"] = [*upstream.get("stages", []), "upsample"]
        return self._images(out, record, [{"rng_state": generator.get_state()}] * len(out))

    # ------------------------------------------------------------------ the whole pipeline

    def generate_tensor(
        self, prompts: Sequence[str], generator: Generators, *, size: int = 64, prior_kind: str | None = None,
        prior_steps: int | None = None, prior_guidance: float | None = None, decoder_steps: int | None = None,
        decoder_guidance: float | None = None, upsampler_steps: int | dict | None = None, callback: Callback | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Prompts -> images (B, 3, size, size) in [-1, 1] on the CPU, every stage drawing from `generator`
        in pipeline order (diffusers' UnCLIPPipeline); returns them and the settings used. A list of B
        generators: prompt r's noise all from the r-th, so its image does not depend on the batch.
        upsampler_steps: one count for both upsamplers, or {component: steps}."""
        if size not in SIZES:
            raise UserError("size must be 64, 256 or 1024")
        prompts = list(prompts)
        if not prompts:
            raise UserError("no prompt given")
        kind = self.prior_kind(prior_kind)
        needed = ["clip", PRIOR_KINDS[kind], "decoder"] + ["upsampler-256"] * (size >= 256) + ["upsampler-1024"] * (size == 1024)
        for component in needed:
            self.models.require(component)
        pg = self.settings(PRIOR_KINDS[kind], guidance=prior_guidance)["guidance"]
        dg = self.settings("decoder", guidance=decoder_guidance)["guidance"]
        p_guide, d_guide = Guidance.diffusers_pair(pg, dg)
        if kind == "ar":  # diffusers' switch concerns its diffusion prior only; the AR prior keeps the rule
            p_guide = Guidance.of(pg)
        cond, null = self.text_cond(prompts), self.null(len(prompts))  # the empty prompt batched as diffusers
        embed, settings = self.sample_prior(cond, null, generator, kind=kind, steps=prior_steps, guidance=p_guide, callback=callback)
        image, s = self.run_decoder(embed, cond, null, generator, steps=decoder_steps, guidance=d_guide, callback=callback)
        settings.update(s)
        settings.pop("decoder_eta")
        for component in needed[3:]:
            steps = upsampler_steps.get(component) if isinstance(upsampler_steps, dict) else upsampler_steps
            image, s = self.run_upsampler(image, generator, steps=steps, callback=callback)
            settings.update(s)
        return image.cpu(), settings

    def generate(self, prompts: Sequence[str] | str, *, size: int = 64, seed: int | None = None,
                 callback: Callback | None = None, **options) -> list[Image.Image]:
        """Prompts -> PIL images of `size` (64, 256 or 1024) through every stage, with one random
        generator (as `unclip generate`). options: prior_kind, prior_steps, prior_guidance,
        decoder_steps, decoder_guidance, upsampler_steps (see generate_tensor)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        generator, seed = make_generator(seed)
        images, settings = self.generate_tensor(prompts, generator, size=size, callback=callback, **options)
        record = self.record(stages=["generate"], prompts=prompts, seed=seed, size=size, **settings)
        return self._images(images, record)

    # ------------------------------------------------------------------ helpers

    def _images(self, x: torch.Tensor, record: dict, carry: list[dict] | None = None) -> list[Image.Image]:
        """(B, 3, H, W) in [-1, 1] -> PIL images, each with its record (and carry) in `info`."""
        images = tensor_to_images(self._finite(x, (record.get("stages") or ["unclip"])[-1]))
        for i, img in enumerate(images):
            img.info[RECORD_KEY] = png_text({**record, "index": i if len(images) > 1 else None})
            if carry is not None:
                img.info[CARRY_KEY] = carry[i]
        return images


def slerp_embeddings(a: StageFile, b: StageFile, t: float, names: tuple[str, str] = ("A", "B")) -> StageFile:
    """The slerp of two image-embedding stage files at t (0 gives a, 1 gives b); no networks needed.
    A batch of one pairs with every row of the other."""
    from unclip_cli.stages.interpolate import slerp

    checks.number("t", t)
    for stage, name in zip((a, b), names):
        if stage.kind == "text":
            raise UserError(f"{name}: text conditioning; slerp takes image embeddings (run `unclip prior` first)")
    ea, eb = a.tensors["image_embed"].float(), b.tensors["image_embed"].float()
    if ea.shape[-1] != eb.shape[-1]:
        raise UserError(f"embedding dimensions differ: {ea.shape[-1]} vs {eb.shape[-1]}")
    if a.clip and b.clip and a.clip != b.clip:
        raise UserError(f"{names[0]} and {names[1]} were made with different CLIPs ({a.clip} vs {b.clip})")
    if ea.shape[0] != eb.shape[0] and 1 not in (ea.shape[0], eb.shape[0]):
        raise UserError(f"batch sizes differ: {ea.shape[0]} vs {eb.shape[0]}")
    keep = ("clip", "clip_dim", "model", "model_identity", "model_dir", "unclip_version")
    record = {k: v for k, v in from_meta(a.meta or b.meta).items() if k in keep}
    record.update(stages=["slerp"], slerp={"a": names[0], "b": names[1], "t": t})
    result = checks.finite_result(slerp(ea, eb, t), "slerp", f"t = {t} is far outside [0, 1]")
    return StageFile("image", {"image_embed": result}, to_meta(record))


def image_record(img: Image.Image) -> dict | None:
    """The record an image carries (a PNG from unclip), else None."""
    return from_png_text(img.info.get(RECORD_KEY))


def _shared_record(images: list[Image.Image]) -> dict | None:
    """The record of a batch's images without their index (None unless all carry the same one)."""
    records = [image_record(img) for img in images]
    if any(r is None for r in records):
        return None
    stripped = [{k: v for k, v in r.items() if k != "index"} for r in records]
    return stripped[0] if all(r == stripped[0] for r in stripped) else None


def _continued_generator(images: list[Image.Image]) -> torch.Generator | None:
    """A CPU generator in the state the images carry (all the same), else None."""
    states = [img.info.get(CARRY_KEY, {}).get("rng_state") for img in images]
    if not states or any(s is None or not torch.equal(s, states[0]) for s in states):
        return None
    generator = torch.Generator("cpu")
    try:
        generator.set_state(states[0])
    except (RuntimeError, TypeError):
        return None
    return generator
