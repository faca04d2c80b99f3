"""The paper's manipulations (section 3) as `Pipeline` methods: invert, vary, interpolate, text_diff, mix.

Each works on the bipartite latent (z_i, x_T): z_i the CLIP image embedding, x_T the decoder noise
that DDIM with eta 0 turns into the image. An input is a PIL image (encoded with CLIP, and inverted
where x_T is needed), a latent stage file from `invert`, or an image-embedding stage file; `mix`
also takes "text:PROMPT" items. A mixin of pipeline.Pipeline, kept apart for size only: the same
object, the same generator and record rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from unclip_cli.errors import UserError
from unclip_cli.io import StageFile
from unclip_cli import checks
from unclip_cli.device import make_generator
from unclip_cli.record import to_meta


@dataclass
class Latent:
    """One input as far as it is known: its embedding (1, D), its x_T (1, C, S, S) or None."""

    embed: torch.Tensor
    noise: torch.Tensor | None
    steps: int | None = None  # the decoder steps and guidance x_T was inverted with
    guidance: float | None = None


def _cb(callback, stage: str):
    return None if callback is None else (lambda i, n: callback(stage, i, n))


class EditMixin:
    """invert, vary, interpolate, text_diff and mix for Pipeline (self is a Pipeline)."""

    # ------------------------------------------------------------------ latents

    def invert_tensors(self, images: Sequence[Image.Image], *, steps: int, guidance: float, refine: int = 3,
                       callback=None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """PIL images -> (z (B, D), x_T (B, C, S, S), reconstruction PSNRs in dB): CLIP, then DDIM inversion."""
        from unclip_cli.io import exact_images_to_tensor
        from unclip_cli.stages.images import fit_image, psnr
        from unclip_cli.stages.manipulate import decode_latent, invert

        decoder = self.net("decoder")
        size = decoder.cfg.unet.sample_size
        embed = self.net("clip").encode_image(list(images)).cpu()
        # each image alone: sizes may differ; a PNG from decode gives its exact float values
        pixels = torch.stack([fit_image(exact_images_to_tensor([img])[0][0], size) for img in images])
        self._check_decoder_settings(steps, guidance)
        null = self.null(len(images))
        x_T, _ = invert(decoder, pixels, embed, null, null, steps=steps, guidance=guidance, refine=refine,
                        callback=_cb(callback, "invert"))
        self._finite(x_T, "invert")
        back = decode_latent(decoder, embed, x_T, null, steps=steps, guidance=guidance)
        return embed, x_T.cpu(), psnr(back.cpu(), pixels).tolist()

    def latent(self, item, *, need_noise: bool, steps: int | None = None, guidance: float | None = None,
               refine: int = 3, name: str = "input", callback=None) -> Latent:
        """An image, latent file or image-embedding file -> Latent (an image is inverted when need_noise)."""
        steps = steps or self.settings("decoder")["steps"]
        guidance = 1.0 if guidance is None else guidance
        if isinstance(item, Image.Image):
            if not need_noise:
                return Latent(self.net("clip").encode_image([item]).cpu(), None)
            embed, x_T, psnr = self.invert_tensors([item], steps=steps, guidance=guidance, refine=refine, callback=callback)
            self.log(f"{name}: inverted in {steps} steps (guidance {guidance:g}), reconstruction {psnr[0]:.1f} dB PSNR")
            return Latent(embed, x_T, steps, guidance)
        stage = item
        if stage.kind == "text":
            raise UserError(f"{name}: text conditioning; expected an image, a latent or an image embedding")
        embed = stage.tensors["image_embed"].float()
        self.models.check_clip(stage.clip, embed.shape[-1], name)
        if embed.shape[0] != 1:
            self.log(f"{name}: a batch of {embed.shape[0]}; using the first")
        if stage.kind == "latent":
            meta = stage.meta
            return Latent(embed[:1], stage.tensors["noise"].float()[:1], int(meta.get("decoder_steps", 0)) or None,
                          float(meta["decoder_guidance"]) if "decoder_guidance" in meta else None)
        if need_noise:
            refuse_bare_embedding(stage, name)
        return Latent(embed[:1], None)

    def _decoder_settings(self, steps, guidance, *latents) -> tuple[int, float]:
        """Steps and guidance: given, else those the latents were inverted with, else the set's defaults."""
        defaults = self.settings("decoder")
        known = [lat for lat in latents if lat is not None and lat.steps is not None]
        steps = steps or (known[0].steps if known else defaults["steps"])
        if guidance is None:
            guidance = known[0].guidance if known else defaults["guidance"]
        self._check_decoder_settings(steps, guidance)
        return steps, guidance

    def _check_decoder_settings(self, steps, guidance) -> None:
        checks.steps("decoder steps", steps, self.models.load_config("decoder").diffusion.num_timesteps)
        checks.number("decoder guidance", guidance)

    # ------------------------------------------------------------------ the manipulations

    def invert(self, images: Sequence[Image.Image], *, names: Sequence[str] | None = None, steps: int | None = None,
               guidance: float = 1.0, refine: int = 3, callback=None) -> StageFile:
        """DDIM-invert images into a latent stage file (z_i, x_T); decoding it gives the images back.
        Its record holds the steps, the guidance and each image's reconstruction PSNR."""
        if refine < 0:
            raise UserError("refine must be >= 0")
        steps = steps or self.settings("decoder")["steps"]
        embed, x_T, psnr = self.invert_tensors(images, steps=steps, guidance=guidance, refine=refine, callback=callback)
        record = self.record(stages=["invert"], images=list(names) if names else None, decoder_steps=steps,
                             decoder_guidance=guidance, reconstruction_psnr=psnr)
        return StageFile("latent", {"image_embed": embed, "noise": x_T}, to_meta(record))

    def vary(self, source, *, n: int = 4, eta: float = 1.0, fresh_noise: bool = False, steps: int | None = None,
             guidance: float | None = None, seed: int | None = None, refine: int = 3, name: str = "input",
             callback=None) -> list[Image.Image]:
        """n variations of an image: DDIM with eta > 0 from its inverted latent (or from fresh noise)."""
        from unclip_cli.stages.decode import draw_latent_noise
        from unclip_cli.stages.manipulate import vary

        checks.number("eta", eta, low=0)
        lat = self.latent(source, need_noise=not fresh_noise, steps=steps, guidance=guidance, refine=refine, name=name,
                          callback=callback)
        steps, guidance = self._decoder_settings(steps, guidance, lat if not fresh_noise else None)
        decoder = self.net("decoder")
        generator, seed = make_generator(seed)
        x_T = draw_latent_noise(decoder, n, generator) if fresh_noise else lat.noise
        embed = lat.embed.expand(n, -1) if fresh_noise else lat.embed
        images = vary(decoder, embed, x_T, self.null(), n=1 if fresh_noise else n, eta=eta, steps=steps,
                      guidance=guidance, generator=generator, callback=_cb(callback, "vary"))
        record = self.record(stages=["vary"], decoder_steps=steps, decoder_guidance=guidance, decoder_eta=eta, decoder_seed=seed)
        return self._images(images, record)

    def interpolate(self, a, b, *, frames: int = 5, invert: bool = False, steps: int | None = None,
                    guidance: float | None = None, seed: int | None = None, eta: float = 0.0, refine: int = 3,
                    names: tuple[str, str] = ("A", "B"), callback=None) -> list[Image.Image]:
        """Frames along the slerp of z_i from a to b, decoded with DDIM from one shared x_T, or (invert)
        from x_T slerped between the two inverted latents, so that the endpoints reconstruct them."""
        from unclip_cli.stages.decode import draw_latent_noise, run_decoder
        from unclip_cli.stages.manipulate import decode_latent, slerp_frames

        if frames < 2:
            raise UserError("frames must be >= 2")
        checks.number("eta", eta, low=0)
        if invert:
            for item, name in zip((a, b), names):
                if isinstance(item, StageFile):
                    refuse_bare_embedding(item, name)
        la, lb = (self.latent(it, need_noise=invert, steps=steps, guidance=guidance, refine=refine, name=nm, callback=callback)
                  for it, nm in zip((a, b), names))
        steps, guidance = self._decoder_settings(steps, guidance, *((la, lb) if invert else ()))
        embeds = slerp_frames(la.embed, lb.embed, frames)  # (N, D)
        net = self.net("decoder")
        generator, seed = make_generator(seed)
        null = self.null()
        cb = _cb(callback, "interpolate")
        if invert:  # x_T slerped between the inverted latents: the endpoints reconstruct A and B
            x_T = slerp_frames(la.noise, lb.noise, frames)  # (N, C, S, S)
            images = decode_latent(net, embeds, x_T, null, steps=steps, guidance=guidance, eta=eta, generator=generator, callback=cb)
        else:
            x_T = draw_latent_noise(net, 1, generator).expand(frames, -1, -1, -1).contiguous()
            images = run_decoder(net, embeds, null.expand(frames), null, steps=steps, guidance=guidance, generator=generator,
                                 eta=eta, x_T=x_T, callback=cb)
        record = self.record(stages=["interpolate"], decoder_steps=steps, decoder_guidance=guidance, decoder_eta=eta, decoder_seed=seed)
        return self._images(images, record)

    def text_diff(self, source, *, to_text: str, from_text: str = "", frames: int = 5, max_theta: float = 0.5,
                  steps: int | None = None, guidance: float | None = None, refine: int = 3, name: str = "input",
                  callback=None) -> list[Image.Image]:
        """Edit an image toward a caption: z_d = normalize(z_t(to) - z_t(from)), frames slerp(z_i, z_d, theta)
        for theta from 0 to max_theta, decoded from the image's inverted x_T (theta 0 gives it back)."""
        from unclip_cli.stages.manipulate import decode_latent, text_diff

        if frames < 2:
            raise UserError("frames must be >= 2")
        checks.number("max_theta", max_theta, above=0, high=1)
        if not to_text.strip():
            raise UserError("the target caption must not be empty")
        lat = self.latent(source, need_noise=True, steps=steps, guidance=guidance, refine=refine, name=name, callback=callback)
        steps, guidance = self._decoder_settings(steps, guidance, lat)
        text_embed = self.text_cond([from_text, to_text]).embed.cpu()
        thetas = [max_theta * i / (frames - 1) for i in range(frames)]
        try:
            embeds = text_diff(lat.embed, text_embed[:1], text_embed[1:], thetas)
        except ValueError as e:
            raise UserError(str(e)) from None
        images = decode_latent(self.net("decoder"), embeds, lat.noise.expand(frames, -1, -1, -1), self.null(), steps=steps,
                               guidance=guidance, callback=_cb(callback, "text-diff"))
        record = self.record(stages=["text-diff"], prompts=[from_text, to_text], decoder_steps=steps, decoder_guidance=guidance)
        return self._images(images, record)

    def mix(self, items: Sequence, weights: Sequence[float] | None = None, *, kind: str | None = None,
            steps: int | None = None, guidance: float | None = None, seed: int | None = None,
            names: Sequence[str] | None = None, callback=None) -> StageFile:
        """A weighted linear mix sum_k w_k z_k of image embeddings (Kandinsky 2.2's `interpolate`).

        items: PIL images (encoded with CLIP), image-embedding stage files, or "text:PROMPT" strings
        (made image embeddings by the prior, with kind / steps / guidance / seed). weights: one per
        item (default equal, summing to 1); used as given."""
        from unclip_cli.stages.manipulate import mix

        items = list(items)
        if not items:
            raise UserError("no items to mix")
        weights = [1.0 / len(items)] * len(items) if weights is None else list(weights)
        if len(weights) != len(items):
            raise UserError(f"{len(weights)} weight(s) for {len(items)} item(s)")
        for w in weights:
            checks.number("each mix weight", w)
        names = list(names) if names else [str(it) if isinstance(it, str) else f"item {i}" for i, it in enumerate(items)]
        texts = [it[len("text:"):] for it in items if isinstance(it, str) and it.startswith("text:")]
        found, fields = iter(()), {}
        if texts:
            generator, seed = make_generator(seed)
            embeds, settings = self.sample_prior(self.text_cond(texts), self.null(), generator, kind=kind, steps=steps,
                                                 guidance=guidance, callback=callback)
            found, fields = iter(embeds.cpu()), {**settings, "prior_seed": seed}
        embeds = []
        for it, nm in zip(items, names):
            if isinstance(it, str):
                if not it.startswith("text:"):
                    raise UserError(f"{nm}: a mix item is an image, an embedding file or text:PROMPT")
                embeds.append(next(found)[None])
            else:
                embeds.append(self.latent(it, need_noise=False, refine=0, name=nm).embed)
        record = self.record(stages=["mix"], mix={"items": names, "weights": weights}, **fields)
        mixed = self._finite(mix(torch.cat(embeds), weights), "mix")
        return StageFile("image", {"image_embed": mixed}, to_meta(record))


def refuse_bare_embedding(stage: StageFile, name: str) -> None:
    """Where x_T is needed, an image-embedding file (no x_T) is refused."""
    if stage.kind == "image":
        raise UserError(f"{name}: an image embedding has no x_T to keep; pass the image or its latent (unclip invert)")

