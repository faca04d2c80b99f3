"""CLIP's vision tower and image preprocessing built without importing open_clip or torchvision.

`import open_clip` imports torchvision and, through it, torch._dynamo: about 2 s of start-up on the
2-core CPU machine, more than a bare `import torch`. For open_clip's plain ViT (what its
OpenAI-style ViT configs, Karlo's ViT-L/14 and this project's presets build: class token, learnable
positions, LayerNorms before and after the blocks, standard blocks, a projection matrix) this module
makes the same modules under the same parameter names (`visual.conv1.weight`, ...) and loads only
the vision tensors of `open_clip_model.safetensors`; `ClipEncoder` runs the forward over them as
over open_clip's own `VisionTransformer`. Any other tower (ModifiedResNet, timm, attentional
pooling, layer scale, custom blocks, non-square images) gets None from `plain_vision_config`, and
the caller builds the full open_clip model instead.

Image preprocessing (`ImagePreprocess`) is open_clip's eval transform, computed with PIL alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .clip_text import WEIGHTS_NAME, Blocks, load_tensors, plain_settings

# OpenAI CLIP's pixel statistics (open_clip.constants.OPENAI_DATASET_MEAN / _STD)
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
PREFIX = "visual."  # the vision tower's parameter names in an open_clip CLIP's state dict

# open_clip CLIPVisionCfg fields this tower builds, and the one value each may take when it matters.
_VISION_FIXED = {
    "ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False, "no_ln_pre": False,
    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok", "output_tokens": False,
    "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "timm_model_name": None,
}
# fields that change nothing in a plain ViT's forward (the pooler's and timm's apply to other towers)
_VISION_FREE = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "attn_pooler_queries",
                "attn_pooler_heads", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
                "timm_drop", "timm_drop_path"}
_VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224}

# open_clip's PreprocessCfg defaults (open_clip.transform.PreprocessCfg), the size aside
_PREPROCESS_DEFAULTS = {"mode": "RGB", "mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD,
                        "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "random": Image.BICUBIC}


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def square_size(size) -> int:
    """An image size (int or [S, S]) as one int; ValueError for a non-square one."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"only square CLIP image sizes are supported, got {tuple(size)}")
        size = size[0]
    return int(size)


def plain_vision_config(model_cfg: dict) -> dict | None:
    """The vision settings of an open_clip model config this module can build, else None."""
    out = plain_settings(model_cfg, "vision_cfg", _VISION_FIXED, _VISION_FREE, _VISION_DEFAULTS)
    if out is None:
        return None
    size = out["image_size"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        out["image_size"] = size[0]
    ints = ("width", "head_width", "patch_size", "image_size", "embed_dim")
    if not all(_positive_int(out[k]) for k in ints) or out["width"] % out["head_width"]:
        return None
    if not isinstance(out["layers"], int) or isinstance(out["layers"], bool) or out["layers"] < 0:
        return None
    if not isinstance(out["mlp_ratio"], (int, float)) or out["mlp_ratio"] <= 0 or out["patch_size"] > out["image_size"]:
        return None
    return out


class VisionTower(nn.Module):
    """open_clip's VisionTransformer's modules for a plain_vision_config, under its parameter names."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        W, P, S = cfg["width"], cfg["patch_size"], cfg["image_size"]
        grid = S // P
        self.image_size = (S, S)
        self.conv1 = nn.Conv2d(3, W, kernel_size=P, stride=P, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(W))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, W))  # class token + grid**2 patches
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = Blocks(W, cfg["layers"], W // cfg["head_width"], int(W * cfg["mlp_ratio"]), cfg["quick_gelu"])
        self.ln_post = nn.LayerNorm(W)
        self.proj = nn.Parameter(torch.empty(W, cfg["embed_dim"]))


def load_vision_tower(folder: Path, cfg: dict, device: torch.device) -> VisionTower | None:
    """The vision tower of a plain_vision_config from the folder's weights, or None where they do not hold it."""
    with torch.device("meta"):  # no random init: every parameter comes from the file
        tower = VisionTower(cfg)
    if not load_tensors(Path(folder) / WEIGHTS_NAME, tower, PREFIX):
        return None
    return tower.eval().requires_grad_(False).to(device)


# --------------------------------------------------------------------------- preprocessing


def preprocess_config(config: dict) -> dict:
    """open_clip's final preprocess settings for a local-dir `config` with a plain ViT (what
    `get_model_preprocess_cfg` returns for the model it builds): its defaults, the config's
    `preprocess_cfg` over them, the size from the vision tower (as open_clip's `to_2tuple` gives it)."""
    size = config["model_cfg"].get("vision_cfg", {}).get("image_size", _VISION_DEFAULTS["image_size"])
    size = size if isinstance(size, (list, tuple)) else (size, size)
    given = config.get("preprocess_cfg") or {}
    if not isinstance(given, dict):
        raise ValueError("preprocess_cfg is not an object")
    pp = dict(_PREPROCESS_DEFAULTS, **{k: v for k, v in given.items() if k in _PREPROCESS_DEFAULTS and v is not None})
    return dict(pp, size=size)


class ImagePreprocess:
    """open_clip's eval transform (RGB, shortest side to S, centre crop, normalize) with PIL alone,
    computed as transformers' CLIPImageProcessor (Karlo's feature extractor)."""

    def __init__(self, pp: dict):
        self.cfg = pp
        self.size = square_size(pp["size"])
        if pp.get("resize_mode", "shortest") not in ("shortest", "squash"):
            raise ValueError(f"unsupported CLIP resize_mode {pp['resize_mode']!r}")
        if pp.get("interpolation", "bicubic") not in _RESAMPLE:
            raise ValueError(f"unsupported CLIP interpolation {pp['interpolation']!r}")
        self.resample = _RESAMPLE[pp.get("interpolation", "bicubic")]
        self.mean = torch.tensor(pp["mean"], dtype=torch.float32)[:, None, None]  # (3, 1, 1)
        self.std = torch.tensor(pp["std"], dtype=torch.float32)[:, None, None]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One image -> (3, S, S).

        open_clip's eval transform does the same except the crop offset: torchvision's CenterCrop
        rounds (w - s) / 2 half to even, CLIPImageProcessor floors it; they differ by one pixel when
        w - s = 3 (mod 4). The floor is used so that imported Karlo sets match diffusers.
        """
        s = self.size
        image = image.convert("RGB")
        if self.cfg.get("resize_mode", "shortest") == "squash":
            image = image.resize((s, s), self.resample)
        else:
            w, h = image.size
            size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # shortest side -> s
            image = image.resize(size, self.resample)
            w, h = image.size
            left, top = (w - s) // 2, (h - s) // 2
            image = image.crop((left, top, left + s, top + s))
        # x * (1/255) in float64, then float32, as transformers' rescale
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).double().mul(1 / 255).float()  # (3, S, S)
        return (x - self.mean) / self.std
