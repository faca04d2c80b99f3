"""Diffusion prior (unCLIP, Ramesh et al. 2022, section 2.1): a causal transformer that predicts a
clean CLIP image embedding from a noisy one, conditioned on the caption.

Sequence fed to the transformer, T = L + 4 tokens:
    [text tokens (L), text embedding, timestep embedding, x_t, learned final token]
The final token's output is projected to the predicted x0 (in the normalized embedding space).
Numerically this is Karlo v1 alpha as realized by diffusers' `PriorTransformer`, including its
additive -10000 masks (causal, plus padded text-token columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unclip_cli.models.configs import PriorConfig
from unclip_cli.models.nn import TimeEmbed

MASK_VALUE = -10000.0  # additive attention bias for masked positions (diffusers / Karlo)
NUM_EXTRA_TOKENS = 4  # text embedding, time embedding, x_t, final token


@dataclass
class PriorPrefix:
    """The caption's keys and values at every layer, computed once per sampling run (`DiffusionPrior.prefix`)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per block: k, v (B, nh, L + 1, hd)
    mask: torch.Tensor  # (B, 1, 3, T): the additive mask of the time, x_t and final tokens' rows


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive float mask."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        assert width % num_heads == 0, f"width {width} not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)  # q, k, v stacked on the output dim
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """x (B, T, C); mask (B, 1, T, S) over the S keys. With a `cache` dict, the keys and values of
        earlier calls come first (S = cached + T) and this call's are appended to it (incremental decoding)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hd)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, nh, S, hd)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd); mask (B, 1, T, S)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    """Linear -> exact GELU -> Linear, 4x expansion."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, num_heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class DiffusionPrior(nn.Module):
    """x_t, t, caption -> predicted x0 of the normalized CLIP image embedding."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        C, D = cfg.width, cfg.embed_dim
        T = cfg.num_text_tokens + NUM_EXTRA_TOKENS
        self.time_embed = TimeEmbed(C, C, C)
        self.text_proj = nn.Linear(cfg.text_width, C)  # text hidden states -> tokens
        self.text_embed_proj = nn.Linear(D, C)  # CLIP text embedding -> one token
        self.x_proj = nn.Linear(D, C)  # noisy image embedding -> one token
        self.pos_embed = nn.Parameter(torch.empty(1, T, C))
        self.final_token = nn.Parameter(torch.empty(1, 1, C))  # its output is the prediction
        self.blocks = nn.ModuleList([Block(C, cfg.num_heads) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(C)
        self.out_proj = nn.Linear(C, D)
        # Statistics of the CLIP image embeddings the prior was trained on (normalized space <-> CLIP
        # space). Data, not learned: loaded with the weights, excluded from gradient updates.
        self.clip_mean = nn.Parameter(torch.zeros(1, D), requires_grad=False)
        self.clip_std = nn.Parameter(torch.ones(1, D), requires_grad=False)
        causal = torch.full((T, T), MASK_VALUE, device="cpu").triu_(1)  # (T, T): -10000 above the diagonal; real in a meta build
        self.register_buffer("causal_mask", causal, persistent=False)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.final_token, std=0.02)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_embed: torch.Tensor,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """x_t (B, D), t (B,), text_embed (B, D), text_hidden (B, L, text_width), text_mask (B, L) bool
        -> predicted x0 (B, D), normalized space."""
        h = torch.cat([self._prefix_tokens(text_embed, text_hidden), self._step_tokens(x_t, t)], dim=1)  # (B, T, C)
        mask = self._mask(text_mask, h.dtype)  # (B, 1, T, T)
        for block in self.blocks:
            h = block(h, mask)  # (B, T, C)
        h = self.ln_f(h)
        return self.out_proj(h[:, -1])  # (B, D)

    @torch.no_grad()
    def prefix(self, text_embed: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor) -> PriorPrefix:
        """The caption's L + 1 tokens never see x_t or t (causal mask): run them once per sampling run
        and keep every layer's keys and values for `step`."""
        h = self._prefix_tokens(text_embed, text_hidden)  # (B, P, C), P = L + 1
        P = h.shape[1]
        mask = self._mask(text_mask, h.dtype)  # (B, 1, T, T)
        layers = [{} for _ in self.blocks]
        prefix_mask = mask[:, :, :P, :P].contiguous()  # (B, 1, P, P)
        for block, cache in zip(self.blocks, layers):
            h = block(h, prefix_mask, cache)  # the prefix's output itself is never used, only its keys and values
        return PriorPrefix(layers=[(c["k"], c["v"]) for c in layers], mask=mask[:, :, P:, :].contiguous())

    def step(self, x_t: torch.Tensor, t: torch.Tensor, prefix: PriorPrefix) -> torch.Tensor:
        """`forward` given the caption's cached keys and values: only the time, x_t and final tokens run.
        x_t (B, D), t (B,) -> predicted x0 (B, D). Equal to `forward` up to float rounding."""
        h = self._step_tokens(x_t, t)  # (B, 3, C)
        for block, (k, v) in zip(self.blocks, prefix.layers):
            h = block(h, prefix.mask, {"k": k, "v": v})  # a fresh dict: the cached prefix stays as it is
        h = self.ln_f(h[:, -1])
        return self.out_proj(h)  # (B, D)

    def _prefix_tokens(self, text_embed: torch.Tensor, text_hidden: torch.Tensor) -> torch.Tensor:
        """(B, D), (B, L, text_width) -> the caption's tokens with their positions (B, L + 1, C)."""
        L = text_hidden.shape[1]
        if L != self.cfg.num_text_tokens:
            raise ValueError(f"prior expects {self.cfg.num_text_tokens} text tokens, got {L}")
        tokens = torch.cat([self.text_proj(text_hidden), self.text_embed_proj(text_embed)[:, None]], dim=1)
        return tokens + self.pos_embed[:, : L + 1].to(tokens.dtype)  # (B, L + 1, C)

    def _step_tokens(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (B, D), t (B,) -> [time, x_t, final] tokens with their positions (B, 3, C)."""
        dtype = x_t.dtype
        tokens = torch.cat(
            [
                self.time_embed(t, dtype=dtype)[:, None],  # (B, 1, C)
                self.x_proj(x_t)[:, None],  # (B, 1, C)
                self.final_token.to(dtype).expand(x_t.shape[0], -1, -1),  # (B, 1, C)
            ],
            dim=1,
        )
        return tokens + self.pos_embed[:, -3:].to(dtype)  # (B, 3, C)

    def _mask(self, text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, L) bool -> additive mask (B, 1, T, T): causal, plus masked key columns for padded text tokens."""
        pad = (1 - text_mask.to(dtype)) * MASK_VALUE  # (B, L)
        pad = F.pad(pad, (0, NUM_EXTRA_TOKENS), value=0.0)  # (B, T)
        return (pad[:, None, :] + self.causal_mask.to(dtype))[:, None]  # (B, 1, T, T)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding -> the prior's normalized space."""
        return (x - self.clip_mean) / self.clip_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized space -> CLIP image embedding (diffusers' `post_process_latents`)."""
        return x * self.clip_std + self.clip_mean
