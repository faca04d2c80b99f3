"""The lean step loop, network side: the prior's caption prefix computed once per run, mask-free
attention when nothing is padded, channels_last UNets on CUDA only."""

from __future__ import annotations

import pytest
import torch

from unclip_cli.models.configs import DecoderConfig, PriorConfig, UNetConfig
from unclip_cli.models.decoder import Decoder
from unclip_cli.models.prior import DiffusionPrior
from unclip_cli.stages.conditioning import TextCond
from unclip_cli.stages.prior import run_prior

PRIOR = PriorConfig(embed_dim=16, text_width=12, num_text_tokens=6, width=48, num_layers=3, num_heads=4)
# float32 rounding of the shorter matmuls; bf16 carries 8 bits of mantissa (2^-8 = 0.004)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _prior(dtype=torch.float32) -> DiffusionPrior:
    torch.manual_seed(0)
    prior = DiffusionPrior(PRIOR).eval()
    with torch.no_grad():
        prior.clip_mean.normal_()
        prior.clip_std.uniform_(0.5, 2.0)
    stats = prior.clip_mean.data, prior.clip_std.data
    prior.to(dtype)
    prior.clip_mean.data, prior.clip_std.data = stats  # the data statistics stay float32, as the model set loads them
    return prior


def _text(batch: int, seed: int = 1) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    L = PRIOR.num_text_tokens
    lengths = torch.randint(1, L + 1, (batch, 1), generator=g)
    lengths[0] = 2  # at least one row padded
    return TextCond(
        torch.randn(batch, PRIOR.embed_dim, generator=g),
        torch.randn(batch, L, PRIOR.text_width, generator=g),
        torch.arange(L)[None] < lengths,  # (B, L), False = padding
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_cached_prefix_step_equals_the_full_forward(dtype):
    prior, text = _prior(dtype), _text(3)
    embed, hidden = text.embed.to(dtype), text.hidden.to(dtype)
    prefix = prior.prefix(embed, hidden, text.mask)
    kept = [(k.clone(), v.clone()) for k, v in prefix.layers]
    g = torch.Generator().manual_seed(2)
    for t in ([999, 500, 3], [0, 1, 2]):  # two steps on one prefix: the cache is read, never grown
        x_t = torch.randn(3, PRIOR.embed_dim, generator=g).to(dtype)
        t = torch.tensor(t)
        full = prior(x_t, t, embed, hidden, text.mask)
        cached = prior.step(x_t, t, prefix)
        assert cached.dtype == dtype and cached.shape == full.shape
        assert _relative(cached, full) < TOLERANCE[dtype]
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(prefix.layers, kept))
    assert prefix.layers[0][0].shape == (3, PRIOR.num_heads, PRIOR.num_text_tokens + 1, PRIOR.width // PRIOR.num_heads)


@torch.no_grad()
def test_cached_step_ignores_padded_text_and_sees_real_text():
    prior, text = _prior(), _text(2)
    x_t, t = torch.randn(2, PRIOR.embed_dim), torch.tensor([10, 800])
    base = prior.step(x_t, t, prior.prefix(text.embed, text.hidden, text.mask))
    padded = text.hidden.clone()
    padded[0, 2:] = 100.0  # row 0 has 2 real tokens
    assert torch.allclose(prior.step(x_t, t, prior.prefix(text.embed, padded, text.mask)), base, rtol=0, atol=1e-6)
    real = text.hidden.clone()
    real[0, 1] += 1.0
    assert (prior.step(x_t, t, prior.prefix(text.embed, real, text.mask)) - base)[0].abs().max() > 1e-4


def _run(prior: DiffusionPrior, batch: int = 2, guidance: float = 4.0) -> torch.Tensor:
    text, null = _text(batch), _text(1, seed=9)
    return run_prior(prior, text, null, steps=4, guidance=guidance, generator=torch.Generator().manual_seed(5))


def test_fp32_run_keeps_the_full_forward(monkeypatch):
    """fp32 is the exact parity mode: the prefix cache would change the last bits, so it is not used."""
    prior = _prior()
    expected = _run(prior)
    monkeypatch.setattr(DiffusionPrior, "prefix", lambda *a: pytest.fail("prefix cache used at fp32"))
    assert torch.equal(_run(prior), expected)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_bf16_run_uses_the_prefix_and_stays_close_to_fp32(monkeypatch, guidance):
    reference = _run(_prior(), guidance=guidance)
    calls = []
    real_prefix = DiffusionPrior.prefix
    monkeypatch.setattr(DiffusionPrior, "prefix", lambda self, *a: calls.append(a[0].shape[0]) or real_prefix(self, *a))
    out = _run(_prior(torch.bfloat16), guidance=guidance)
    assert calls == [4 if guidance != 1 else 2]  # once per run, both guidance branches in one batch
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _relative(out, reference) < 0.05


def _decoder() -> Decoder:
    unet = UNetConfig(
        channels=(16, 32), layers_per_block=1, attention=(False, True), head_dim=8, context_dim=24,
        time_embed_dim=32, num_groups=4,
    )
    torch.manual_seed(0)
    return Decoder(DecoderConfig(unet=unet, clip_embed_dim=16, text_width=12)).eval()


@torch.no_grad()
def test_decoder_without_padding_attends_mask_free_with_the_same_bits():
    decoder, text = _decoder(), _text(2)
    image = torch.randn(2, 16)
    full = TextCond(text.embed, text.hidden, torch.ones_like(text.mask))
    cond = decoder.condition(image, full.embed, full.hidden, full.mask)
    assert cond.attend_all and cond.context_mask.all()
    assert not decoder.condition(image, text.embed, text.hidden, text.mask).attend_all
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    masked = decoder.unet(x, t, emb_add=cond.emb_add, context=cond.context, context_mask=cond.context_mask)
    assert torch.equal(decoder(x, t, cond), masked)  # attn_mask=None, same bits as the all-zero bias


@torch.no_grad()
def test_unet_memory_format_cpu_unchanged_cuda_channels_last():
    decoder = _decoder()
    cond = decoder.condition(torch.randn(1, 16), *_text(1).tensors().values())
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([50])
    out = decoder(x, t, cond)
    assert not decoder.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # CPU: left as is
    if not torch.cuda.is_available():
        pytest.skip("channels_last is used on CUDA only; no CUDA device here")
    gpu = decoder.cuda()
    cond_gpu = type(cond)(cond.context.cuda(), cond.context_mask.cuda(), cond.emb_add.cuda(), cond.attend_all)
    out_gpu = gpu(x.cuda(), t.cuda(), cond_gpu)
    assert gpu.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert _relative(out_gpu.cpu(), out) < 1e-3
