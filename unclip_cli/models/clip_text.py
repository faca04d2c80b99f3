"""CLIP's text tower built without importing open_clip, for the commands that only encode prompts.

`import open_clip` costs about 2 s on the 2-core CPU machine (its package imports torchvision,
which imports torch._dynamo, and transformers where installed), more than `generate --size 64`
spends sampling. For the text tower of an open_clip `CLIP` with standard blocks (what open_clip's
OpenAI-style configs, Karlo's ViT-L/14 and this project's presets build) this module makes the same
modules under the same parameter names and loads only the text tensors of
`open_clip_model.safetensors`; `ClipEncoder` runs its text forward over them exactly as over
open_clip's own modules. Prompts are tokenized by open_clip's tokenizer module itself, loaded from
the installed package without running the package's `__init__`.

A config using anything else (HF text towers, layer scale, custom blocks, a class token, another
pooling or tokenizer) gets None from `load_text_tower`, and the caller builds the full open_clip
model instead.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

# open_clip CLIPTextCfg fields this tower builds, and the one value each may take when it matters.
_TEXT_FIXED = {
    "hf_tokenizer_name": None, "tokenizer_mode": None, "ls_init_value": None, "embed_cls": False,
    "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax", "proj_type": "linear",
    "output_tokens": False, "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
    "scale_fc": False, "hf_model_name": None,
}
_TEXT_FREE = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "proj_bias", "pad_id",
              "eos_id", "tokenizer_kwargs", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                  "mlp_ratio": 4.0, "proj_bias": False}
# model_cfg keys besides the towers that change nothing in the text forward
_MODEL_FREE = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale", "init_logit_bias",
               "nonscalar_logit_scale", "custom_text"}


def plain_settings(model_cfg, tower: str, fixed: dict, free: set, defaults: dict) -> dict | None:
    """A tower's settings (`model_cfg[tower]` over `defaults`, plus embed_dim and quick_gelu) where
    it sets only `free` fields and `fixed` ones to their one value, else None."""
    if not isinstance(model_cfg, dict) or "embed_dim" not in model_cfg or set(model_cfg) - _MODEL_FREE or model_cfg.get("custom_text"):
        return None
    given = model_cfg.get(tower, {})
    if not isinstance(given, dict) or set(given) - free - set(fixed) or any(given.get(k, v) != v for k, v in fixed.items()):
        return None
    out = {k: given.get(k, v) for k, v in defaults.items()}
    return dict(out, embed_dim=model_cfg["embed_dim"], quick_gelu=bool(model_cfg.get("quick_gelu", False)))


def plain_text_config(model_cfg: dict) -> dict | None:
    """The text settings of an open_clip model config this module can build, else None."""
    out = plain_settings(model_cfg, "text_cfg", _TEXT_FIXED, _TEXT_FREE, _TEXT_DEFAULTS)
    if out is None:
        return None
    return dict(out, embed_dim=int(out["embed_dim"]), tokenizer_kwargs=dict(model_cfg.get("text_cfg", {}).get("tokenizer_kwargs") or {}))


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, the same expression as open_clip's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
    """open_clip's ResidualAttentionBlock's modules (pre-norm attention and MLP), batch first."""

    def __init__(self, width: int, heads: int, mlp_width: int, quick_gelu: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(mlp_width, width)),
        ]))


class Blocks(nn.Module):
    """open_clip's Transformer (batch first) of standard blocks: the text's and the plain ViT's."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, quick_gelu: bool):
        super().__init__()
        self.width, self.batch_first = width, True
        self.resblocks = nn.ModuleList([_Block(width, heads, mlp_width, quick_gelu) for _ in range(layers)])


class TextTower(nn.Module):
    """The text attributes of open_clip's `CLIP`, under its parameter names (`token_embedding`, ...)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg  # plain_text_config's dict (the tokenizer's settings too)
        V, W, L = int(cfg["vocab_size"]), int(cfg["width"]), int(cfg["context_length"])
        self.context_length = L
        # An explicit weight skips Embedding's normal_ init, which on the meta device goes through
        # torch._refs and imports torch._dynamo (~2 s of start-up); every parameter is loaded anyway.
        self.token_embedding = nn.Embedding(V, W, _weight=torch.empty(V, W))
        self.positional_embedding = nn.Parameter(torch.empty(L, W))
        self.transformer = Blocks(W, int(cfg["layers"]), int(cfg["heads"]), int(W * cfg["mlp_ratio"]), cfg["quick_gelu"])
        self.ln_final = nn.LayerNorm(W)
        if cfg["proj_bias"]:
            self.text_projection = nn.Linear(W, cfg["embed_dim"])
        else:
            self.text_projection = nn.Parameter(torch.empty(W, cfg["embed_dim"]))

    @property
    def attn_mask(self) -> torch.Tensor:
        """Causal, additive (open_clip's build_causal_mask); the text forward makes its own from L."""
        L = self.context_length
        return torch.full((L, L), float("-inf"), device=self.positional_embedding.device).triu(1)


def load_text_tower(folder: Path, model_cfg, device: torch.device) -> TextTower | None:
    """The text tower of the open_clip folder `folder` (its config's `model_cfg`), or None where the
    full model is needed."""
    cfg = plain_text_config(model_cfg)
    if cfg is None:
        return None
    with torch.device("meta"):  # no random init: every parameter comes from the file
        tower = TextTower(cfg)
    if not load_tensors(Path(folder) / WEIGHTS_NAME, tower):
        return None
    return tower.eval().requires_grad_(False).to(device)


def load_tensors(weights: Path, tower: nn.Module, prefix: str = "") -> bool:
    """Assign the tensors `prefix + name` of the safetensors file `weights` to the meta-device
    `tower`'s parameters (as float32); False, with nothing loaded, where the file lacks one or holds
    another shape (the full open_clip loader then reports it)."""
    from safetensors import safe_open

    wanted = tower.state_dict()
    if not weights.is_file():
        return False
    try:
        with safe_open(str(weights), framework="pt") as f:
            if not {prefix + k for k in wanted} <= set(f.keys()):
                return False
            state = {k: f.get_tensor(prefix + k) for k in wanted}
    except Exception:  # a corrupt file: the full loader reports it
        return False
    if any(state[k].shape != v.shape for k, v in wanted.items()):
        return False
    tower.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return True


# open_clip's default SimpleTokenizer: 512 byte tokens and 48,894 merges, then these two
DEFAULT_SOT_ID, DEFAULT_EOT_ID = 49406, 49407


def empty_prompt_ids(cfg: dict, batch: int) -> torch.Tensor | None:
    """(batch, L) ids of the empty prompt (the unconditional rows) as open_clip's default tokenizer
    makes them, [SOT, EOT, 0...], without building its tables; None for a tokenizer with options."""
    L = cfg["context_length"]
    if cfg["tokenizer_kwargs"] or L < 2:
        return None
    ids = torch.zeros(batch, L, dtype=torch.long)
    ids[:, 0], ids[:, 1] = DEFAULT_SOT_ID, DEFAULT_EOT_ID
    return ids


def load_tokenizer(cfg: dict):
    """open_clip's SimpleTokenizer for a plain_text_config, as `open_clip.get_tokenizer` makes it.

    Loading open_clip's tokenizer module already builds a default SimpleTokenizer (its module-level
    `_tokenizer`), and building one costs ~0.14 s on the 2-core CPU machine (49k BPE merges
    parsed into dicts; measured 2026-12-03). With default options a shallow copy of that one, given the config's context
    length, is the same tokenizer without building the tables twice.
    """
    module = _open_clip_tokenizer_module()
    shared = getattr(module, "_tokenizer", None)
    if not cfg["tokenizer_kwargs"] and type(shared) is module.SimpleTokenizer:
        tokenizer = copy.copy(shared)  # the tables are read-only; `cache` only memoizes bpe()
        tokenizer.context_length = cfg["context_length"]
        return tokenizer
    return module.SimpleTokenizer(context_length=cfg["context_length"], **cfg["tokenizer_kwargs"])


def _open_clip_tokenizer_module():
    """`open_clip.tokenizer`, without importing the rest of open_clip where it is not loaded yet."""
    if "open_clip" in sys.modules:
        import open_clip.tokenizer

        return open_clip.tokenizer
    name = "unclip_cli._open_clip_tokenizer"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("open_clip")  # finds the package without running it
    if package is None or not package.submodule_search_locations:
        raise ImportError("open_clip is not installed")
    path = Path(list(package.submodule_search_locations)[0]) / "tokenizer.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
