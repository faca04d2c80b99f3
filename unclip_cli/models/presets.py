"""Named presets: the networks' configs, the random CLIP and the sampling settings of a new model set;
and the sampling settings of a set whose manifest names none.

`unclip model init --preset NAME` builds a set from one; `unclip model add COMPONENT --preset NAME`
sizes one more component from it. The networks are sized to the set's CLIP (its embedding width,
text width and context length), so the same preset fits a set whose CLIP was imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from unclip_cli.errors import UserError
from unclip_cli.models.configs import (
    SMALL_CLIP_CONFIG,
    TINY_CLIP_CONFIG,
    ARPriorConfig,
    DecoderConfig,
    DiffusionConfig,
    PriorConfig,
    UNetConfig,
    UpsamplerConfig,
)


def tiny_configs(embed_dim: int, text_width: int, context_length: int = 77) -> dict:
    """Networks that run in milliseconds: for tests (their images are noise)."""
    up = dict(
        in_channels=6, out_channels=3, layers_per_block=1, attention=(False, False), mid_attention=False,
        context_dim=None, add_embed=False, scale_shift=False,
    )
    return {
        "prior": PriorConfig(
            embed_dim=embed_dim, text_width=text_width, num_text_tokens=context_length, width=64, num_layers=2,
            num_heads=4,
        ),
        "decoder": DecoderConfig(
            unet=UNetConfig(
                in_channels=3, out_channels=6, channels=(32, 64), layers_per_block=1, attention=(False, True),
                mid_attention=True, head_dim=16, context_dim=64, time_embed_dim=128, add_embed=True,
                scale_shift=True, num_groups=8, sample_size=64,
            ),
            clip_embed_dim=embed_dim,
            text_width=text_width,
        ),
        "upsampler-256": UpsamplerConfig(
            first=UNetConfig(channels=(16, 32), time_embed_dim=64, num_groups=8, sample_size=256, **up),
            last=UNetConfig(channels=(16, 32), time_embed_dim=64, num_groups=8, sample_size=256, **up),
            low_res=64, size=256,
        ),
        "upsampler-1024": UpsamplerConfig(
            first=UNetConfig(channels=(8, 16), time_embed_dim=32, num_groups=4, sample_size=1024, **up),
            last=None, low_res=256, size=1024,
        ),
        "prior-ar": ARPriorConfig(
            embed_dim=embed_dim, text_width=text_width, num_text_tokens=context_length, width=64, num_layers=2,
            num_heads=4, num_buckets=256, num_sim_buckets=16,
        ),
    }


def small_configs(embed_dim: int, text_width: int, context_length: int = 77) -> dict:
    """The shipped default's shapes: sized to train on a CPU in an hour or two and sample in seconds.

    The decoder keeps few channels at 64 and 32 px (convolutions there dominate the cost on a CPU)
    and attends only at 16 and 8 px; the upsamplers are the tiny preset's networks.

    The decoder and the upsamplers predict x0 with a fixed variance, not eps (with the decoder's
    learned variance) as Karlo's do: an eps model must cancel x_t almost exactly to get an image's
    flat colors right at high t (its eps error is amplified by 1 / sqrt(SNR) into x0), which a small
    network trained briefly does not; predicting x0 it gets the background and the low-res input's
    colors right within a few hundred steps (measured in the shipped set's model card).
    """
    configs = tiny_configs(embed_dim, text_width, context_length)
    x0 = DiffusionConfig(prediction="x0", variance="fixed_small_log", clip_range=1.0)
    for name in ("upsampler-256", "upsampler-1024"):
        configs[name] = dataclasses.replace(configs[name], diffusion=x0)
    configs["prior"] = PriorConfig(
        embed_dim=embed_dim, text_width=text_width, num_text_tokens=context_length, width=128, num_layers=4,
        num_heads=4,
    )
    configs["prior-ar"] = ARPriorConfig(
        embed_dim=embed_dim, text_width=text_width, num_text_tokens=context_length, width=128, num_layers=4,
        num_heads=4, num_buckets=1024, num_sim_buckets=32,
    )
    configs["decoder"] = DecoderConfig(
        unet=UNetConfig(
            in_channels=3, out_channels=3, channels=(16, 32, 64, 128), layers_per_block=1,
            attention=(False, False, True, True), mid_attention=True, head_dim=16, context_dim=64,
            time_embed_dim=128, add_embed=True, scale_shift=True, num_groups=8, sample_size=64,
        ),
        clip_embed_dim=embed_dim,
        text_width=text_width,
        diffusion=x0,
    )
    return configs


AR_PRIOR_SAMPLING = {"guidance": 2.0, "temperature": 1.0, "top_p": 0.9, "similarity_percentile": 50.0}
# sampling settings of a set whose manifest names none for a component (its own settings override these)
DEFAULT_SAMPLING = {
    "prior": {"steps": 25, "guidance": 4.0},
    "prior-ar": AR_PRIOR_SAMPLING,
    "decoder": {"steps": 25, "guidance": 8.0},
    "upsampler-256": {"steps": 7},
    "upsampler-1024": {"steps": 7},
}


@dataclass(frozen=True)
class Preset:
    clip: dict  # open_clip model config of the preset's random CLIP
    configs: Callable[..., dict]  # (embed_dim, text_width, context_length) -> {component: config}
    sampling: dict  # the new set's sampling settings per component (model.json's "sampling")


PRESETS: dict[str, Preset] = {
    "small": Preset(
        clip=SMALL_CLIP_CONFIG,
        configs=small_configs,
        sampling={
            "prior": {"steps": 25, "guidance": 2.0},
            "prior-ar": AR_PRIOR_SAMPLING,
            "decoder": {"steps": 25, "guidance": 3.0},
            "upsampler-256": {"steps": 7},
            "upsampler-1024": {"steps": 4},
        },
    ),
    "tiny": Preset(
        clip=TINY_CLIP_CONFIG,
        configs=tiny_configs,
        sampling={
            "prior": {"steps": 10, "guidance": 4.0},
            "prior-ar": AR_PRIOR_SAMPLING,
            "decoder": {"steps": 10, "guidance": 8.0},
            "upsampler-256": {"steps": 4},
            "upsampler-1024": {"steps": 3},
        },
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; a UserError naming the known ones otherwise."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]
