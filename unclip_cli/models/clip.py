"""Frozen CLIP through open_clip: tokens, text embedding + hidden states, image embedding.

A model set keeps its CLIP in open_clip's `local-dir:` layout, a folder holding
`open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...}) and
`open_clip_model.safetensors`. open_clip builds the modules (or, for the text alone, clip_text.py
builds the same ones without importing open_clip); the text forward is written here (against the
attributes of open_clip's CLIP / TextTransformer) because unCLIP needs the per-token hidden states,
which open_clip's `encode_text` does not return.

What the Karlo / diffusers pipeline uses, and what this module returns:
  text_embed   projected EOT token, not L2-normalized (HF `text_embeds`)
  text_hidden  all token states after the final LayerNorm (HF `last_hidden_state`)
  mask         True from SOT up to and including EOT (HF `attention_mask` with pad "!" = id 0)
The transformer runs with its causal mask only, no padding mask: as in HF CLIP, the causal mask
already keeps the trailing pads out of every real token's state. For open_clip's standard blocks
the text forward is written op for op as transformers' CLIPTextModelWithProjection (separate q/k/v
products, SDPA with HF's causal mask, Linear projection), so that imported Karlo sets give
diffusers' numbers to the last bit: the samplers amplify last-bit differences into pixels.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn

from .. import validate
from ..errors import UserError
from ..io import read_safetensors_header, save_weights
from .clip_text import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Blocks,
    TextTower,
    empty_prompt_ids,
    load_text_tower,
    load_tokenizer,
    plain_text_config,
)
from .clip_vision import (  # noqa: F401 (OPENAI_DATASET_*: re-exported)
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    PREFIX as VISION_PREFIX,
    ImagePreprocess,
    VisionTower,
    load_vision_tower,
    plain_vision_config,
    preprocess_config,
)

# open_clip itself is imported where a full model is built (see clip_text.py for why): for the
# towers that clip_text.py and clip_vision.py build, the stage commands never import it.
# Top-level key of open_clip_config.json marking a placeholder vision tower (convert/diffusers_clip.py
# writes one for snapshots without an image encoder); open_clip itself ignores it.
VISION_PLACEHOLDER_KEY = "vision_placeholder"

# open_clip's preprocess keys; the size comes from the model's vision tower.
DEFAULT_PREPROCESS_CFG: dict = {
    "mean": list(OPENAI_DATASET_MEAN),
    "std": list(OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def _create(path: Path, load_weights: bool, device: str = "cpu") -> nn.Module:
    """open_clip model from a local-dir folder; never touches the network."""
    import open_clip

    return open_clip.create_model(
        "local-dir:" + str(path),
        load_weights=load_weights,
        precision="fp32",
        device=device,
        pretrained_image=False,
        pretrained_text=False,  # only HF text towers would download base weights
    )


@contextmanager
def _quiet_open_clip():
    """open_clip warns on the root logger when it builds a model without weights, as intended here."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def write_clip_dir(out_dir: Path, model_cfg: dict, preprocess_cfg: dict | None = None, seed: int = 0) -> None:
    """Save a randomly initialised open_clip model (deterministic in `seed`) in the local-dir layout.

    Parameters that open_clip initialises to a constant (LayerNorm scales and shifts, zero biases)
    are jittered, so that a random model exercises every weight of a converter or a forward.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or DEFAULT_PREPROCESS_CFG}
    text = json.dumps(config, indent=2)
    (out_dir / CONFIG_NAME).write_text(text + "\n")
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(seed)
        model = _create(out_dir, load_weights=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                    p.add_(0.1 * torch.randn_like(p))
    save_weights(out_dir / WEIGHTS_NAME, model.state_dict(), {"format": "pt", "open_clip_config": text})


def check_fit(folder: Path, config: dict) -> None:
    """Refuse a config whose towers are not the weights' (another width, depth or size) from shapes
    alone: the towers clip_text.py and clip_vision.py build, made on the meta device (nothing
    allocated), against `open_clip_model.safetensors`'s header; every tensor they need must be there."""
    weights = Path(folder) / WEIGHTS_NAME
    model_cfg = config.get("model_cfg")
    towers = [(plain_text_config(model_cfg), TextTower, ""), (plain_vision_config(model_cfg), VisionTower, VISION_PREFIX)]
    expected: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        for cfg, tower, prefix in towers:
            if cfg is not None:
                expected.update({prefix + k: tuple(v.shape) for k, v in tower(cfg).state_dict().items()})
    if expected and weights.is_file():  # .bin / .pth: open_clip's loader checks them
        header = read_safetensors_header(weights)
        validate.weights_fit(expected, {k: v for k, v in header.items() if k in expected}, str(folder))


_RESIZED = ("positional_embedding", "logit_scale", "logit_bias")  # tensors open_clip's loader reshapes


def _build(folder: Path, device: torch.device) -> nn.Module:
    """open_clip's model with its weights, after comparing the shapes of its meta-device build with the
    weights' header where names agree (its loader converts other layouts and resizes position
    embeddings), so that a config far larger than its weights is refused before it is built."""
    weights = Path(folder) / WEIGHTS_NAME
    if weights.is_file():
        try:
            with torch.device("meta"), _quiet_open_clip():
                expected = {k: tuple(v.shape) for k, v in _create(folder, load_weights=False, device="meta").state_dict().items()}
        except Exception:  # no meta build: the loader below reports what is wrong
            expected = {}
        header = read_safetensors_header(weights)
        expected = {k: v for k, v in expected.items() if k in header and not k.endswith(_RESIZED)}
        validate.weights_fit(expected, {k: v for k, v in header.items() if k in expected}, str(folder))
    return _create(folder, load_weights=True).to(device)


class ClipEncoder:
    """A frozen open_clip model with the text and image outputs unCLIP needs.

    Loaded from a folder with a standard text tower (`ClipEncoder.load`), it starts on clip_text's
    copy of that tower alone, and encodes images on clip_vision's copy of a plain ViT, loaded on
    first use; the full open_clip model (`.model`: other vision towers, training) is built the first
    time something asks for it, and then serves the text and the images too.
    """

    def __init__(self, model: nn.Module | None, tokenizer, device: torch.device, has_vision: bool = True,
                 *, text: TextTower | None = None, folder: Path | None = None, config: dict | None = None):
        self.has_vision = has_vision  # False: a placeholder vision tower (text-only CLIP)
        self._tokenizer = tokenizer  # None: clip_text's, loaded on first use
        self.device = device
        self._model, self._folder = None, folder
        self._vision, self._vision_cfg, self._preprocess = None, None, None
        if tokenizer is not None and not hasattr(tokenizer, "eot_token_id"):
            raise ValueError(f"unsupported CLIP tokenizer {type(tokenizer).__name__}: need open_clip's SimpleTokenizer")
        if model is not None:
            self._use_model(model)
        elif text is not None and folder is not None:
            self._set_text(text, _eot_pool)  # plain_text_config admits argmax pooling only
            self._text_cfg = text.cfg
            self._vision_cfg = plain_vision_config((config or {}).get("model_cfg"))
            if self._vision_cfg is not None:  # else the preprocessing settings come with open_clip's model
                self._preprocess = ImagePreprocess(preprocess_config(config))
        else:
            raise ValueError("ClipEncoder needs an open_clip model, or a text tower and the folder to build one from")

    def _set_text(self, text: nn.Module, pool) -> None:
        """pool: (hidden (B, L, W), ids (B, L)) -> (B, W)."""
        self._text, self._pool = text, pool
        self.text_width: int = text.transformer.width
        proj = text.text_projection
        if proj is None:
            self.embed_dim: int = self.text_width
        else:
            self.embed_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
        self.context_length: int = text.context_length

    def _use_model(self, model: nn.Module) -> None:
        import open_clip
        from open_clip.transformer import TextTransformer, text_global_pool

        model = model.eval().requires_grad_(False)
        if isinstance(model, open_clip.CLIP):  # text modules live on the CLIP itself
            self._set_text(model, partial(text_global_pool, pool_type=model.text_pool_type, eos_token_id=model.text_eos_id))
        elif isinstance(getattr(model, "text", None), TextTransformer):
            if model.text.cls_emb is not None or model.text.use_pad_mask:
                raise ValueError("CLIP text towers with a class token or a padding mask are not supported")
            self._set_text(model.text, partial(text_global_pool, pool_type=model.text.pool_type, eos_token_id=model.text.eos_id))
        else:
            raise ValueError(
                f"unsupported CLIP text tower ({type(getattr(model, 'text', model)).__name__}): "
                "need open_clip's own text transformer"
            )
        self._preprocess = ImagePreprocess(open_clip.get_model_preprocess_cfg(model))
        self._model = model

    @property
    def model(self) -> nn.Module:
        """The whole open_clip model (built from the folder on first use)."""
        if self._model is None:
            self._use_model(_build(self._folder, self.device))
        return self._model

    @property
    def visual(self) -> nn.Module:
        """The vision tower: open_clip's once its model is built, else clip_vision's where the
        config is a plain ViT (loaded on first use), else open_clip's (building its model)."""
        if self._model is None and self._vision is None and self._vision_cfg is not None:
            self._vision = load_vision_tower(self._folder, self._vision_cfg, self.device)
        if self._model is None and self._vision is not None:
            return self._vision
        return self.model.visual

    @property
    def _pixels(self) -> ImagePreprocess:
        if self._preprocess is None:
            self.model  # noqa: B018 (the vision settings come with the full model)
        return self._preprocess

    @property
    def image_size(self) -> int:
        return self._pixels.size

    @property
    def preprocess_cfg(self) -> dict:
        """open_clip's preprocess settings (size, mean, std, interpolation, resize_mode...)."""
        return self._pixels.cfg

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu") -> "ClipEncoder":
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise UserError(f"{path}: not a CLIP folder (no {CONFIG_NAME})")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")) and not any(path.glob("*.pth")):
            raise UserError(f"{path}: CLIP weights missing")
        device = torch.device(device)
        try:
            config = json.loads((path / CONFIG_NAME).read_text())
            placeholder = bool(config.get(VISION_PLACEHOLDER_KEY, False))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise UserError(f"{path / CONFIG_NAME}: not a valid open_clip config ({e})") from None
        check_fit(path, config)
        text = load_text_tower(path, config.get("model_cfg"), device)
        if text is not None:
            return cls(None, None, device, has_vision=not placeholder, text=text, folder=path, config=config)
        import open_clip

        model = _build(path, device)
        tokenizer = open_clip.get_tokenizer("local-dir:" + str(path))
        return cls(model, tokenizer, device, has_vision=not placeholder, folder=path)

    # ------------------------------------------------------------------ text

    @property
    def tokenizer(self):
        """open_clip's SimpleTokenizer (clip_text's copy built on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._text_cfg)
        return self._tokenizer

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) long, padded with 0 and truncated keeping EOT; mask (B, L) bool, True up to EOT.

        Id 0 is also a real token ("!"), so the mask comes from the EOT position, not from ids != 0.
        Empty prompts alone (the unconditional rows) need no tokenizer tables where the ids are known.
        """
        ids = None
        if self._tokenizer is None and not any(prompts):
            ids = empty_prompt_ids(self._text_cfg, len(prompts))
        if ids is None:
            ids = self.tokenizer(list(prompts), context_length=self.context_length)  # (B, L)
            eot_id = self.tokenizer.eot_token_id
        else:
            eot_id = ids[0, 1].item()
        is_eot = ids == eot_id
        if not bool(is_eot.any(dim=1).all()):
            raise ValueError("tokenizer output without an end-of-text token")
        eot = is_eot.int().argmax(dim=1)  # (B,) first EOT
        mask = torch.arange(ids.shape[1])[None, :] <= eot[:, None]
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text_embed (B, D) projected EOT token, not normalized; text_hidden (B, L, W) after ln_final; mask)."""
        t = self._text
        ids, mask = self.tokenize(prompts)
        L = ids.shape[1]
        x = t.token_embedding(ids) + t.positional_embedding[:L]  # (B, L, W)
        if t.attn_mask is not None and _hf_compatible(t.transformer):
            x = _transformer_as_hf(t.transformer, x)
        else:
            attn_mask = None if t.attn_mask is None else t.attn_mask[:L, :L]  # causal, additive -inf
            x = t.transformer(x, attn_mask=attn_mask)
        hidden = t.ln_final(x)  # (B, L, W)
        pooled = self._pool(hidden, ids)  # (B, W)
        proj = t.text_projection
        if proj is None:
            embed = pooled
        elif isinstance(proj, nn.Linear):
            embed = proj(pooled)
        else:
            embed = F.linear(pooled, proj.t().contiguous())  # (B, D) = pooled @ proj, as HF's Linear computes it
        return embed.float(), hidden.float(), mask

    # ------------------------------------------------------------------ images

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB, shortest side to image_size (bicubic), centre crop, normalize -> (B, 3, S, S)."""
        return torch.stack([self._pixels(im) for im in images]).to(self.device)

    @torch.no_grad()
    def encode_image(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, D) projected image embedding, not normalized."""
        if not self.has_vision:
            raise UserError(
                "this model set's CLIP has no image encoder (imported from a text-to-image snapshot); "
                "use an image-variations set, or re-import with --clip from one"
            )
        pixels = self.preprocess(images)
        visual = self.visual
        if _hf_compatible_vision(visual):
            return _vision_as_hf(visual, pixels).float()
        return self.model.encode_image(pixels, normalize=False).float()


# --------------------------------------------------------------------------- text forward, as transformers


def _hf_compatible(transformer: nn.Module) -> bool:
    """open_clip's standard pre-norm blocks (no layer scale, no extra norms), batch first; clip_text's blocks."""
    if isinstance(transformer, Blocks):
        return True
    from open_clip.transformer import ResidualAttentionBlock

    return getattr(transformer, "batch_first", False) and all(
        type(b) is ResidualAttentionBlock
        and isinstance(b.ls_1, nn.Identity) and isinstance(b.ls_2, nn.Identity)
        and not hasattr(b, "ln_1_kv") and b.attn.in_proj_weight is not None and b.attn.in_proj_bias is not None
        for b in transformer.resblocks
    )


def _eot_pool(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's `argmax` text pooling: the state at the EOT token (the highest id), (B, L, W) -> (B, W)."""
    return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]


def _hf_compatible_vision(visual: nn.Module | None) -> bool:
    """open_clip's plain ViT: class-token pooling, LayerNorms before and after, projection matrix."""
    if isinstance(visual, VisionTower):
        return True
    from open_clip.transformer import VisionTransformer

    return (
        type(visual) is VisionTransformer and visual.attn_pool is None and visual.pool_type == "tok"
        and not visual.final_ln_after_pool and isinstance(visual.patch_dropout, nn.Identity)
        and isinstance(visual.ln_pre, nn.LayerNorm) and isinstance(visual.proj, nn.Parameter)
        and visual.conv1.bias is None and _hf_compatible(visual.transformer)
    )


def _vision_as_hf(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip's ViT computed as transformers' CLIPVisionModelWithProjection: (B, 3, S, S) -> (B, D)."""
    B = pixels.shape[0]
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (B, grid**2, W)
    x = torch.cat([visual.class_embedding.expand(B, 1, -1), x], dim=1) + visual.positional_embedding  # (B, 1 + grid**2, W)
    x = _blocks_as_hf(visual.transformer, visual.ln_pre(x), None)
    pooled = visual.ln_post(x[:, 0, :])  # (B, W)
    return F.linear(pooled, visual.proj.t().contiguous())  # (B, D)


def _transformer_as_hf(transformer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's text blocks computed as transformers' CLIPEncoder (sdpa attention), x (B, L, W)."""
    B, L, _ = x.shape
    min_value = torch.finfo(x.dtype).min
    causal = torch.full((L, L), min_value, dtype=x.dtype, device=x.device).triu(1)  # HF's to_causal_4d
    return _blocks_as_hf(transformer, x, causal[None, None].expand(B, 1, L, L))


def _blocks_as_hf(transformer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    for block in transformer.resblocks:
        x = x + _attention_as_hf(block.attn, block.ln_1(x), mask)
        x = x + block.mlp(block.ln_2(x))
    return x


def _attention_as_hf(attn: nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """nn.MultiheadAttention's weights, computed as transformers' CLIPAttention: (B, L, W) -> (B, L, W)."""
    B, L, W = x.shape
    heads = attn.num_heads
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    q, k, v = (F.linear(x, w, b).view(B, L, heads, W // heads).transpose(1, 2) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=(W // heads) ** -0.5)  # (B, h, L, hd)
    y = y.transpose(1, 2).contiguous().reshape(B, L, W).contiguous()
    return attn.out_proj(y)
