"""ADM / GLIDE UNet (Dhariwal & Nichol 2021; Nichol et al. 2021), used by the decoder and the upsamplers.

Numerically this is Karlo v1 alpha as realized by diffusers 0.33.1: the decoder's
`UNet2DConditionModel` (simple cross-attention blocks) and the super-res `UNet2DModel`
(ResBlocks only). Layout in GLIDE's style:

    conv_in -> input_blocks (each output kept as a skip) -> middle_block
            -> output_blocks (each takes [h, skip] on channels) -> out_norm -> SiLU -> out_conv

Per level: `layers_per_block` ResBlocks (each followed by attention where `attention[level]`),
then a ResBlock that halves the resolution (all but the last level). On the way up one more
ResBlock per level, and a ResBlock that doubles the resolution after it (all but the top level).
Resolutions must be divisible by 2 ** (levels - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unclip_cli.models.configs import UNetConfig
from unclip_cli.models.nn import TimeEmbed

MASK_VALUE = -10000.0  # additive attention bias for masked context tokens (diffusers / Karlo)
ATTN_NORM_EPS = 1e-5  # diffusers' Attention GroupNorm eps, independent of cfg.norm_eps


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, timestep embedding in between; optional 2x down/up resampling.

    scale_shift: out_norm(h) * (1 + scale) + shift (ADM "use_scale_shift_norm");
    otherwise the projected embedding is added before out_norm.
    Resampling (avg-pool 2x2 / nearest 2x) is applied to both the residual and the input skip.
    """

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, resample: str | None = None):
        super().__init__()
        self.scale_shift = cfg.scale_shift
        self.resample = resample  # None, "down" or "up"
        self.in_norm = nn.GroupNorm(cfg.num_groups, cin, eps=cfg.norm_eps)
        self.in_conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(cfg.time_embed_dim, 2 * cout if cfg.scale_shift else cout)
        self.out_norm = nn.GroupNorm(cfg.num_groups, cout, eps=cfg.norm_eps)
        self.out_conv = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h, x = self._resample(h), self._resample(x)
        h = self.in_conv(h)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, C or 2C, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(F.silu(h))
        if isinstance(self.skip, nn.Conv2d):
            # contiguous on the CPU as diffusers: the same conv kernel (see AttentionBlock); on CUDA the layout stays
            x = self.skip(x if x.is_cuda else x.contiguous())
        return x + h


class AttentionBlock(nn.Module):
    """Spatial self-attention whose keys/values are prefixed with projected context tokens.

    keys/values = [context_kv(context) (Lc), kv of the GroupNormed feature map (H*W)];
    the context bias (B, Lc) masks the context part only. Without context_dim: plain self-attention.
    """

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        assert channels % cfg.head_dim == 0, f"width {channels} not divisible by head_dim {cfg.head_dim}"
        self.num_heads = channels // cfg.head_dim
        self.norm = nn.GroupNorm(cfg.num_groups, channels, eps=ATTN_NORM_EPS)
        self.qkv = nn.Linear(channels, 3 * channels)  # q, k, v stacked on the output dim
        self.context_kv = nn.Linear(cfg.context_dim, 2 * channels) if cfg.context_dim else None  # k, v stacked
        self.proj_out = nn.Linear(channels, channels)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.reshape(B, T, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)  # (B, nh, T, hd)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        # Op for op (and so memory layout for memory layout) as diffusers' AttnAddedKVProcessor2_0:
        # the same strides make the following kernels (this block's GEMMs, the next convolution)
        # sum in the same order, so the images match diffusers' pixel for pixel. A sampler's first
        # step divides by sqrt(alpha_bar) ~ 1e-2, which turns last-bit differences into visible ones.
        B, C, H, W = x.shape
        h = self.norm(x.reshape(B, C, H * W)).transpose(1, 2)  # (B, HW, C)
        wq, wk, wv = self.qkv.weight.chunk(3)
        bq, bk, bv = self.qkv.bias.chunk(3)
        q = self._heads(F.linear(h, wq, bq))  # (B, nh, HW, hd)
        k, v = self._heads(F.linear(h, wk, bk)), self._heads(F.linear(h, wv, bv))
        if self.context_kv is not None:
            if context is None:
                raise ValueError("this UNet attends to context tokens: pass context")
            wck, wcv = self.context_kv.weight.chunk(2)
            bck, bcv = self.context_kv.bias.chunk(2)
            ck, cv = self._heads(F.linear(context, wck, bck)), self._heads(F.linear(context, wcv, bcv))  # (B, nh, Lc, hd)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # (B, nh, Lc + HW, hd)
            if bias is not None:
                bias = F.pad(bias, (0, H * W))[:, None, None, :]  # (B, 1, 1, Lc + HW); spatial keys unmasked
        else:
            bias = None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, HW, hd)
        y = self.proj_out(y.transpose(1, 2).reshape(B, H * W, C))  # (B, HW, C)
        return y.transpose(1, 2).reshape(B, C, H, W) + x


class Step(nn.ModuleList):
    """GLIDE's TimestepEmbedSequential: ResBlocks get the embedding, attention gets the context."""

    def forward(self, h, emb, context, bias):
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h, context, bias)
        return h


class UNet(nn.Module):
    """x_t (B, Cin, H, W), t (B,) [, extra embedding, context tokens] -> (B, Cout, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        n = len(cfg.channels)
        assert len(cfg.attention) == n, f"attention has {len(cfg.attention)} entries for {n} levels"
        self.cfg = cfg
        ch0 = cfg.channels[0]
        self.time_embed = TimeEmbed(ch0, cfg.time_embed_dim, cfg.time_embed_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        self.input_blocks = nn.ModuleList()
        skips = [ch0]  # channels of each kept skip, in push order
        ch = ch0
        for level, width in enumerate(cfg.channels):
            for _ in range(cfg.layers_per_block):
                self.input_blocks.append(self._step(ch, width, cfg.attention[level]))
                ch = width
                skips.append(ch)
            if level < n - 1:
                self.input_blocks.append(Step([ResBlock(ch, ch, cfg, resample="down")]))
                skips.append(ch)

        mid = [ResBlock(ch, ch, cfg)] + ([AttentionBlock(ch, cfg)] if cfg.mid_attention else [])
        self.middle_block = Step(mid + [ResBlock(ch, ch, cfg)])

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(n)):
            width = cfg.channels[level]
            for i in range(cfg.layers_per_block + 1):
                step = self._step(ch + skips.pop(), width, cfg.attention[level])
                ch = width
                if level > 0 and i == cfg.layers_per_block:
                    step.append(ResBlock(ch, ch, cfg, resample="up"))
                self.output_blocks.append(step)

        self.out_norm = nn.GroupNorm(cfg.num_groups, ch0, eps=cfg.norm_eps)
        self.out_conv = nn.Conv2d(ch0, cfg.out_channels, 3, padding=1)

    def _step(self, cin: int, cout: int, attention: bool) -> Step:
        return Step([ResBlock(cin, cout, self.cfg)] + ([AttentionBlock(cout, self.cfg)] if attention else []))

    def _embedding(self, t: torch.Tensor, emb_add: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        emb = self.time_embed(t, dtype=dtype)  # (B, time_embed_dim)
        if self.cfg.add_embed:
            if emb_add is None:
                raise ValueError("this UNet takes an extra embedding: pass emb_add")
            emb = emb + emb_add.to(dtype)
        elif emb_add is not None:
            raise ValueError("this UNet takes no extra embedding (add_embed is False)")
        return emb

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        emb_add: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, Cin, H, W); t (B,) long; emb_add (B, time_embed_dim); context (B, Lc, context_dim);
        context_mask (B, Lc) bool, True = attend; None (attend to all) lets SDPA use its mask-free kernels."""
        if self.cfg.context_dim is None and context is not None:
            raise ValueError("this UNet takes no context (context_dim is None)")
        emb = self._embedding(t, emb_add, x.dtype)
        x = self._memory_format(x)
        bias = None
        if context_mask is not None:
            bias = (1 - context_mask.to(x.dtype)) * MASK_VALUE  # (B, Lc)

        h = self.conv_in(x)
        skips = [h]
        for step in self.input_blocks:
            h = step(h, emb, context, bias)
            skips.append(h)
        h = self.middle_block(h, emb, context, bias)
        for step in self.output_blocks:
            h = step(torch.cat([h, skips.pop()], dim=1), emb, context, bias)
        return self.out_conv(F.silu(self.out_norm(h)))

    def _memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """channels_last at inference on CUDA (tensor-core convolutions without layout transposes): the
        weights are converted on the first call, the input at every call. Not on the CPU, where it changes
        float32 bits (Karlo parity) and runs no faster (measured at fp32 and bf16)."""
        if not x.is_cuda or self.training:
            return x
        if not self.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            self.to(memory_format=torch.channels_last)  # once: every conv weight (B, C, kh, kw) -> NHWC
        return x.contiguous(memory_format=torch.channels_last)
