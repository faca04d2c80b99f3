"""Diffusion prior: behaviour of our module, and parity with diffusers' PriorTransformer (Karlo)."""

from __future__ import annotations

import pytest
import torch

from unclip_cli.convert.diffusers_prior import prior_config_from_diffusers, prior_state_from_diffusers
from unclip_cli.models.configs import PriorConfig
from unclip_cli.models.prior import DiffusionPrior

TINY = PriorConfig(embed_dim=16, text_width=12, num_text_tokens=6, width=24, num_layers=2, num_heads=3)


def _inputs(cfg: PriorConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, cfg.embed_dim, generator=g)
    t = torch.tensor([3, 917, 500, 0][:batch])
    text_embed = torch.randn(batch, cfg.embed_dim, generator=g)
    text_hidden = torch.randn(batch, cfg.num_text_tokens, cfg.text_width, generator=g)
    lengths = torch.tensor([3, cfg.num_text_tokens - 1, cfg.num_text_tokens, 1][:batch])
    text_mask = torch.arange(cfg.num_text_tokens)[None, :] < lengths[:, None]  # (B, L), False = padding
    return x_t, t, text_embed, text_hidden, text_mask


@pytest.fixture
def tiny_prior():
    torch.manual_seed(0)
    return DiffusionPrior(TINY).eval()


def test_output_shape_and_init(tiny_prior):
    out = tiny_prior(*_inputs(TINY))
    assert out.shape == (2, TINY.embed_dim)
    assert torch.isfinite(out).all()
    assert torch.equal(tiny_prior.clip_mean, torch.zeros(1, TINY.embed_dim))
    assert torch.equal(tiny_prior.clip_std, torch.ones(1, TINY.embed_dim))
    assert tiny_prior.pos_embed.std() > 0 and tiny_prior.final_token.std() > 0
    assert out[0].sub(out[1]).abs().max() > 1e-4  # non-degenerate: different inputs, different outputs


def test_wrong_number_of_text_tokens(tiny_prior):
    x_t, t, text_embed, text_hidden, text_mask = _inputs(TINY)
    with pytest.raises(ValueError, match="text tokens"):
        tiny_prior(x_t, t, text_embed, text_hidden[:, :-1], text_mask[:, :-1])


@torch.no_grad()
def test_text_padding_is_ignored(tiny_prior):
    x_t, t, text_embed, text_hidden, text_mask = _inputs(TINY)
    base = tiny_prior(x_t, t, text_embed, text_hidden, text_mask)

    padded = text_hidden.clone()
    padded[0, 3:] = torch.randn_like(padded[0, 3:]) * 10  # sample 0 has 3 real tokens
    padded[1, -1] = 7.0  # sample 1 has L-1 real tokens
    assert torch.allclose(tiny_prior(x_t, t, text_embed, padded, text_mask), base, rtol=0, atol=1e-6)

    real = text_hidden.clone()
    real[0, 2] += 1.0  # a real token does matter
    assert (tiny_prior(x_t, t, text_embed, real, text_mask) - base)[0].abs().max() > 1e-4


@torch.no_grad()
def test_conditioning_changes_output(tiny_prior):
    x_t, t, text_embed, text_hidden, text_mask = _inputs(TINY)
    base = tiny_prior(x_t, t, text_embed, text_hidden, text_mask)
    changed = {
        "text_embed": tiny_prior(x_t, t, text_embed + 1.0, text_hidden, text_mask),
        "t": tiny_prior(x_t, t.flip(0), text_embed, text_hidden, text_mask),
        "x_t": tiny_prior(x_t + 1.0, t, text_embed, text_hidden, text_mask),
    }
    for name, out in changed.items():
        assert (out - base).abs().max() > 1e-4, name


def test_run_prior_follows_the_one_guidance_rule(tiny_prior):
    """The [uncond; cond] batch runs exactly when the scale is not 1, or when a Guidance says so (diffusers'
    pair); its halves mix as uncond + scale * (cond - uncond)."""
    from unclip_cli.diffusion.guidance import Guidance
    from unclip_cli.stages.conditioning import TextCond
    from unclip_cli.stages.prior import run_prior

    _, _, text_embed, text_hidden, text_mask = _inputs(TINY)
    cond = TextCond(text_embed, text_hidden, text_mask)
    null = TextCond(torch.zeros(1, TINY.embed_dim), torch.zeros(1, TINY.num_text_tokens, TINY.text_width),
                    torch.ones(1, TINY.num_text_tokens, dtype=torch.bool))
    batches = []
    hook = tiny_prior.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))

    def sample(guidance):
        batches.clear()
        return run_prior(tiny_prior, cond, null, steps=3, guidance=guidance, generator=torch.Generator().manual_seed(0))

    try:
        plain = sample(1.0)
        assert batches == [2, 2, 2]
        for scale in (0.0, 0.5, 2.0):
            sample(scale)
            assert batches == [4, 4, 4], scale
        batched_at_1 = sample(Guidance.diffusers_pair(1.0, 2.0)[0])  # the prior batched for the decoder's sake
        assert batches == [4, 4, 4]
        torch.testing.assert_close(batched_at_1, plain, rtol=1e-4, atol=1e-5)  # cond alone, up to float noise
        assert not torch.allclose(sample(2.0), plain, atol=1e-3)  # guidance moves the sample
    finally:
        hook.remove()


@torch.no_grad()
def test_causal_mask(tiny_prior):
    """Tokens before x_t (text, text embed, time) never see x_t; x_t and the final token do."""
    seen = []
    hook = tiny_prior.ln_f.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x_t, t, text_embed, text_hidden, text_mask = _inputs(TINY)
    tiny_prior(x_t, t, text_embed, text_hidden, text_mask)
    tiny_prior(x_t + 1.0, t, text_embed, text_hidden, text_mask)
    hook.remove()
    a, b = seen  # (B, T, C) each
    x_pos = TINY.num_text_tokens + 2
    assert torch.equal(a[:, :x_pos], b[:, :x_pos])
    assert (a[:, x_pos:] - b[:, x_pos:]).abs().amax(dim=(0, 2)).min() > 1e-4


def test_normalize_roundtrip(tiny_prior):
    with torch.no_grad():
        tiny_prior.clip_mean.normal_()
        tiny_prior.clip_std.uniform_(0.5, 2.0)
    x = torch.randn(3, TINY.embed_dim)
    z = tiny_prior.normalize(x)
    assert not torch.allclose(z, x)
    torch.testing.assert_close(tiny_prior.denormalize(z), x)


# --- parity with diffusers --------------------------------------------------------------------

PARITY_CONFIGS = {
    # diffusers' former fast test sizes: 2 heads x 12, embedding 32, 1 layer
    "tiny": dict(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1, num_embeddings=7),
    "deeper": dict(num_attention_heads=4, attention_head_dim=8, embedding_dim=16, num_layers=3, num_embeddings=11),
}


def _diffusers_prior(kwargs: dict, seed: int = 0):
    from diffusers import PriorTransformer

    torch.manual_seed(seed)
    model = PriorTransformer(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # diffusers zero-inits several; make all non-trivial
            p.add_(0.1 * torch.randn_like(p))
        model.positional_embedding.normal_()
        model.prd_embedding.normal_()
        model.clip_mean.normal_()
        model.clip_std.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("name", PARITY_CONFIGS)
@torch.no_grad()
def test_parity_with_diffusers(name):
    ref = _diffusers_prior(PARITY_CONFIGS[name])
    cfg = prior_config_from_diffusers(dict(ref.config))
    ours = DiffusionPrior(cfg).eval()
    ours.load_state_dict(prior_state_from_diffusers(ref.state_dict(), cfg))

    x_t, t, text_embed, text_hidden, text_mask = _inputs(cfg)
    assert not text_mask.all(dim=1).any()  # both samples padded
    expected = ref(
        hidden_states=x_t, timestep=t, proj_embedding=text_embed,
        encoder_hidden_states=text_hidden, attention_mask=text_mask,
    ).predicted_image_embedding
    got = ours(x_t, t, text_embed, text_hidden, text_mask)
    diff = (got - expected).abs().max().item()
    print(f"prior parity [{name}]: max abs diff {diff:.3g} (output scale {expected.abs().max().item():.3g})")
    assert diff <= 1e-5
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the comparison is not between constants

    z = torch.randn(2, cfg.embed_dim)
    denorm_diff = (ours.denormalize(z) - ref.post_process_latents(z)).abs().max().item()
    print(f"prior parity [{name}]: denormalize max abs diff {denorm_diff:.3g}")
    assert denorm_diff <= 1e-6


# --- converter --------------------------------------------------------------------------------


def test_config_from_diffusers_karlo():
    karlo = {"_class_name": "PriorTransformer", "_diffusers_version": "0.12.0.dev0",
             "attention_head_dim": 64, "embedding_dim": 768, "num_attention_heads": 32,
             "num_embeddings": 77, "num_layers": 20}
    cfg = prior_config_from_diffusers(karlo)
    assert (cfg.embed_dim, cfg.text_width, cfg.num_text_tokens, cfg.width, cfg.num_layers, cfg.num_heads) == (
        768, 768, 77, 2048, 20, 32)
    assert prior_config_from_diffusers(karlo, text_width=1024).text_width == 1024
    assert cfg.diffusion.prediction == "x0"


@pytest.mark.parametrize(
    "field, value",
    [
        ("norm_in_type", "layer"),
        ("embedding_proj_norm_type", "layer"),
        ("encoder_hid_proj_type", None),
        ("added_emb_type", None),
        ("additional_embeddings", 3),
        ("time_embed_dim", 48),
        ("time_embed_act_fn", "gelu"),
        ("embedding_proj_dim", 64),
        ("clip_embed_dim", 64),
        ("some_new_option", True),
    ],
)
def test_config_rejects_unsupported(field, value):
    config = {**PARITY_CONFIGS["tiny"], field: value}
    with pytest.raises(ValueError, match=field):
        prior_config_from_diffusers(config)


def test_state_rejects_extra_missing_and_misshaped():
    ref = _diffusers_prior(PARITY_CONFIGS["tiny"])
    cfg = prior_config_from_diffusers(dict(ref.config))
    state = ref.state_dict()
    assert set(prior_state_from_diffusers(state, cfg)) == set(DiffusionPrior(cfg).state_dict())

    with pytest.raises(ValueError, match=r"unused keys \['extra.weight'\]"):
        prior_state_from_diffusers({**state, "extra.weight": torch.zeros(3)}, cfg)

    missing = {k: v for k, v in state.items() if k != "transformer_blocks.0.attn1.to_k.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['transformer_blocks.0.attn1.to_k.bias'\]"):
        prior_state_from_diffusers(missing, cfg)

    for key in ("transformer_blocks.0.attn1.to_v.weight", "clip_std", "positional_embedding"):
        bad = {**state, key: torch.cat([state[key], state[key]], dim=-1)}
        with pytest.raises(ValueError, match="shape mismatch.*" + key.replace(".", r"\.")):
            prior_state_from_diffusers(bad, cfg)

    deeper = prior_config_from_diffusers({**dict(ref.config), "num_layers": 2})
    with pytest.raises(ValueError, match="missing keys"):
        prior_state_from_diffusers(state, deeper)
