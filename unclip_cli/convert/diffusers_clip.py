"""transformers CLIP towers (Karlo's `text_encoder/`, `image_encoder/`) -> open_clip `CLIP`, local-dir layout.

Sources: a `CLIPTextModelWithProjection` folder and, optionally, a `CLIPVisionModelWithProjection`
folder (each `config.json` + `model.safetensors` or `pytorch_model.bin`), and optionally a
`CLIPImageProcessor` `preprocessor_config.json`. Result: a folder with `open_clip_config.json`
({"model_cfg", "preprocess_cfg"}) and `open_clip_model.safetensors`, loadable with
`open_clip.create_model("local-dir:" + path)`.

What Karlo uses maps one to one: HF `text_embeds` = open_clip `encode_text(normalize=False)`,
HF `last_hidden_state` = open_clip's token states after `ln_final`, HF `image_embeds` =
`encode_image(normalize=False)`.

open_clip's CLIP always has a vision tower. Without a vision source (Karlo's text-to-image snapshot)
a placeholder tower of 10 + embed_dim zero parameters is written (PLACEHOLDER_VISION_CFG: 1x1 pixel, width 1,
no layers; every image embeds to zeros) and `open_clip_config.json` gets the top-level key
`"vision_placeholder": true` (open_clip ignores it); read it with `has_placeholder_vision`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from unclip_cli.errors import UserError
from unclip_cli.io import load_state_dict, save_weights
from unclip_cli.models.clip import CONFIG_NAME, WEIGHTS_NAME
VISION_PLACEHOLDER_KEY = "vision_placeholder"  # top-level key of open_clip_config.json

# The smallest vision tower open_clip builds: 1x1 pixel, width 1, no blocks (10 + embed_dim parameters).
PLACEHOLDER_VISION_CFG: dict = {
    "image_size": 1,
    "patch_size": 1,
    "width": 1,
    "head_width": 1,
    "layers": 0,
    "mlp_ratio": 1.0,
}

# transformers 4.57 CLIPTextConfig / CLIPVisionConfig defaults: save_pretrained omits default values.
_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_ACTS = {"quick_gelu": True, "gelu": False}  # HF hidden_act -> open_clip quick_gelu ("gelu" is erf GELU = nn.GELU)
_CLIP_VOCAB = 49408  # open_clip's SimpleTokenizer (the local-dir tokenizer): ids 0..49407
_LEGACY_EOS = 2  # HF pools with argmax(ids) when eos_token_id == 2 (configs before transformers PR #24773)
_OPEN_CLIP_LN_EPS = 1e-5  # open_clip LayerNorm default
_IGNORED_KEYS = {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}  # buffers
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resample codes in preprocessor_config.json


# --------------------------------------------------------------------------- configs


def _with_defaults(config: dict, defaults: dict, what: str, model_type: str) -> dict:
    kind = config.get("model_type", model_type)
    if kind != model_type:
        raise ValueError(f"{what} config: model_type={kind!r}, expected {model_type!r}")
    return {**defaults, **{k: config[k] for k in defaults if k in config}}


def _mlp_ratio(c: dict, what: str) -> float:
    """intermediate_size / hidden_size, as open_clip's `int(width * mlp_ratio)` gives back exactly."""
    ratio = c["intermediate_size"] / c["hidden_size"]
    if int(c["hidden_size"] * ratio) != c["intermediate_size"]:
        raise ValueError(
            f"{what} config: intermediate_size={c['intermediate_size']} not expressible as an open_clip mlp_ratio"
        )
    return ratio


def _heads(c: dict, what: str) -> int:
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ValueError(f"{what} config: hidden_size={c['hidden_size']} not divisible by num_attention_heads")
    return c["num_attention_heads"]


def _norm_kwargs(c: dict) -> dict:
    return {} if c["layer_norm_eps"] == _OPEN_CLIP_LN_EPS else {"norm_kwargs": {"eps": c["layer_norm_eps"]}}


def _quick_gelu(c: dict, what: str) -> bool:
    if c["hidden_act"] not in _ACTS:
        raise ValueError(f"{what} config: unsupported hidden_act={c['hidden_act']!r} (supported: {sorted(_ACTS)})")
    return _ACTS[c["hidden_act"]]


def open_clip_config_from_hf(text_config: dict, vision_config: dict | None, projection_dim: int) -> dict:
    """HF CLIPTextConfig (+ CLIPVisionConfig) dicts -> open_clip model_cfg.

    vision_config None -> PLACEHOLDER_VISION_CFG (see `is_placeholder_vision`). Variants open_clip
    cannot express, or that would load but compute something else, raise ValueError naming the field.
    """
    t = _with_defaults(text_config, _TEXT_DEFAULTS, "text", "clip_text_model")
    if t["projection_dim"] != projection_dim:
        raise ValueError(f"text config: projection_dim={t['projection_dim']}, expected {projection_dim}")
    if t["vocab_size"] != _CLIP_VOCAB:
        raise ValueError(f"text config: vocab_size={t['vocab_size']}, open_clip's CLIP tokenizer has {_CLIP_VOCAB}")
    quick_gelu = _quick_gelu(t, "text")
    eos = t["eos_token_id"]
    text_cfg = {
        "context_length": t["max_position_embeddings"],
        "vocab_size": t["vocab_size"],
        "width": t["hidden_size"],
        "heads": _heads(t, "text"),
        "layers": t["num_hidden_layers"],
        "mlp_ratio": _mlp_ratio(t, "text"),
        # HF: argmax(ids) for legacy configs, else the first eos_token_id; identical for CLIP's BPE (EOT is the max id)
        **({"pool_type": "argmax"} if eos == _LEGACY_EOS else {"pool_type": "eos", "eos_id": eos}),
        **_norm_kwargs(t),
    }
    if vision_config is None:
        vision_cfg = dict(PLACEHOLDER_VISION_CFG)
    else:
        v = _with_defaults(vision_config, _VISION_DEFAULTS, "vision", "clip_vision_model")
        if v["projection_dim"] != projection_dim:
            raise ValueError(f"vision config: projection_dim={v['projection_dim']}, expected {projection_dim}")
        if v["num_channels"] != 3:
            raise ValueError(f"vision config: num_channels={v['num_channels']}, open_clip takes RGB (3)")
        if _quick_gelu(v, "vision") != quick_gelu:
            raise ValueError(
                f"vision config: hidden_act={v['hidden_act']!r} differs from the text tower's "
                f"{t['hidden_act']!r} (open_clip has one activation for both)"
            )
        if v["image_size"] % v["patch_size"]:
            raise ValueError(
                f"vision config: image_size={v['image_size']} not a multiple of patch_size={v['patch_size']}"
            )
        vision_cfg = {
            "image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "width": v["hidden_size"],
            "head_width": v["hidden_size"] // _heads(v, "vision"),
            "layers": v["num_hidden_layers"],
            "mlp_ratio": _mlp_ratio(v, "vision"),
            **_norm_kwargs(v),
        }
    return {"embed_dim": projection_dim, "quick_gelu": quick_gelu, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def is_placeholder_vision(model_cfg: dict) -> bool:
    """True when the model_cfg's vision tower is the converter's placeholder (no real image encoder)."""
    return model_cfg.get("vision_cfg") == PLACEHOLDER_VISION_CFG


def has_placeholder_vision(clip_dir: Path) -> bool:
    """True when a local-dir CLIP folder was written without an image encoder."""
    return bool(json.loads((Path(clip_dir) / CONFIG_NAME).read_text()).get(VISION_PLACEHOLDER_KEY, False))


def preprocess_cfg_from_hf(config: dict | None, image_size: int | None) -> dict:
    """CLIPImageProcessor preprocessor_config.json dict -> open_clip preprocess_cfg.

    None: OpenAI CLIP's preprocessing at the tower's size. open_clip's eval transform is: shortest
    side to `size`, centre crop `size`, /255, normalize; a processor that does anything else raises
    ValueError naming the field. image_size: the vision tower's (None: placeholder, not checked).
    """
    if config is None:
        config = {} if image_size is None else {"size": image_size, "crop_size": image_size}
    c = {  # CLIPImageProcessor defaults (transformers 4.57); an int size is the shortest edge
        "do_resize": True,
        "size": {"shortest_edge": 224},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_DATASET_MEAN),
        "image_std": list(OPENAI_DATASET_STD),
    }
    c.update({k: config[k] for k in c if k in config})
    size, crop = c["size"], c["crop_size"]
    short = size if isinstance(size, int) else size.get("shortest_edge")
    crop_hw = (crop, crop) if isinstance(crop, int) else (crop.get("height"), crop.get("width"))
    for field in ("do_resize", "do_center_crop"):
        if not c[field]:
            raise ValueError(f"image processor: {field}=False (open_clip always resizes and centre-crops)")
    if short is None or crop_hw != (short, short):
        raise ValueError(f"image processor: size={size} and crop_size={crop} (supported: shortest_edge == crop side)")
    if image_size is not None and short != image_size:
        raise ValueError(f"image processor: crop size {short}, but the vision tower takes {image_size}px")
    if c["resample"] not in _RESAMPLE:
        raise ValueError(f"image processor: unsupported resample={c['resample']} (supported: {_RESAMPLE})")
    if not c["do_rescale"] or not math.isclose(c["rescale_factor"], 1 / 255, rel_tol=1e-9):
        raise ValueError(
            f"image processor: do_rescale={c['do_rescale']}, rescale_factor={c['rescale_factor']} (need 1/255)"
        )
    mean, std = (c["image_mean"], c["image_std"]) if c["do_normalize"] else ([0.0] * 3, [1.0] * 3)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"image processor: image_mean / image_std need 3 channels, got {mean} / {std}")
    pp = {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    pp.update({"interpolation": _RESAMPLE[c["resample"]], "resize_mode": "shortest"})
    if image_size is not None:
        pp["size"] = image_size
    return pp


# --------------------------------------------------------------------------- weights


def _key_map(model_cfg: dict, with_vision: bool) -> dict[str, tuple[list[str], str | None]]:
    """open_clip key -> (HF key(s), op); op "cat": concatenate on dim 0, "T": transpose, None: copy."""
    m: dict[str, tuple[list[str], str | None]] = {
        "token_embedding.weight": (["text_model.embeddings.token_embedding.weight"], None),
        "positional_embedding": (["text_model.embeddings.position_embedding.weight"], None),
        "ln_final.weight": (["text_model.final_layer_norm.weight"], None),
        "ln_final.bias": (["text_model.final_layer_norm.bias"], None),
        "text_projection": (["text_projection.weight"], "T"),  # HF Linear (D, W) -> open_clip x @ P, P (W, D)
    }

    def blocks(ours: str, theirs: str, n: int) -> None:
        for i in range(n):
            o, h = f"{ours}.{i}.", f"{theirs}.{i}."
            for p in ("weight", "bias"):
                m[f"{o}attn.in_proj_{p}"] = ([f"{h}self_attn.{x}_proj.{p}" for x in "qkv"], "cat")  # (3W, ...)
                m[f"{o}attn.out_proj.{p}"] = ([f"{h}self_attn.out_proj.{p}"], None)
                m[f"{o}ln_1.{p}"] = ([f"{h}layer_norm1.{p}"], None)
                m[f"{o}ln_2.{p}"] = ([f"{h}layer_norm2.{p}"], None)
                m[f"{o}mlp.c_fc.{p}"] = ([f"{h}mlp.fc1.{p}"], None)
                m[f"{o}mlp.c_proj.{p}"] = ([f"{h}mlp.fc2.{p}"], None)

    blocks("transformer.resblocks", "text_model.encoder.layers", model_cfg["text_cfg"]["layers"])
    if with_vision:
        e = "vision_model.embeddings."
        m["visual.class_embedding"] = ([e + "class_embedding"], None)
        m["visual.conv1.weight"] = ([e + "patch_embedding.weight"], None)  # no bias in either
        m["visual.positional_embedding"] = ([e + "position_embedding.weight"], None)
        m["visual.proj"] = (["visual_projection.weight"], "T")
        for p in ("weight", "bias"):
            m[f"visual.ln_pre.{p}"] = ([f"vision_model.pre_layrnorm.{p}"], None)  # sic
            m[f"visual.ln_post.{p}"] = ([f"vision_model.post_layernorm.{p}"], None)
        blocks("visual.transformer.resblocks", "vision_model.encoder.layers", model_cfg["vision_cfg"]["layers"])
    return m


def _expected_state(model_cfg: dict) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return open_clip.CLIP(**model_cfg).state_dict()


def open_clip_state_from_hf(text_state: dict, vision_state: dict | None, model_cfg: dict) -> dict:
    """HF CLIPTextModelWithProjection (+ CLIPVisionModelWithProjection) state dicts -> open_clip CLIP state dict.

    Every source tensor must be used exactly once (position_ids buffers aside) and every result must
    have the shape of the open_clip model built from model_cfg; otherwise ValueError lists the missing
    and unused keys and the mismatched shapes. vision_state None: zero placeholder vision weights.
    `logit_scale` comes from the source if it has one (a CLIPModel's), else ln(1/0.07).
    """
    with_vision = vision_state is not None
    if with_vision == is_placeholder_vision(model_cfg):
        raise ValueError(
            "vision weights and model_cfg disagree: pass vision weights iff model_cfg has a real vision tower"
        )
    sources = {k: v for k, v in text_state.items() if k not in _IGNORED_KEYS}
    for k, v in (vision_state or {}).items():
        if k in _IGNORED_KEYS:
            continue
        if k in sources and not torch.equal(sources[k], v):
            raise ValueError(f"key {k!r} in both the text and the vision weights, with different values")
        sources[k] = v

    expected = _expected_state(model_cfg)
    key_map = _key_map(model_cfg, with_vision)
    if "logit_scale" in sources:
        key_map["logit_scale"] = (["logit_scale"], None)
    used = [s for srcs, _ in key_map.values() for s in srcs]
    assert len(used) == len(set(used)), "a source key mapped twice"
    missing = sorted(s for s in used if s not in sources)
    unused = sorted(set(sources) - set(used))
    problems = [f"missing keys {missing}"] if missing else []
    if unused:
        problems.append(f"unused keys {unused}")
    if problems:
        raise ValueError("HF CLIP weights do not match the config: " + "; ".join(problems))

    state: dict[str, torch.Tensor] = {}
    bad_shapes = []
    for ours, (srcs, op) in key_map.items():
        tensors = [sources[s] for s in srcs]
        if op == "cat":
            if len({t.shape for t in tensors}) != 1:
                bad_shapes.append(f"{srcs}: {[tuple(t.shape) for t in tensors]}")
                continue
            t = torch.cat(tensors, dim=0)
        elif op == "T":
            t = tensors[0].t() if tensors[0].ndim == 2 else tensors[0]
        else:
            t = tensors[0]
        want = expected[ours].shape
        if ours == "logit_scale" and t.numel() == 1:
            t = t.reshape(want)
        if t.shape != want:
            name = srcs[0] if len(srcs) == 1 else srcs
            bad_shapes.append(f"{name} -> {ours}: {tuple(t.shape)}, expected {tuple(want)}")
            continue
        state[ours] = t.contiguous()
    if bad_shapes:
        raise ValueError("HF CLIP weights have the wrong shape: " + "; ".join(bad_shapes))

    dtype = state["token_embedding.weight"].dtype
    if "logit_scale" not in state:
        state["logit_scale"] = torch.full(expected["logit_scale"].shape, math.log(1 / 0.07), dtype=dtype)
    if not with_vision:
        for k, t in expected.items():
            if k.startswith("visual."):
                state[k] = torch.zeros(t.shape, dtype=dtype)
    assert set(state) == set(expected), f"key map out of date with open_clip: {sorted(set(expected) ^ set(state))}"
    return state


# --------------------------------------------------------------------------- folders


def write_open_clip_dir(out_dir: Path, model_cfg: dict, state: dict, preprocess_cfg: dict) -> None:
    """Write open_clip_config.json + open_clip_model.safetensors, after checking them.

    The files are written to a temporary sibling folder, loaded back with
    `open_clip.create_model("local-dir:...")` (strict) and compared tensor for tensor, then moved
    into out_dir: a failed check leaves out_dir untouched.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    if is_placeholder_vision(model_cfg):
        config[VISION_PLACEHOLDER_KEY] = True
    text = json.dumps(config, indent=2) + "\n"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / CONFIG_NAME).write_text(text)
        save_weights(tmp / WEIGHTS_NAME, state, {"format": "pt", "open_clip_config": text})
        _verify(tmp, state)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verify(path: Path, state: dict) -> None:
    try:
        model = open_clip.create_model(
            "local-dir:" + str(path), precision="fp32", pretrained_image=False, pretrained_text=False
        )
    except Exception as e:  # open_clip raises RuntimeError (strict load) or ValueError (config)
        raise ValueError(f"written CLIP does not load in open_clip: {e}") from e
    loaded = model.state_dict()
    differ = [k for k, t in state.items() if not torch.equal(loaded[k], t.to(loaded[k].dtype))]
    if differ:
        raise ValueError(f"written CLIP loads with different values for {differ}")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name} (expected {what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _read_hf_folder(folder: Path, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of a transformers model folder; safetensors preferred over .bin."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (expected {what})")
    config = _read_json(folder / "config.json", f"a transformers {what} folder")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return config, load_state_dict(folder / name)
    raise UserError(f"{folder}: no model.safetensors or pytorch_model.bin ({what} weights)")


def convert_hf_clip(
    text_dir: Path, vision_dir: Path | None, out_dir: Path, feature_extractor_dir: Path | None = None
) -> dict:
    """Karlo's text_encoder/ (+ image_encoder/, feature_extractor/) -> open_clip local-dir folder; returns model_cfg."""
    text_config, text_state = _read_hf_folder(text_dir, "CLIPTextModelWithProjection")
    vision_config, vision_state = None, None
    if vision_dir is not None:
        vision_config, vision_state = _read_hf_folder(vision_dir, "CLIPVisionModelWithProjection")
    projection_dim = text_config.get("projection_dim", _TEXT_DEFAULTS["projection_dim"])
    model_cfg = open_clip_config_from_hf(text_config, vision_config, projection_dim)
    pp_config = None
    if feature_extractor_dir is not None:
        pp_config = _read_json(Path(feature_extractor_dir) / "preprocessor_config.json", "a CLIPImageProcessor config")
    image_size = None if vision_config is None else model_cfg["vision_cfg"]["image_size"]
    preprocess_cfg = preprocess_cfg_from_hf(pp_config, image_size)
    state = open_clip_state_from_hf(text_state, vision_state, model_cfg)
    write_open_clip_dir(out_dir, model_cfg, state, preprocess_cfg)
    return model_cfg
