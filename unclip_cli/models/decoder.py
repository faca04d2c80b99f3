"""unCLIP decoder (Ramesh et al. 2022, section 2.1): GLIDE's UNet conditioned on a CLIP image embedding.

The image embedding is projected and added to the timestep embedding (with the projected CLIP text
embedding) and projected into `num_extra_tokens` context tokens placed in front of the projected
CLIP text hidden states. Numerically Karlo v1 alpha as realized by diffusers' `UnCLIPTextProjModel`
+ `UNet2DConditionModel` (the image embedding enters as its `class_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unclip_cli.models.configs import DecoderConfig
from unclip_cli.models.unet import UNet


@dataclass
class DecoderCond:
    """Conditioning computed once per sampling run."""

    context: torch.Tensor  # (B, n + L, context_dim): [extra tokens, projected text tokens]
    context_mask: torch.Tensor  # (B, n + L) bool, True = attend
    emb_add: torch.Tensor  # (B, time_embed_dim), added to the timestep embedding
    attend_all: bool = False  # no padded context token: the UNet runs without a mask (SDPA's mask-free kernels)


class TextProjection(nn.Module):
    """CLIP image embedding + text embedding + text hidden states -> UNet context and extra embedding."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        D, C, E = cfg.clip_embed_dim, cfg.unet.context_dim, cfg.unet.time_embed_dim
        assert C is not None and cfg.unet.add_embed, "the decoder UNet needs context_dim and add_embed"
        self.num_extra_tokens = cfg.num_extra_tokens
        null = nn.init.normal_(torch.empty(D))  # randn's draws; a meta build skips the scaling (it imports torch._dynamo)
        self.null_image_embed = nn.Parameter(null if null.is_meta else null / D**0.5)  # learned unconditional image embedding
        self.image_to_emb = nn.Linear(D, E)
        self.text_to_emb = nn.Linear(D, E)
        self.image_to_tokens = nn.Linear(D, cfg.num_extra_tokens * C)
        self.text_proj = nn.Linear(cfg.text_width, C)
        self.text_norm = nn.LayerNorm(C)

    def forward(
        self, image_embed: torch.Tensor, text_embed: torch.Tensor, text_hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D), (B, D), (B, L, text_width) -> context (B, n + L, C), emb_add (B, E)."""
        B, n = image_embed.shape[0], self.num_extra_tokens
        emb_add = self.image_to_emb(image_embed) + self.text_to_emb(text_embed)  # (B, E)
        # Karlo's layout is interleaved: token i, channel c is output feature c * n + i
        extra = self.image_to_tokens(image_embed).reshape(B, -1, n).permute(0, 2, 1)  # (B, n, C)
        text = self.text_norm(self.text_proj(text_hidden))  # (B, L, C)
        return torch.cat([extra, text], dim=1), emb_add


class Decoder(nn.Module):
    """x_t (B, 3, 64, 64), t, DecoderCond -> eps and variance interpolation (B, 6, 64, 64)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.text_proj = TextProjection(cfg)
        self.unet = UNet(cfg.unet)

    def null_image_embed(self, batch: int) -> torch.Tensor:
        """The learned image embedding of the unconditional branch, (B, D)."""
        return self.text_proj.null_image_embed[None].expand(batch, -1)

    def condition(
        self, image_embed: torch.Tensor, text_embed: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor
    ) -> DecoderCond:
        """image_embed (B, D), text_embed (B, D), text_hidden (B, L, text_width), text_mask (B, L) bool."""
        context, emb_add = self.text_proj(image_embed, text_embed, text_hidden)
        mask = F.pad(text_mask.bool(), (self.cfg.num_extra_tokens, 0), value=True)  # (B, n + L)
        return DecoderCond(context=context, context_mask=mask, emb_add=emb_add, attend_all=bool(mask.all()))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: DecoderCond) -> torch.Tensor:
        mask = None if cond.attend_all else cond.context_mask  # the same bits on the CPU (tests/test_lean_networks.py)
        return self.unet(x_t, t, emb_add=cond.emb_add, context=cond.context, context_mask=mask)
