"""Typed configs of every component, and their JSON round trip.

Each component folder of a model set holds `config.json` = `config_to_dict(cfg)`; the same dict
is stored in the safetensors metadata of its weights, so a weight file explains itself.
Field names follow the paper / GLIDE; the Karlo converter maps diffusers' names onto them.
The presets' CLIPs are open_clip model configs (plain dicts, as open_clip_config.json holds them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from unclip_cli import validate


# open_clip model configs of the presets' CLIPs (written by `write_clip_dir`).
# A CLIP small enough to run in milliseconds, for tests and the tiny model set. All widths differ
# (embedding 32, text 48, vision 64) so that no code can confuse them. quick_gelu as in OpenAI's
# CLIP (and so Karlo's ViT-L/14).
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2},
}

# The small preset's CLIP (the shipped default set's recipe): the tiny one's text tower and widths,
# with a vision tower that sees 64 px images in 8 px patches. At 32 px (the tiny tower) shapes are
# a few pixels across and its patches barely resolve them: trained alone to classify the shape of
# one-object scenes (800 steps of 64 from random weights), the 32 px tower reached 25% (chance 17%),
# the 64 px one 49%, a 32 px one with 4 px patches (as many tokens as the 64 px one) 46%.
SMALL_CLIP_CONFIG: dict = {
    **TINY_CLIP_CONFIG,
    "vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "image_size": 64},
}


@dataclass
class DiffusionConfig:
    """How a component was trained to denoise, which fixes how it must be sampled."""

    num_timesteps: int = 1000  # T of the training chain
    schedule: str = "cosine"  # only the cosine schedule (Nichol & Dhariwal; diffusers squaredcos_cap_v2)
    prediction: str = "eps"  # "eps": the network predicts the noise; "x0": the clean sample
    variance: str = "fixed_small_log"  # or "learned_range" (network's extra channels interpolate log-variances)
    clip_range: float | None = 1.0  # clamp predicted x0 to [-r, r] at every step; None: no clamp


@dataclass
class PriorConfig:
    """Diffusion prior: causal transformer over [text tokens, text embed, time, x_t, final token]."""

    embed_dim: int = 768  # CLIP embedding size (input x_t, text embedding, output)
    text_width: int = 768  # width of the CLIP text hidden states fed as tokens
    num_text_tokens: int = 77  # text context length
    width: int = 2048  # transformer width (= num_heads * head_dim)
    num_layers: int = 20
    num_heads: int = 32
    diffusion: DiffusionConfig = field(
        default_factory=lambda: DiffusionConfig(prediction="x0", variance="fixed_small_log", clip_range=5.0)
    )


@dataclass
class ARPriorConfig:
    """Autoregressive prior: causal transformer over [text tokens, text embed, similarity, PCA codes]."""

    embed_dim: int = 768  # CLIP embedding size (PCA input and output)
    text_width: int = 768  # width of the CLIP text hidden states fed as tokens
    num_text_tokens: int = 77  # text context length
    width: int = 1024  # transformer width (= num_heads * head_dim)
    num_layers: int = 12
    num_heads: int = 16
    num_buckets: int = 1024  # quantization levels of each kept PCA coordinate (the paper: 1024)
    num_sim_buckets: int = 64  # levels of the z_i . z_t similarity token
    max_pca_error: float = 0.01  # keep the fewest PCA dims whose mean squared error is under this share of the variance


@dataclass
class UNetConfig:
    """ADM/GLIDE UNet (decoder and upsamplers): scale-shift ResBlocks, resblock down/up sampling."""

    in_channels: int = 3  # 3 for the decoder, 6 for an upsampler (noisy image + upsampled low-res)
    out_channels: int = 6  # 6 = eps + learned variance interpolation; 3 = eps only
    channels: tuple[int, ...] = (320, 640, 960, 1280)  # width of each resolution level
    layers_per_block: int = 3  # ResBlocks per level on the way down (one more on the way up)
    attention: tuple[bool, ...] = (False, True, True, True)  # attention blocks in this level?
    mid_attention: bool = True  # attention in the middle block?
    head_dim: int = 64  # attention head size; heads = level width // head_dim
    context_dim: int | None = 1536  # width of context tokens attended to (keys/values); None: no context
    time_embed_dim: int = 1280  # width of the timestep embedding (4 * channels[0] by convention)
    add_embed: bool = True  # forward() takes an extra (B, time_embed_dim) vector added to the time embedding
    scale_shift: bool = True  # ResBlock: GroupNorm(h) * (1 + scale) + shift from the embedding
    num_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-5
    sample_size: int = 64  # resolution the network is meant for (informational)


@dataclass
class DecoderConfig:
    """Decoder: text/image projection ("text_proj") feeding a UNet, 64x64 output."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    clip_embed_dim: int = 768  # CLIP image / text embedding size
    text_width: int = 768  # width of CLIP text hidden states (input of their projection)
    num_extra_tokens: int = 4  # context tokens made from the image embedding
    diffusion: DiffusionConfig = field(
        default_factory=lambda: DiffusionConfig(prediction="eps", variance="learned_range", clip_range=1.0)
    )


@dataclass
class UpsamplerConfig:
    """Super-resolution: UNet on [noisy x, bicubic-upsampled low-res image], no text, no guidance."""

    first: UNetConfig = field(
        default_factory=lambda: UNetConfig(
            in_channels=6, out_channels=3, attention=(False,) * 4, mid_attention=False,
            context_dim=None, add_embed=False, scale_shift=False, sample_size=256,
        )
    )  # used for every step (or every step but the last when `last` is set)
    last: UNetConfig | None = None  # Karlo's separate network for the final step
    low_res: int = 64  # input resolution
    size: int = 256  # output resolution
    diffusion: DiffusionConfig = field(
        default_factory=lambda: DiffusionConfig(prediction="eps", variance="fixed_small_log", clip_range=1.0)
    )


def config_to_dict(cfg) -> dict:
    """Dataclass -> JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(cfg)


# values a string field may take, and the int fields that may be 0 (every other int is a positive size)
CHOICES: dict[str, tuple] = {
    "schedule": ("cosine",),
    "prediction": ("eps", "x0"),
    "variance": ("fixed_small_log", "learned_range"),
    ">=0": ("num_extra_tokens",),
}


def config_from_dict(cls, data: dict):
    """JSON dict -> dataclass `cls`, recursing into nested configs; unknown keys, values of the wrong type
    or out of range are a ValueError naming the field (see validate.typed)."""
    return validate.dataclass_from_dict(cls, data, cls.__name__, CHOICES)
