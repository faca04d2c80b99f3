"""Decoder stage: CLIP image embedding (+ text conditioning) -> 64x64 image in [-1, 1]."""

from __future__ import annotations

from typing import Callable

import torch

from unclip_cli.device import Generators
from unclip_cli.diffusion.guidance import Guidance
from unclip_cli.diffusion.samplers import ModelFn, draw_noise, sample_ancestral, sample_ddim
from unclip_cli.diffusion.schedule import GaussianDiffusion, respaced_timesteps
from unclip_cli.models.decoder import Decoder
from unclip_cli.stages.conditioning import TextCond


def decoder_model_fn(
    decoder: Decoder,
    image_embed: torch.Tensor,
    cond: TextCond,
    null: TextCond,
    guidance: float | Guidance,
) -> ModelFn:
    """The decoder as a sampler's model function (x_t, t) -> [eps, variance channels].

    Guidance on eps with [learned null image embedding + empty text; image embedding + text], the
    variance channels taken from the conditional half; the batch runs as `Guidance.of(guidance)` says.
    The network sees its own dtype (bf16 / fp16 weights); its output and the sampler stay float32.
    """
    param = next(decoder.parameters())
    device, dtype = param.device, param.dtype
    batch = image_embed.shape[0]
    guidance = Guidance.of(guidance)
    batched = guidance.batched  # run the [uncond; cond] batch
    image_embed, cond = image_embed.to(device), cond.to(device)
    if batched:
        image_embed = torch.cat([decoder.null_image_embed(batch).to(device), image_embed])
        cond = TextCond.cat(null.to(device).expand(batch), cond)
    dcond = decoder.condition(image_embed.to(dtype), cond.embed.to(dtype), cond.hidden.to(dtype), cond.mask)
    channels = decoder.cfg.unet.in_channels

    def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        x_in = torch.cat([x, x]) if batched else x
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.long, device=device)
        out = decoder(x_in.to(dtype), t_in, dcond).float()
        if batched:
            uncond, text = guidance.split(out)
            eps = guidance.combine(uncond[:, :channels], text[:, :channels])
            out = torch.cat([eps, text[:, channels:]], dim=1)  # the variance channels of the conditional half
        return out

    return model_fn


@torch.no_grad()
def run_decoder(
    decoder: Decoder,
    image_embed: torch.Tensor,
    cond: TextCond,
    null: TextCond,
    *,
    steps: int,
    guidance: float | Guidance,
    generator: Generators,
    eta: float | None = None,
    x_T: torch.Tensor | None = None,
    timesteps: list[int] | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Decode image embeddings (B, D) to (B, 3, H, W) in [-1, 1], as UnCLIPPipeline's decoder loop.

    Guidance on eps with [learned null image embedding + empty text; image embedding + text];
    the variance comes from the conditional half. guidance: a scale (the batch runs when it is not 1)
    or a `Guidance` (`Guidance.diffusers_pair`, for Karlo parity). eta=None: the ancestral (learned-variance)
    sampler; eta=float: DDIM with that eta. x_T: a given initial noise (else drawn). generator: one for
    the batch, or a list sharing its rows (row r's noise from its own generator; see device.generator_rows).
    timesteps: the descending timesteps to sample (default: `steps` respaced as UnCLIPScheduler).
    """
    device = next(decoder.parameters()).device
    batch = image_embed.shape[0]
    model_fn = decoder_model_fn(decoder, image_embed, cond, null, guidance)
    diffusion = GaussianDiffusion.from_config(decoder.cfg.diffusion)
    timesteps = timesteps or respaced_timesteps(steps, diffusion.num_timesteps)
    if x_T is None:
        x_T = draw_latent_noise(decoder, batch, generator)
    if eta is None:
        x = sample_ancestral(model_fn, x_T.to(device), diffusion, timesteps, generator=generator, callback=callback)
    else:
        x = sample_ddim(model_fn, x_T.to(device), diffusion, timesteps, eta=eta, generator=generator, callback=callback)
    return x.clamp(-1, 1)


def draw_latent_noise(decoder: Decoder, batch: int, generator: Generators) -> torch.Tensor:
    """Fresh x_T for the decoder, (batch, C, S, S), drawn on the CPU."""
    size, channels = decoder.cfg.unet.sample_size, decoder.cfg.unet.in_channels
    return draw_noise((batch, channels, size, size), generator, "cpu")
