"""transformers CLIP (Karlo's text_encoder/ + image_encoder/) -> open_clip local-dir: same outputs as transformers.

transformers is the reference here (test-only import). Tiny random towers, CPU fp32.
"""

from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from unclip_cli.convert import diffusers_clip as dc
from unclip_cli.convert.diffusers_clip import (
    CONFIG_NAME,
    PLACEHOLDER_VISION_CFG,
    WEIGHTS_NAME,
    convert_hf_clip,
    has_placeholder_vision,
    open_clip_config_from_hf,
    open_clip_state_from_hf,
    preprocess_cfg_from_hf,
    write_open_clip_dir,
)
from unclip_cli.errors import UserError
from unclip_cli.models.clip import ClipEncoder

TOL = 1e-5
PROMPTS = ["a photo of a cat", "", "an astronaut riding a horse on the moon, digital art " * 12]  # last one truncated
# Two variants: Karlo's (quick_gelu, current eos id, eps 1e-5) and another (erf gelu, legacy eos id 2 ->
# argmax pooling, a LayerNorm eps large enough that a dropped eps shows above TOL).
VARIANTS = {
    "karlo": {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "gelu-eps": {"hidden_act": "gelu", "layer_norm_eps": 0.1, "eos_token_id": 2},
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Jitter every parameter: HF initializes LayerNorms to (1, 0), which would hide a swapped weight/bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _hf_text(**overrides) -> CLIPTextModelWithProjection:
    # intermediate 37: a non-integer mlp_ratio (37/32), which open_clip expresses exactly
    cfg = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=24)
    cfg.update(max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
    torch.manual_seed(0)
    return _randomize(CLIPTextModelWithProjection(CLIPTextConfig(**{**cfg, **overrides})), 1)


def _hf_vision(**overrides) -> CLIPVisionModelWithProjection:
    # width 48 != text width 32, so a mixed-up tower cannot load
    cfg = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, projection_dim=24)
    cfg.update(image_size=32, patch_size=8, hidden_act="quick_gelu")
    torch.manual_seed(0)
    return _randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(**{**cfg, **overrides})), 2)


def _oc_text(model, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's token states after ln_final (B, L, W), straight from its modules."""
    x = model.token_embedding(ids) + model.positional_embedding  # (B, L, W)
    x = model.transformer(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


def _load(path):
    path = "local-dir:" + str(path)
    return open_clip.create_model(path, precision="fp32", pretrained_image=False, pretrained_text=False).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return open_clip.get_tokenizer("ViT-L-14")(PROMPTS)  # (3, 77): real CLIP BPE ids, pad 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_matches_transformers(tmp_path, ids, variant, safe):
    over = VARIANTS[variant]
    hf_text = _hf_text(**over)
    hf_vision = _hf_vision(**{k: v for k, v in over.items() if k != "eos_token_id"})
    hf_text.save_pretrained(tmp_path / "text_encoder", safe_serialization=safe)
    hf_vision.save_pretrained(tmp_path / "image_encoder", safe_serialization=safe)
    weights = "model.safetensors" if safe else "pytorch_model.bin"
    assert (tmp_path / "text_encoder" / weights).is_file()

    cfg = convert_hf_clip(tmp_path / "text_encoder", tmp_path / "image_encoder", tmp_path / "clip")
    assert cfg["quick_gelu"] == (over["hidden_act"] == "quick_gelu")
    model = _load(tmp_path / "clip")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_t = hf_text(input_ids=ids)
        ref_i = hf_vision(pixel_values=pixels).image_embeds
        embed = model.encode_text(ids, normalize=False)
        hidden = _oc_text(model, ids)
        image = model.encode_image(pixels, normalize=False)
    assert (embed - ref_t.text_embeds).abs().max() <= TOL
    assert (hidden - ref_t.last_hidden_state).abs().max() <= TOL
    assert (image - ref_i).abs().max() <= TOL
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))

    # the project's consumer gives the same text outputs from the folder
    enc = ClipEncoder.load(tmp_path / "clip")
    e, h, mask = enc.encode_text(PROMPTS)
    assert (e - ref_t.text_embeds).abs().max() <= TOL and (h - ref_t.last_hidden_state).abs().max() <= TOL
    assert not has_placeholder_vision(tmp_path / "clip")


def test_text_only_has_placeholder_vision(tmp_path, ids):
    hf_text = _hf_text()
    hf_text.save_pretrained(tmp_path / "text_encoder")
    cfg = convert_hf_clip(tmp_path / "text_encoder", None, tmp_path / "clip")
    assert cfg["vision_cfg"] == PLACEHOLDER_VISION_CFG
    assert has_placeholder_vision(tmp_path / "clip")
    assert json.loads((tmp_path / "clip" / CONFIG_NAME).read_text())["vision_placeholder"] is True

    model = _load(tmp_path / "clip")
    assert sum(p.numel() for p in model.visual.parameters()) == 34
    with torch.no_grad():
        ref = hf_text(input_ids=ids)
        assert (model.encode_text(ids) - ref.text_embeds).abs().max() <= TOL
        assert (_oc_text(model, ids) - ref.last_hidden_state).abs().max() <= TOL
        assert model.encode_image(torch.randn(2, 3, 1, 1)).abs().max() == 0  # a placeholder embeds nothing


def _states():
    text, vision = _hf_text(), _hf_vision()
    cfg = open_clip_config_from_hf(text.config.to_dict(), vision.config.to_dict(), 24)
    return dict(text.state_dict()), dict(vision.state_dict()), cfg


def test_state_rejects_extra_missing_and_misshapen_keys():
    text, vision, cfg = _states()
    assert len(open_clip_state_from_hf(text, vision, cfg)) == len(open_clip.CLIP(**cfg).state_dict())

    with pytest.raises(ValueError, match=r"unused keys \['text_model.extra.weight'\]"):
        open_clip_state_from_hf({**text, "text_model.extra.weight": torch.zeros(3)}, vision, cfg)
    missing = {k: v for k, v in vision.items() if k != "vision_model.post_layernorm.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['vision_model.post_layernorm.bias'\]"):
        open_clip_state_from_hf(text, missing, cfg)
    key = "text_model.encoder.layers.1.mlp.fc1.weight"
    expected = rf"{key} -> transformer.resblocks.1.mlp.c_fc.weight: \(38, 32\), expected \(37, 32\)"
    with pytest.raises(ValueError, match=expected):
        open_clip_state_from_hf({**text, key: torch.zeros(38, 32)}, vision, cfg)
    key = "text_model.encoder.layers.0.self_attn.k_proj.bias"
    with pytest.raises(ValueError, match="wrong shape"):
        open_clip_state_from_hf({**text, key: torch.zeros(31)}, vision, cfg)
    with pytest.raises(ValueError, match="vision weights and model_cfg disagree"):
        open_clip_state_from_hf(text, None, cfg)


def test_state_takes_logit_scale_from_source():
    text, vision, cfg = _states()
    state = open_clip_state_from_hf({**text, "logit_scale": torch.tensor(4.5)}, vision, cfg)
    assert state["logit_scale"].item() == 4.5


def test_config_rejects_unsupported_variants():
    text = _hf_text().config.to_dict()
    vision = _hf_vision().config.to_dict()
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        open_clip_config_from_hf({**text, "hidden_act": "relu"}, None, 24)
    with pytest.raises(ValueError, match="vision config: hidden_act='gelu'"):
        open_clip_config_from_hf(text, {**vision, "hidden_act": "gelu"}, 24)
    with pytest.raises(ValueError, match="text config: projection_dim=24, expected 32"):
        open_clip_config_from_hf(text, None, 32)
    with pytest.raises(ValueError, match="vision config: projection_dim=16"):
        open_clip_config_from_hf(text, {**vision, "projection_dim": 16}, 24)
    with pytest.raises(ValueError, match="vocab_size"):
        open_clip_config_from_hf({**text, "vocab_size": 1000}, None, 24)
    with pytest.raises(ValueError, match="intermediate_size=61"):  # int(7 * (61 / 7)) == 60
        odd = {**text, "hidden_size": 7, "num_attention_heads": 1, "intermediate_size": 61}
        open_clip_config_from_hf(odd, None, 24)
    with pytest.raises(ValueError, match="model_type='clip'"):
        open_clip_config_from_hf({**text, "model_type": "clip"}, None, 24)
    # fields save_pretrained leaves out take transformers' defaults
    assert open_clip_config_from_hf({"model_type": "clip_text_model"}, None, 512)["text_cfg"]["layers"] == 12


def test_config_pooling_and_eps():
    text = _hf_text().config.to_dict()
    assert open_clip_config_from_hf({**text, "eos_token_id": 2}, None, 24)["text_cfg"]["pool_type"] == "argmax"
    cfg = open_clip_config_from_hf(text, None, 24)["text_cfg"]
    assert (cfg["pool_type"], cfg["eos_id"], "norm_kwargs" in cfg) == ("eos", 49407, False)
    cfg = open_clip_config_from_hf({**text, "layer_norm_eps": 1e-6}, None, 24)["text_cfg"]
    assert cfg["norm_kwargs"] == {"eps": 1e-6}


def test_missing_files_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no config.json"):
        convert_hf_clip(tmp_path / "empty", None, tmp_path / "out")
    with pytest.raises(UserError, match="no such folder"):
        convert_hf_clip(tmp_path / "nowhere", None, tmp_path / "out")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(_hf_text().config.to_dict()))
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        convert_hf_clip(tmp_path / "empty", None, tmp_path / "out")
    _hf_text().save_pretrained(tmp_path / "text")
    with pytest.raises(UserError, match="no preprocessor_config.json"):
        convert_hf_clip(tmp_path / "text", None, tmp_path / "out", tmp_path / "empty")
    assert not (tmp_path / "out").exists()


def test_write_checks_before_replacing(tmp_path):
    text, vision, cfg = _states()
    state = open_clip_state_from_hf(text, vision, cfg)
    pp = preprocess_cfg_from_hf(None, 32)
    write_open_clip_dir(tmp_path / "clip", cfg, state, pp)
    before = (tmp_path / "clip" / WEIGHTS_NAME).read_bytes()
    bad = {k: v for k, v in state.items() if k != "ln_final.bias"}
    with pytest.raises(ValueError, match="does not load in open_clip"):
        write_open_clip_dir(tmp_path / "clip", cfg, bad, pp)
    assert (tmp_path / "clip" / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]  # no temporary folder left behind


def test_write_compares_values_after_loading(tmp_path, monkeypatch):
    text, vision, cfg = _states()
    state = open_clip_state_from_hf(text, vision, cfg)
    real_save = dc.save_weights

    def save_other(path, st, meta):  # what reaches the disk is not what was asked for
        real_save(path, {**st, "logit_scale": st["logit_scale"] + 1}, meta)

    monkeypatch.setattr(dc, "save_weights", save_other)
    with pytest.raises(ValueError, match=r"different values for \['logit_scale'\]"):
        write_open_clip_dir(tmp_path / "clip", cfg, state, preprocess_cfg_from_hf(None, 32))
    assert not (tmp_path / "clip" / WEIGHTS_NAME).exists()


def test_preprocess_cfg_from_image_processor():
    assert preprocess_cfg_from_hf(None, 224) == {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "size": 224,
    }
    old_style = {"size": 224, "crop_size": 224, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    pp = preprocess_cfg_from_hf(old_style, 224)
    assert (pp["interpolation"], pp["mean"], pp["std"]) == ("bilinear", [0.5] * 3, [0.25] * 3)
    assert preprocess_cfg_from_hf({"do_normalize": False}, None)["std"] == [1.0] * 3
    with pytest.raises(ValueError, match="size=256 and crop_size=224"):
        preprocess_cfg_from_hf({"size": 256, "crop_size": 224}, 224)
    with pytest.raises(ValueError, match="do_center_crop=False"):
        preprocess_cfg_from_hf({"do_center_crop": False}, 224)
    assert preprocess_cfg_from_hf(None, 32)["size"] == 32
    with pytest.raises(ValueError, match="the vision tower takes 32px"):
        preprocess_cfg_from_hf({}, 32)
    with pytest.raises(ValueError, match="resample=0"):
        preprocess_cfg_from_hf({"resample": 0}, 224)


# (w, h) after which both crops start at the same pixel; see the report on odd crop offsets
@pytest.mark.parametrize("size", [(32, 32), (100, 70), (33, 48), (64, 41)])
def test_image_processor_pixels_match_clip_encoder(tmp_path, size):
    """A non-default processor (bilinear, own mean/std) gives the pixels ClipEncoder computes from the folder."""
    _hf_text().save_pretrained(tmp_path / "text_encoder")
    _hf_vision().save_pretrained(tmp_path / "image_encoder")
    proc = CLIPImageProcessor(size=32, crop_size=32, resample=2, image_mean=[0.3, 0.5, 0.7], image_std=[0.2, 0.3, 0.4])
    proc.save_pretrained(tmp_path / "feature_extractor")
    convert_hf_clip(
        tmp_path / "text_encoder", tmp_path / "image_encoder", tmp_path / "clip", tmp_path / "feature_extractor"
    )
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref = proc(images=[img], return_tensors="pt").pixel_values
    assert (ClipEncoder.load(tmp_path / "clip").preprocess([img]) - ref).abs().max() <= 1e-5
