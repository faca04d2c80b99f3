"""diffusers `PriorTransformer` (Karlo v1 alpha's `prior/` folder) -> our `DiffusionPrior`.

Only the variant Karlo uses is accepted; anything else is rejected by name rather than silently
mis-converted. The diffusion settings (cfg.diffusion) are not in this config: the importer fills
them from the scheduler config.
"""

from __future__ import annotations

import torch

from unclip_cli.convert.keymap import apply_key_map
from unclip_cli.models.configs import PriorConfig
from unclip_cli.models.prior import NUM_EXTRA_TOKENS, DiffusionPrior

# diffusers 0.33.1 PriorTransformer.__init__ defaults (a config.json may omit any of them)
_DIFFUSERS_DEFAULTS = {
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "num_layers": 20,
    "embedding_dim": 768,
    "num_embeddings": 77,
    "additional_embeddings": 4,
    "dropout": 0.0,  # training only; ignored
    "time_embed_act_fn": "silu",
    "norm_in_type": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
    "time_embed_dim": None,
    "embedding_proj_dim": None,
    "clip_embed_dim": None,
}


def prior_config_from_diffusers(config: dict, text_width: int | None = None) -> PriorConfig:
    """diffusers prior/config.json dict -> PriorConfig.

    text_width: width of the text hidden states; diffusers ties it to embedding_dim (the default).
    """
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
        raise ValueError(f"diffusers prior config: unknown field(s) {unknown}")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    width = c["num_attention_heads"] * c["attention_head_dim"]
    dim = c["embedding_dim"]

    def require(name, ok, expected):
        if not ok:
            raise ValueError(f"diffusers prior config: unsupported {name}={c[name]!r} (supported: {expected})")

    require("additional_embeddings", c["additional_embeddings"] == NUM_EXTRA_TOKENS, NUM_EXTRA_TOKENS)
    require("time_embed_act_fn", c["time_embed_act_fn"] == "silu", "'silu'")
    require("norm_in_type", c["norm_in_type"] is None, "None")
    require("embedding_proj_norm_type", c["embedding_proj_norm_type"] is None, "None")
    require("encoder_hid_proj_type", c["encoder_hid_proj_type"] == "linear", "'linear'")
    require("added_emb_type", c["added_emb_type"] == "prd", "'prd'")
    require("time_embed_dim", c["time_embed_dim"] in (None, width), f"None or {width}")
    require("embedding_proj_dim", c["embedding_proj_dim"] in (None, dim), f"None or {dim}")
    require("clip_embed_dim", c["clip_embed_dim"] in (None, dim), f"None or {dim}")
    return PriorConfig(
        embed_dim=dim,
        text_width=dim if text_width is None else text_width,
        num_text_tokens=c["num_embeddings"],
        width=width,
        num_layers=c["num_layers"],
        num_heads=c["num_attention_heads"],
    )


def _key_map(cfg: PriorConfig) -> dict[str, list[str]]:
    """Our key -> the diffusers key(s) it is made of (several are concatenated on dim 0)."""
    m = {
        "time_embed.linear_1.weight": ["time_embedding.linear_1.weight"],
        "time_embed.linear_1.bias": ["time_embedding.linear_1.bias"],
        "time_embed.linear_2.weight": ["time_embedding.linear_2.weight"],
        "time_embed.linear_2.bias": ["time_embedding.linear_2.bias"],
        "text_proj.weight": ["encoder_hidden_states_proj.weight"],
        "text_proj.bias": ["encoder_hidden_states_proj.bias"],
        "text_embed_proj.weight": ["embedding_proj.weight"],
        "text_embed_proj.bias": ["embedding_proj.bias"],
        "x_proj.weight": ["proj_in.weight"],
        "x_proj.bias": ["proj_in.bias"],
        "pos_embed": ["positional_embedding"],
        "final_token": ["prd_embedding"],
        "ln_f.weight": ["norm_out.weight"],
        "ln_f.bias": ["norm_out.bias"],
        "out_proj.weight": ["proj_to_clip_embeddings.weight"],
        "out_proj.bias": ["proj_to_clip_embeddings.bias"],
        "clip_mean": ["clip_mean"],
        "clip_std": ["clip_std"],
    }
    for i in range(cfg.num_layers):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            m[f"{ours}ln_1.{p}"] = [f"{theirs}norm1.{p}"]
            m[f"{ours}attn.qkv.{p}"] = [f"{theirs}attn1.to_{n}.{p}" for n in "qkv"]
            m[f"{ours}attn.proj.{p}"] = [f"{theirs}attn1.to_out.0.{p}"]
            m[f"{ours}ln_2.{p}"] = [f"{theirs}norm3.{p}"]
            m[f"{ours}mlp.fc.{p}"] = [f"{theirs}ff.net.0.proj.{p}"]
            m[f"{ours}mlp.proj.{p}"] = [f"{theirs}ff.net.2.{p}"]
    return m


def prior_state_from_diffusers(state: dict[str, torch.Tensor], cfg: PriorConfig) -> dict[str, torch.Tensor]:
    """diffusers PriorTransformer state dict -> DiffusionPrior state dict.

    Every source tensor must be used exactly once and every result must have our shape;
    otherwise ValueError lists the missing / unused keys and the mismatched shapes.
    """
    with torch.device("meta"):
        expected = DiffusionPrior(cfg).state_dict()
    return apply_key_map(state, expected, _key_map(cfg), "prior")
