"""diffusers UNets and `UnCLIPTextProjModel` (Karlo v1 alpha's `decoder/`, `text_proj/`,
`super_res_first/`, `super_res_last/` folders) -> our `UNet` / `TextProjection` / `DecoderConfig`.

Accepted: `UNet2DConditionModel` built from ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D,
UNetMidBlock2DSimpleCrossAttn and the mirrored up blocks (the decoder), and `UNet2DModel` built
from ResnetDownsampleBlock2D / ResnetUpsampleBlock2D without attention (the upsamplers). Any other
variant is rejected by field name rather than silently mis-converted. The diffusion settings
(cfg.diffusion) are not in these configs: the importer fills them from the scheduler config.
"""

from __future__ import annotations

import torch

from unclip_cli.convert.keymap import apply_key_map
from unclip_cli.models.configs import DecoderConfig, UNetConfig
from unclip_cli.models.decoder import TextProjection
from unclip_cli.models.unet import UNet

# diffusers 0.33.1 __init__ defaults (a config.json may omit any of them). Fields not mapped onto
# UNetConfig must keep these values, except those in _IGNORED (training-only or unused by the
# accepted blocks).
_CONDITION_DEFAULTS = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
_2D_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D",) + ("AttnDownBlock2D",) * 3, "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D",) * 3 + ("UpBlock2D",), "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2, "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}
_MAPPED = {
    "sample_size", "in_channels", "out_channels", "down_block_types", "mid_block_type", "up_block_types",
    "block_out_channels", "layers_per_block", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "attention_head_dim", "class_embed_type", "resnet_time_scale_shift", "time_embedding_dim", "add_attention",
}
_IGNORED = {
    "dropout",  # training only
    "downsample_padding", "downsample_type", "upsample_type",  # Resnet*sample blocks use no conv resampler
    "addition_embed_type_num_heads", "attn_norm_num_groups", "num_train_timesteps",  # only for other variants
}
_ALLOWED = {  # unmapped fields whose other accepted values mean the same network
    "only_cross_attention": lambda v: v is False or (isinstance(v, (list, tuple)) and not any(v)),
    "mid_block_only_cross_attention": lambda v: v in (None, False),
}
_DOWN = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}  # type -> attention?
_UP = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}


def _class_name(config: dict) -> str:
    name = config.get("_class_name")
    if name is None:  # a model's .config lacks it; config.json has it
        name = "UNet2DConditionModel" if "cross_attention_dim" in config else "UNet2DModel"
    if name not in ("UNet2DConditionModel", "UNet2DModel"):
        raise ValueError(f"diffusers UNet config: unsupported _class_name={name!r}")
    return name


def _uniform(c: dict, name: str, n: int):
    """A per-level field given as one value or a list of equal values -> that value."""
    v = c[name]
    if isinstance(v, (list, tuple)):
        if len(v) != n or len(set(v)) != 1:
            raise ValueError(f"diffusers UNet config: unsupported {name}={v!r} (one value for all levels)")
        v = v[0]
    return v


def _merged(config: dict, defaults: dict) -> dict:
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ValueError(f"diffusers UNet config: unknown field(s) {unknown}")
    c = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for name, default in defaults.items():
        if name in _MAPPED or name in _IGNORED:
            continue
        ok = _ALLOWED[name](c[name]) if name in _ALLOWED else c[name] == default
        if not ok:
            raise ValueError(f"diffusers UNet config: unsupported {name}={c[name]!r} (supported: {default!r})")
    return c


def _levels(c: dict, conditional: bool) -> list[bool]:
    """Per-level attention flags from the block types; up blocks must mirror the down blocks."""
    down_types = _DOWN if conditional else {"ResnetDownsampleBlock2D": False}
    up_types = _UP if conditional else {"ResnetUpsampleBlock2D": False}
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    for name, types, blocks in (("down_block_types", down_types, down), ("up_block_types", up_types, up)):
        bad = [b for b in blocks if b not in types]
        if bad or len(blocks) != len(c["block_out_channels"]):
            raise ValueError(f"diffusers UNet config: unsupported {name}={blocks!r} (one of {sorted(types)} per level)")
    attention = [down_types[b] for b in down]
    if [up_types[b] for b in reversed(up)] != attention:
        raise ValueError(f"diffusers UNet config: up_block_types={up!r} do not mirror down_block_types={down!r}")
    return attention


def _common(c: dict, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"diffusers UNet config: unsupported {name}={c[name]!r} (supported: {expected})")


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """diffusers UNet2DConditionModel / UNet2DModel config.json dict -> UNetConfig."""
    conditional = _class_name(config) == "UNet2DConditionModel"
    c = _merged(config, _CONDITION_DEFAULTS if conditional else _2D_DEFAULTS)
    channels = tuple(c["block_out_channels"])
    n = len(channels)
    attention = _levels(c, conditional)
    layers = _uniform(c, "layers_per_block", n)
    _common(c, "resnet_time_scale_shift", c["resnet_time_scale_shift"] in ("default", "scale_shift"),
            "'default' or 'scale_shift'")
    _common(c, "class_embed_type", c["class_embed_type"] in (None, "identity"), "None or 'identity'")
    _common(c, "norm_num_groups", isinstance(c["norm_num_groups"], int), "an int")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        _common(c, "sample_size", len(set(size)) == 1, "square")
        size = size[0]
    kwargs = {}
    if conditional:
        _common(c, "mid_block_type", c["mid_block_type"] == "UNetMidBlock2DSimpleCrossAttn",
                "'UNetMidBlock2DSimpleCrossAttn'")
        head_dim = _uniform(c, "attention_head_dim", n)
        widths = [w for w, a in zip(channels, attention) if a] + [channels[-1]]  # levels with attention, mid
        _common(c, "attention_head_dim", isinstance(head_dim, int) and all(w % head_dim == 0 for w in widths),
                "an int dividing every attention width")
        kwargs.update(mid_attention=True, head_dim=head_dim, context_dim=_uniform(c, "cross_attention_dim", n))
    else:
        _common(c, "mid_block_type", c["mid_block_type"] == "UNetMidBlock2D", "'UNetMidBlock2D'")
        _common(c, "add_attention", c["add_attention"] is False, "False")
        kwargs.update(mid_attention=False, context_dim=None)
    return UNetConfig(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        channels=channels,
        layers_per_block=layers,
        attention=tuple(attention),
        time_embed_dim=c["time_embedding_dim"] or 4 * channels[0],
        add_embed=c["class_embed_type"] == "identity",
        scale_shift=c["resnet_time_scale_shift"] == "scale_shift",
        num_groups=c["norm_num_groups"],
        norm_eps=c["norm_eps"],
        sample_size=size if size is not None else UNetConfig.sample_size,
        **kwargs,
    )


# ---------------------------------------------------------------------- weights

_RES = [("in_norm", "norm1"), ("in_conv", "conv1"), ("emb_proj", "time_emb_proj"),
        ("out_norm", "norm2"), ("out_conv", "conv2"), ("skip", "conv_shortcut")]
_ATTN = [("norm", ["group_norm"]), ("qkv", ["to_q", "to_k", "to_v"]),
         ("context_kv", ["add_k_proj", "add_v_proj"]), ("proj_out", ["to_out.0"])]
_TOP = [("time_embed.linear_1", "time_embedding.linear_1"), ("time_embed.linear_2", "time_embedding.linear_2"),
        ("conv_in", "conv_in"), ("out_norm", "conv_norm_out"), ("out_conv", "conv_out")]


def _linear_map(m: dict, pairs, ours: str, theirs: str, expected) -> None:
    """Add `ours.<name>.{weight,bias}` <- `theirs.<src>.{weight,bias}` for the names our model has."""
    for name, srcs in pairs:
        srcs = [srcs] if isinstance(srcs, str) else srcs
        for p in ("weight", "bias"):
            key = ".".join(filter(None, (ours, name, p)))
            if key in expected:
                m[key] = [".".join(filter(None, (theirs, s, p))) for s in srcs]


def _unet_layers(cfg: UNetConfig) -> dict[str, str]:
    """Our UNet's layers (`<blocks>.<step>.<layer>`) -> the diffusers module behind each one."""
    n, L = len(cfg.channels), cfg.layers_per_block
    inputs, outputs = [], []
    for level in range(n):
        b = f"down_blocks.{level}"
        for j in range(L):
            inputs.append([f"{b}.resnets.{j}"] + ([f"{b}.attentions.{j}"] if cfg.attention[level] else []))
        if level < n - 1:
            inputs.append([f"{b}.downsamplers.0"])
    mid_attn = ["mid_block.attentions.0"] if cfg.mid_attention else []
    middle = ["mid_block.resnets.0", *mid_attn, "mid_block.resnets.1"]
    for k in range(n):  # diffusers numbers up_blocks from the deepest level
        b, level = f"up_blocks.{k}", n - 1 - k
        for j in range(L + 1):
            outputs.append([f"{b}.resnets.{j}"] + ([f"{b}.attentions.{j}"] if cfg.attention[level] else []))
        if level > 0:
            outputs[-1].append(f"{b}.upsamplers.0")
    layers = {f"middle_block.{i}": theirs for i, theirs in enumerate(middle)}
    for name, steps in (("input_blocks", inputs), ("output_blocks", outputs)):
        layers.update({f"{name}.{s}.{i}": theirs for s, step in enumerate(steps) for i, theirs in enumerate(step)})
    return layers


def _unet_key_map(cfg: UNetConfig, expected) -> dict[str, list[str]]:
    """Our key -> the diffusers key(s) it is made of (several are concatenated on dim 0)."""
    m: dict[str, list[str]] = {}
    _linear_map(m, _TOP, "", "", expected)
    for ours, theirs in _unet_layers(cfg).items():
        _linear_map(m, _ATTN if ".attentions." in theirs else _RES, ours, theirs, expected)
    return m


def unet_state_from_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel / UNet2DModel state dict -> our UNet state dict.

    ValueError lists missing / unused keys and mismatched shapes.
    """
    with torch.device("meta"):
        expected = UNet(cfg).state_dict()
    return apply_key_map(state, expected, _unet_key_map(cfg, expected), "UNet")


_TEXT_PROJ = {
    "null_image_embed": "learned_classifier_free_guidance_embeddings",
    "image_to_emb.weight": "clip_image_embeddings_project_to_time_embeddings.weight",
    "image_to_emb.bias": "clip_image_embeddings_project_to_time_embeddings.bias",
    "text_to_emb.weight": "embedding_proj.weight",
    "text_to_emb.bias": "embedding_proj.bias",
    "image_to_tokens.weight": "clip_extra_context_tokens_proj.weight",
    "image_to_tokens.bias": "clip_extra_context_tokens_proj.bias",
    "text_proj.weight": "encoder_hidden_states_proj.weight",
    "text_proj.bias": "encoder_hidden_states_proj.bias",
    "text_norm.weight": "text_encoder_hidden_states_norm.weight",
    "text_norm.bias": "text_encoder_hidden_states_norm.bias",
}


def text_proj_state_from_diffusers(
    state: dict[str, torch.Tensor], cfg: DecoderConfig | None = None
) -> dict[str, torch.Tensor]:
    """diffusers UnCLIPTextProjModel state dict -> our TextProjection state dict.

    Keys are always checked; shapes too when `cfg` is given (else only the key set).
    """
    if cfg is not None:
        with torch.device("meta"):
            expected = TextProjection(cfg).state_dict()
    else:
        expected = {ours: state.get(theirs, torch.empty(0)) for ours, theirs in _TEXT_PROJ.items()}
    return apply_key_map(state, expected, {k: [v] for k, v in _TEXT_PROJ.items()}, "text_proj")


def decoder_state_from_diffusers(
    unet_state: dict[str, torch.Tensor], text_proj_state: dict[str, torch.Tensor], cfg: DecoderConfig
) -> dict[str, torch.Tensor]:
    """diffusers decoder/ + text_proj/ state dicts -> our Decoder state dict."""
    out = {f"text_proj.{k}": v for k, v in text_proj_state_from_diffusers(text_proj_state, cfg).items()}
    out.update({f"unet.{k}": v for k, v in unet_state_from_diffusers(unet_state, cfg.unet).items()})
    return out


_TEXT_PROJ_DEFAULTS = {"clip_extra_context_tokens": 4, "clip_embeddings_dim": 768, "time_embed_dim": None,
                       "cross_attention_dim": None}


def decoder_config_from_diffusers(
    unet_config: dict, text_proj_config: dict, text_width: int | None = None
) -> DecoderConfig:
    """diffusers decoder/config.json + text_proj/config.json dicts -> DecoderConfig.

    text_width: width of the CLIP text hidden states; diffusers ties it to clip_embeddings_dim (the default).
    """
    unet = unet_config_from_diffusers(unet_config)
    unknown = sorted(k for k in text_proj_config if not k.startswith("_") and k not in _TEXT_PROJ_DEFAULTS)
    if unknown:
        raise ValueError(f"diffusers text_proj config: unknown field(s) {unknown}")
    c = {**_TEXT_PROJ_DEFAULTS, **{k: v for k, v in text_proj_config.items() if not k.startswith("_")}}
    if unet.context_dim is None or not unet.add_embed:
        raise ValueError("diffusers decoder config: needs cross_attention_dim and class_embed_type='identity'")
    for name, ours in (("time_embed_dim", unet.time_embed_dim), ("cross_attention_dim", unet.context_dim)):
        if c[name] != ours:
            raise ValueError(f"diffusers text_proj config: {name}={c[name]!r} does not match the decoder's {ours}")
    D = c["clip_embeddings_dim"]
    return DecoderConfig(
        unet=unet, clip_embed_dim=D, text_width=D if text_width is None else text_width,
        num_extra_tokens=c["clip_extra_context_tokens"],
    )
