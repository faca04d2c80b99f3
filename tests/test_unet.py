"""UNet / decoder / upsampler: shapes, and parity with diffusers 0.33.1 on tiny random models.

diffusers is a test-only reference: ours is always built through unclip_cli.convert.diffusers_unet.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel  # noqa: E402

from unclip_cli.convert.diffusers_unet import (  # noqa: E402
    decoder_config_from_diffusers,
    decoder_state_from_diffusers,
    text_proj_state_from_diffusers,
    unet_config_from_diffusers,
    unet_state_from_diffusers,
)
from unclip_cli.models.configs import UNetConfig, UpsamplerConfig  # noqa: E402
from unclip_cli.models.decoder import Decoder  # noqa: E402
from unclip_cli.models.unet import UNet  # noqa: E402
from unclip_cli.models.upsampler import Upsampler  # noqa: E402

TOL = 1e-5

# Karlo's decoder / super-res shapes, shrunk (the former diffusers unclip fast tests' sizes, plus 3 levels)
DECODER_CONFIGS = [
    dict(
        sample_size=32, in_channels=3, out_channels=6, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, attention_head_dim=4,
        class_embed_type="identity", resnet_time_scale_shift="scale_shift", norm_num_groups=8,
    ),
    dict(
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32, 48), layers_per_block=2,
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 2,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=24, attention_head_dim=8,
        class_embed_type="identity", resnet_time_scale_shift="scale_shift", norm_num_groups=8,
        time_embedding_dim=40, norm_eps=1e-6,
    ),
]
SUPER_RES_CONFIGS = [
    dict(
        sample_size=32, in_channels=6, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2,
        add_attention=False, norm_num_groups=8,
    ),
    dict(
        sample_size=16, in_channels=6, out_channels=3, block_out_channels=(16, 32, 48), layers_per_block=2,
        down_block_types=("ResnetDownsampleBlock2D",) * 3, up_block_types=("ResnetUpsampleBlock2D",) * 3,
        add_attention=False, norm_num_groups=8, resnet_time_scale_shift="scale_shift",
    ),
]


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every 1-D parameter (norm affines, biases, diffusers' zero-initialized CFG embedding)
    so that a swapped norm or a dropped bias shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _config_json(model) -> dict:
    """What the model's config.json holds."""
    return {"_class_name": type(model).__name__, **dict(model.config)}


def _diffusers_decoder(kwargs: dict, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return _randomized(UNet2DConditionModel(**kwargs), seed)


def _ours(model) -> UNet:
    cfg = unet_config_from_diffusers(_config_json(model))
    ours = UNet(cfg)
    ours.load_state_dict(unet_state_from_diffusers(model.state_dict(), cfg))
    return ours.eval()


def _inputs(batch: int, channels: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.tensor([10, 900, 500, 0][:batch])
    return x, t, g


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "cfg, emb, ctx",
    [
        (UNetConfig(in_channels=3, out_channels=6, channels=(16, 32, 48), layers_per_block=3,
                    attention=(False, True, True), head_dim=8, context_dim=24, time_embed_dim=64,
                    num_groups=8), True, True),
        (UNetConfig(in_channels=6, out_channels=3, channels=(8, 16, 32), layers_per_block=1,
                    attention=(False,) * 3, mid_attention=False, context_dim=None, time_embed_dim=32,
                    add_embed=False, scale_shift=False, num_groups=4), False, False),
    ],
)
def test_unet_output_shape(cfg, emb, ctx):
    torch.manual_seed(0)
    net = UNet(cfg).eval()
    x = torch.randn(2, cfg.in_channels, 16, 16)
    kwargs = {}
    if emb:
        kwargs["emb_add"] = torch.randn(2, cfg.time_embed_dim)
    if ctx:
        kwargs["context"] = torch.randn(2, 5, cfg.context_dim)
        kwargs["context_mask"] = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        out = net(x, torch.tensor([3, 700]), **kwargs)
    assert out.shape == (2, cfg.out_channels, 16, 16)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------- parity


@pytest.mark.parametrize("kwargs", DECODER_CONFIGS)
def test_decoder_unet_matches_diffusers(kwargs):
    theirs = _diffusers_decoder(kwargs, seed=1)
    ours = _ours(theirs)
    B, size, Lc = 2, kwargs["sample_size"], 11
    x, t, g = _inputs(B, 3, size, seed=2)
    class_labels = torch.randn(B, ours.cfg.time_embed_dim, generator=g)
    context = torch.randn(B, Lc, kwargs["cross_attention_dim"], generator=g)
    mask = torch.ones(B, Lc, dtype=torch.bool)
    mask[0, 8:] = False
    mask[1, 5:] = False
    with torch.no_grad():
        ref = theirs(x, t, encoder_hidden_states=context, class_labels=class_labels, attention_mask=mask).sample
        out = ours(x, t, emb_add=class_labels, context=context, context_mask=mask)
        unmasked = ours(x, t, emb_add=class_labels, context=context)
    diff = _max_diff(out, ref)
    print(f"decoder UNet {kwargs['block_out_channels']}: max abs diff {diff:.2e}")
    assert diff <= TOL
    assert _max_diff(unmasked, ref) > 1e-3  # the mask matters, so the comparison covers it


@pytest.mark.parametrize("kwargs, extra_tokens", [(DECODER_CONFIGS[0], 4), (DECODER_CONFIGS[1], 2)])
def test_text_proj_and_decoder_match_diffusers(kwargs, extra_tokens):
    unet = _diffusers_decoder(kwargs, seed=3)
    D, L = 12, 7
    torch.manual_seed(4)
    proj = _randomized(
        UnCLIPTextProjModel(
            clip_extra_context_tokens=extra_tokens, clip_embeddings_dim=D,
            time_embed_dim=unet.config.time_embedding_dim or 4 * kwargs["block_out_channels"][0],
            cross_attention_dim=kwargs["cross_attention_dim"],
        ),
        seed=4,
    )
    cfg = decoder_config_from_diffusers(_config_json(unet), _config_json(proj))
    decoder = Decoder(cfg).eval()
    decoder.load_state_dict(decoder_state_from_diffusers(unet.state_dict(), proj.state_dict(), cfg))

    B, size = 2, kwargs["sample_size"]
    x, t, g = _inputs(B, 3, size, seed=5)
    image, text = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    hidden = torch.randn(B, L, D, generator=g)
    text_mask = torch.tensor([[True] * L, [True] * 3 + [False] * (L - 3)])
    with torch.no_grad():
        ref_ctx, ref_emb = proj(image_embeddings=image, prompt_embeds=text, text_encoder_hidden_states=hidden,
                                do_classifier_free_guidance=False)
        ref_mask = F.pad(text_mask, (extra_tokens, 0), value=True)
        ref = unet(x, t, encoder_hidden_states=ref_ctx, class_labels=ref_emb, attention_mask=ref_mask).sample
        cond = decoder.condition(image, text, hidden, text_mask)
        out = decoder(x, t, cond)
        # the unconditional branch: diffusers prepends its learned embedding to the image embeddings
        ref_cfg, _ = proj(image_embeddings=image[:1], prompt_embeds=text, text_encoder_hidden_states=hidden,
                          do_classifier_free_guidance=True)
        null = decoder.condition(decoder.null_image_embed(1).expand(B, -1), text, hidden, text_mask)
    assert torch.equal(cond.context_mask, ref_mask)
    diffs = {
        "context": _max_diff(cond.context, ref_ctx),
        "emb_add": _max_diff(cond.emb_add, ref_emb),
        "output": _max_diff(out, ref),
        "null context": _max_diff(null.context[:1], ref_cfg[:1]),
    }
    print(f"decoder {kwargs['block_out_channels']}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL


@pytest.mark.parametrize("kwargs", SUPER_RES_CONFIGS)
def test_super_res_matches_diffusers(kwargs):
    torch.manual_seed(6)
    first = _randomized(UNet2DModel(**kwargs), seed=6)
    last = _randomized(UNet2DModel(**kwargs), seed=7)
    size = kwargs["sample_size"]
    cfg = UpsamplerConfig(first=unet_config_from_diffusers(_config_json(first)),
                          last=unet_config_from_diffusers(_config_json(last)), low_res=size // 4, size=size)
    up = Upsampler(cfg).eval()
    up.first.load_state_dict(unet_state_from_diffusers(first.state_dict(), cfg.first))
    up.last.load_state_dict(unet_state_from_diffusers(last.state_dict(), cfg.last))

    x, t, g = _inputs(2, 3, size, seed=8)
    low = torch.rand(2, 3, size // 4, size // 4, generator=g) * 2 - 1
    with torch.no_grad():
        ref_up = F.interpolate(low, size=[size, size], mode="bicubic", align_corners=False, antialias=True)
        low_up = up.upsample_low_res(low)
        diffs = {
            "first": _max_diff(up(x, t, low_up, last_step=False), first(torch.cat([x, ref_up], 1), t).sample),
            "last": _max_diff(up(x, t, low_up, last_step=True), last(torch.cat([x, ref_up], 1), t).sample),
        }
    print(f"super-res {kwargs['block_out_channels']}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert torch.equal(low_up, ref_up)
    assert max(diffs.values()) <= TOL


# ---------------------------------------------------------------------- converter checks


def _tiny_decoder_unet():
    theirs = _diffusers_decoder(DECODER_CONFIGS[0], seed=9)
    return theirs, unet_config_from_diffusers(_config_json(theirs))


def test_converter_rejects_extra_key():
    theirs, cfg = _tiny_decoder_unet()
    state = dict(theirs.state_dict())
    assert unet_state_from_diffusers(state, cfg)  # the clean dict converts
    state["mid_block.attentions.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unused keys.*extra.weight"):
        unet_state_from_diffusers(state, cfg)


def test_converter_rejects_missing_key_and_wrong_shape():
    theirs, cfg = _tiny_decoder_unet()
    state = dict(theirs.state_dict())
    del state["conv_out.bias"]
    with pytest.raises(ValueError, match="missing keys.*conv_out.bias"):
        unet_state_from_diffusers(state, cfg)
    state = dict(theirs.state_dict())
    state["up_blocks.0.attentions.1.add_k_proj.weight"] = torch.zeros(64, 31)
    with pytest.raises(ValueError, match="shape mismatch.*add_k_proj.weight"):
        unet_state_from_diffusers(state, cfg)


def test_text_proj_converter_rejects_extra_key_and_wrong_shape():
    proj = UnCLIPTextProjModel(clip_embeddings_dim=12, time_embed_dim=128, cross_attention_dim=32)
    unet = _diffusers_decoder(DECODER_CONFIGS[0], seed=10)
    cfg = decoder_config_from_diffusers(_config_json(unet), _config_json(proj))
    state = dict(proj.state_dict())
    assert text_proj_state_from_diffusers(state, cfg)
    with pytest.raises(ValueError, match="unused keys"):
        text_proj_state_from_diffusers({**state, "extra": torch.zeros(1)})
    state["encoder_hidden_states_proj.weight"] = torch.zeros(32, 13)
    with pytest.raises(ValueError, match="shape mismatch.*encoder_hidden_states_proj"):
        text_proj_state_from_diffusers(state, cfg)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"use_linear_projection": True}, "use_linear_projection"),
        ({"attention_head_dim": (4, 8)}, "attention_head_dim"),
        ({"mid_block_type": "UNetMidBlock2DCrossAttn"}, "mid_block_type"),
        ({"down_block_types": ("DownBlock2D", "SimpleCrossAttnDownBlock2D")}, "down_block_types"),
        ({"up_block_types": ("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D")}, "up_block_types"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"flip_sin_to_cos": False}, "flip_sin_to_cos"),
        ({"some_new_field": 1}, "some_new_field"),
    ],
)
def test_config_converter_rejects_unsupported(change, field):
    config = {"_class_name": "UNet2DConditionModel", **DECODER_CONFIGS[0]}
    assert unet_config_from_diffusers(config).context_dim == 32
    with pytest.raises(ValueError, match=field):
        unet_config_from_diffusers({**config, **change})


def test_config_converter_rejects_super_res_attention():
    config = {"_class_name": "UNet2DModel", **SUPER_RES_CONFIGS[0]}
    assert unet_config_from_diffusers(config).attention == (False, False)
    with pytest.raises(ValueError, match="add_attention"):
        unet_config_from_diffusers({**config, "add_attention": True})
