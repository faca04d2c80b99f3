"""CLIP over open_clip: the local-dir round trip, text outputs against open_clip's own forward,
the EOT mask, image preprocessing against open_clip's transform, and tokenizer parity with the
transformers CLIPTokenizer that Karlo ships (built here from open_clip's own BPE file)."""

from __future__ import annotations

import gzip
import json
import socket

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from unclip_cli.errors import UserError
from unclip_cli.models.clip import (
    DEFAULT_PREPROCESS_CFG,
    ClipEncoder,
    write_clip_dir,
)
from unclip_cli.models.configs import TINY_CLIP_CONFIG

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A corgi wearing a red bowtie and a purple party hat",
    "an oil painting of a fox in the snow, by Claude Monet",
    "two cats sleeping on a sofa.",
    "Teddy bears working on new AI research underwater with 1990s technology",
    "a bowl of soup that looks like a monster, knitted out of wool",
    "3D render of a cute tropical fish in an aquarium on a dark blue background",
    "panda mad scientist mixing sparkling chemicals, artstation",
    "an armchair in the shape of an avocado",
    "hello world! it's 12:30 -- isn't it?",
    "",
]
NO_NET = "unclip-test: network access attempted"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(NO_NET)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    write_clip_dir(d, TINY_CLIP_CONFIG, seed=0)
    return d


@pytest.fixture(scope="module")
def enc(clip_dir):
    return ClipEncoder.load(clip_dir)


def _images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)),  # portrait
        Image.fromarray(rng.integers(0, 256, (37, 83, 3), dtype=np.uint8)),  # landscape, odd crop
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),  # already the right size
        Image.fromarray(rng.integers(0, 256, (20, 25), dtype=np.uint8)).convert("L"),  # grey, upscaled
    ]


# --------------------------------------------------------------------------- round trip


def test_layout_and_metadata(clip_dir):
    from safetensors import safe_open

    cfg = json.loads((clip_dir / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == TINY_CLIP_CONFIG
    assert cfg["preprocess_cfg"] == DEFAULT_PREPROCESS_CFG
    with safe_open(str(clip_dir / "open_clip_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["open_clip_config"]) == cfg


def test_dims(enc):
    assert (enc.embed_dim, enc.text_width, enc.context_length, enc.image_size) == (32, 48, 77, 32)
    assert enc.embed_dim != enc.text_width


def test_same_seed_same_model(clip_dir, tmp_path, enc):
    write_clip_dir(tmp_path / "a", TINY_CLIP_CONFIG, seed=0)
    write_clip_dir(tmp_path / "b", TINY_CLIP_CONFIG, seed=1)
    a, b = ClipEncoder.load(tmp_path / "a"), ClipEncoder.load(tmp_path / "b")
    sd0, sda, sdb = enc.model.state_dict(), a.model.state_dict(), b.model.state_dict()
    assert sd0.keys() == sda.keys()
    assert all(torch.equal(sd0[k], sda[k]) for k in sd0)
    assert not torch.equal(sd0["text_projection"], sdb["text_projection"])
    e0, h0, _ = enc.encode_text(PROMPTS[:3])
    ea, ha, _ = a.encode_text(PROMPTS[:3])
    eb, _, _ = b.encode_text(PROMPTS[:3])
    assert torch.equal(e0, ea) and torch.equal(h0, ha)
    assert not torch.allclose(e0, eb)


def test_seeding_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_clip_dir(tmp_path, TINY_CLIP_CONFIG, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_constant_inits_are_jittered(enc):
    m = enc.model
    assert not torch.allclose(m.ln_final.weight, torch.ones_like(m.ln_final.weight))
    assert m.ln_final.bias.abs().max() > 0
    assert m.transformer.resblocks[0].attn.in_proj_bias.abs().max() > 0


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="open_clip_config.json"):
        ClipEncoder.load(tmp_path)
    write_clip_dir(tmp_path, TINY_CLIP_CONFIG)
    (tmp_path / "open_clip_model.safetensors").unlink()
    with pytest.raises(UserError, match="weights missing"):
        ClipEncoder.load(tmp_path)


# --------------------------------------------------------------------------- text


def test_encode_text_shapes_and_dtype(enc):
    embed, hidden, mask = enc.encode_text(PROMPTS)
    B = len(PROMPTS)
    assert embed.shape == (B, 32) and hidden.shape == (B, 77, 48) and mask.shape == (B, 77)
    assert embed.dtype == hidden.dtype == torch.float32 and mask.dtype == torch.bool
    assert not torch.allclose(embed.norm(dim=-1), torch.ones(B), atol=1e-2)  # not L2-normalized


def test_text_embed_matches_open_clip(enc):
    ids, _ = enc.tokenize(PROMPTS)
    embed, _, _ = enc.encode_text(PROMPTS)
    ref = enc.model.encode_text(ids, normalize=False)
    torch.testing.assert_close(embed, ref, atol=1e-6, rtol=0)


def test_hidden_states_are_after_ln_final(enc):
    ids, _ = enc.tokenize(PROMPTS)
    embed, hidden, _ = enc.encode_text(PROMPTS)
    out = enc.model.forward_intermediates(
        text=ids, text_indices=1, normalize_intermediates=True, intermediates_only=True
    )
    ref = out["text_intermediates"][-1]  # ln_final(last block output), (B, L, W)
    torch.testing.assert_close(hidden, ref, atol=1e-6, rtol=0)
    # the embedding is the projected hidden state at the EOT position
    eot = ids.argmax(dim=1)
    pooled = hidden[torch.arange(len(PROMPTS)), eot]
    torch.testing.assert_close(embed, pooled @ enc.model.text_projection, atol=1e-6, rtol=0)


def test_batch_does_not_leak(enc):
    embed, hidden, _ = enc.encode_text(PROMPTS[:4])
    for i, p in enumerate(PROMPTS[:4]):
        e1, h1, _ = enc.encode_text([p])
        torch.testing.assert_close(e1[0], embed[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(h1[0], hidden[i], atol=1e-5, rtol=0)


def test_custom_text_clip(tmp_path):
    write_clip_dir(tmp_path, {**TINY_CLIP_CONFIG, "custom_text": True}, seed=3)
    enc = ClipEncoder.load(tmp_path)
    assert type(enc.model).__name__ == "CustomTextCLIP"
    assert (enc.embed_dim, enc.text_width) == (32, 48)
    ids, _ = enc.tokenize(PROMPTS)
    embed, hidden, _ = enc.encode_text(PROMPTS)
    torch.testing.assert_close(embed, enc.model.encode_text(ids, normalize=False), atol=1e-6, rtol=0)
    enc.model.text.output_tokens = True
    _, tokens = enc.model.text(ids)
    torch.testing.assert_close(hidden, tokens, atol=1e-6, rtol=0)


def test_unsupported_text_tower(tmp_path):
    cfg = {**TINY_CLIP_CONFIG, "custom_text": True}
    cfg["text_cfg"] = {**cfg["text_cfg"], "embed_cls": True}
    write_clip_dir(tmp_path, cfg)
    with pytest.raises(ValueError, match="class token"):
        ClipEncoder.load(tmp_path)


# --------------------------------------------------------------------------- mask


def test_mask_with_token_id_zero(enc):
    prompts = ["hello!", "wow !~ that's it", "!$"]
    ids, mask = enc.tokenize(prompts)
    assert ids.dtype == torch.long and ids.shape == (3, 77)
    assert 0 in ids[1, 1:6].tolist() and ids[2, 1].item() == 0  # "!" followed by punctuation is id 0
    eot = enc.tokenizer.eot_token_id
    for i in range(3):
        n = int((ids[i] == eot).nonzero()[0]) + 1  # tokens up to and including EOT
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert (ids[i, n:] == 0).all()  # padding
    assert ids[2, :3].tolist() == [enc.tokenizer.sot_token_id, 0, 259] and mask[2].sum() == 4
    _, _, mask2 = enc.encode_text(prompts)
    assert torch.equal(mask, mask2)


def test_truncation_keeps_eot(enc):
    long = " ".join(["cat"] * 100)
    ids, mask = enc.tokenize([long, "cat"])
    assert ids[0, -1].item() == enc.tokenizer.eot_token_id
    assert (ids[0, 1:-1] == ids[1, 1]).all()
    assert mask[0].all() and mask[1].sum() == 3


def test_load_tokenizer_matches_a_freshly_built_one():
    """load_tokenizer shares the tables of open_clip's module-level tokenizer where its options are
    the defaults; the result must tokenize exactly as a SimpleTokenizer built for the config, at the
    config's context length, and leave the shared one as it was."""
    from unclip_cli.models.clip_text import _open_clip_tokenizer_module, load_tokenizer

    module = _open_clip_tokenizer_module()
    prompts = PROMPTS + [" ".join(["cat"] * 40)]
    for length in (77, 16):
        ours = load_tokenizer({"context_length": length, "tokenizer_kwargs": {}})
        fresh = module.SimpleTokenizer(context_length=length)
        assert ours is not module._tokenizer and ours.context_length == length
        assert torch.equal(ours(prompts), fresh(prompts)) and ours(prompts).shape == (len(prompts), length)
    assert module._tokenizer.context_length == 77
    other = load_tokenizer({"context_length": 77, "tokenizer_kwargs": {"clean": "whitespace"}})
    assert other.bpe_ranks is not module._tokenizer.bpe_ranks  # other options: built afresh
    assert other("A Red Star").tolist() == module.SimpleTokenizer(clean="whitespace")("A Red Star").tolist()


# --------------------------------------------------------------------------- images


def test_preprocess_matches_transformers(enc):
    """Karlo's feature extractor (transformers' CLIPImageProcessor), to the last bit."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size=enc.image_size, crop_size=enc.image_size)
    images = [im.convert("RGB") for im in _images()]
    ours = enc.preprocess(images)
    assert ours.shape == (len(images), 3, 32, 32) and ours.dtype == torch.float32
    assert torch.equal(ours, proc(images=images, return_tensors="pt").pixel_values)


def test_preprocess_matches_open_clip_but_the_crop_rounding(enc):
    """open_clip's transform (torchvision CenterCrop) rounds the crop offset (w - s) / 2 half to even,
    CLIPImageProcessor floors it: the 83x37 image (resized to 71x32, offset 19.5) is cut one column
    further right there. Everything else agrees."""
    ref_tf = open_clip.image_transform(
        enc.image_size,
        is_train=False,
        mean=DEFAULT_PREPROCESS_CFG["mean"],
        std=DEFAULT_PREPROCESS_CFG["std"],
        interpolation="bicubic",
        resize_mode="shortest",
    )
    images = [im.convert("RGB") for im in _images()]
    ours = enc.preprocess(images)
    ref = torch.stack([ref_tf(im) for im in images])
    same = [0, 2, 3]
    torch.testing.assert_close(ours[same], ref[same], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[1, :, :, 1:], ref[1, :, :, :-1], atol=1e-6, rtol=0)
    assert not torch.allclose(ours[1], ref[1], atol=1e-3)


def test_encode_image_matches_open_clip(enc):
    images = _images()
    pixels = enc.preprocess(images)
    emb = enc.encode_image(images)
    assert emb.shape == (len(images), 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, enc.model.encode_image(pixels, normalize=False), atol=1e-6, rtol=0)
    assert not torch.allclose(emb.norm(dim=-1), torch.ones(len(images)), atol=1e-2)


# --------------------------------------------------------------------------- tokenizer parity


def _hf_clip_tokenizer(tmp_path):
    """transformers CLIPTokenizer from open_clip's BPE file, set up as Karlo's tokenizer (pad "!")."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    lines = lines[: 49152 - 256 - 2 + 1]  # header line (skipped by HF) + 48894 merges
    merges = [tuple(m.split()) for m in lines[1:]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("\n".join(lines))
    return CLIPTokenizer(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="!", model_max_length=77
    )


def test_tokenizer_parity_with_transformers(enc, tmp_path):
    hf = _hf_clip_tokenizer(tmp_path)
    prompts = [p for p in PROMPTS if "!" not in p] + ["wow ~$ that's it", " ".join(["cat"] * 100)]
    assert len(prompts) >= 11 and "" in prompts
    out = hf(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    ids, mask = enc.tokenize(prompts)
    assert torch.equal(ids, out.input_ids)
    assert torch.equal(mask, out.attention_mask.bool())


def test_known_exclamation_divergence_from_transformers(enc, tmp_path):
    """With pad_token "!" (Karlo, SD 2), transformers treats every "!" as the special pad token,
    id 0, and splits words at it; open_clip (like OpenAI's tokenizer) BPE-encodes it ("!</w>" = 256,
    "!!" = 748). diffusers/diffusers#4153. Our ids follow open_clip; the masks still agree."""
    hf = _hf_clip_tokenizer(tmp_path)
    prompts = ["hello!", "hello world! it's 12:30"]
    out = hf(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    ids, mask = enc.tokenize(prompts)
    assert ids[0, :4].tolist() == [49406, 3306, 256, 49407]
    assert out.input_ids[0, :4].tolist() == [49406, 3306, 0, 49407]
    assert torch.equal(ids == 256, (out.input_ids == 0) & out.attention_mask.bool())
    assert torch.equal(mask, out.attention_mask.bool())


# --------------------------------------------------------------------------- text tower without open_clip

LIGHT_CONFIGS = {
    "tiny": TINY_CLIP_CONFIG,
    "gelu": {**TINY_CLIP_CONFIG, "quick_gelu": False},
    "proj-bias-mlp2": {**TINY_CLIP_CONFIG, "text_cfg": {**TINY_CLIP_CONFIG["text_cfg"], "proj_bias": True, "mlp_ratio": 2.0}},
    "canonicalize": {**TINY_CLIP_CONFIG, "text_cfg": {**TINY_CLIP_CONFIG["text_cfg"], "tokenizer_kwargs": {"clean": "canonicalize"}}},
}


@pytest.mark.parametrize("name", sorted(LIGHT_CONFIGS))
def test_light_text_tower_is_bitwise_open_clip(tmp_path, name):
    from unclip_cli.models.clip_text import TextTower

    write_clip_dir(tmp_path, LIGHT_CONFIGS[name], seed=5)
    light = ClipEncoder.load(tmp_path)
    assert isinstance(light._text, TextTower) and light._model is None
    full = ClipEncoder.load(tmp_path)
    full.model  # noqa: B018 (builds open_clip's model, which then runs the text)
    assert isinstance(full._text, open_clip.CLIP)
    assert (light.embed_dim, light.text_width, light.context_length) == (full.embed_dim, full.text_width, full.context_length)
    ids = open_clip.get_tokenizer("local-dir:" + str(tmp_path))(PROMPTS)
    assert torch.equal(light.tokenize(PROMPTS)[0], ids)
    for a, b in zip(light.encode_text(PROMPTS), full.encode_text(PROMPTS)):
        assert torch.equal(a, b)
    torch.testing.assert_close(light.encode_text(PROMPTS)[0], full.model.encode_text(ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("change", [{"ls_init_value": 0.1}, {"pool_type": "last"}, {"no_causal_mask": True}])
def test_other_text_towers_use_open_clip(tmp_path, change):
    write_clip_dir(tmp_path, {**TINY_CLIP_CONFIG, "text_cfg": {**TINY_CLIP_CONFIG["text_cfg"], **change}}, seed=6)
    enc = ClipEncoder.load(tmp_path)
    assert enc._model is not None and enc._text is enc._model
    ids, _ = enc.tokenize(PROMPTS)
    torch.testing.assert_close(enc.encode_text(PROMPTS)[0], enc.model.encode_text(ids), atol=1e-6, rtol=0)


def test_light_tower_reads_only_text_tensors(tmp_path):
    """The text tower loads without the vision tensors; a missing text tensor makes it fall back, and
    the folder is then refused (naming the tensor) before anything is built."""
    from safetensors.torch import load_file, save_file

    from unclip_cli.models.clip_text import load_text_tower

    write_clip_dir(tmp_path, TINY_CLIP_CONFIG, seed=7)
    state = load_file(tmp_path / "open_clip_model.safetensors")
    assert load_text_tower(tmp_path, TINY_CLIP_CONFIG, torch.device("cpu")) is not None
    del state["ln_final.bias"]
    save_file(state, tmp_path / "open_clip_model.safetensors")
    assert load_text_tower(tmp_path, TINY_CLIP_CONFIG, torch.device("cpu")) is None
    with pytest.raises(UserError, match="missing .ln_final.bias"):
        ClipEncoder.load(tmp_path)
    state = {k: v for k, v in load_file(tmp_path / "open_clip_model.safetensors").items() if not k.startswith("visual.")}
    save_file({**state, "ln_final.bias": torch.zeros(48)}, tmp_path / "open_clip_model.safetensors")
    assert load_text_tower(tmp_path, TINY_CLIP_CONFIG, torch.device("cpu")) is not None


# --------------------------------------------------------------------------- vision tower without open_clip


def _vision(**change) -> dict:
    return {**TINY_CLIP_CONFIG, "vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], **change}}


LIGHT_VISION = {
    "tiny": TINY_CLIP_CONFIG,
    "gelu": {**TINY_CLIP_CONFIG, "quick_gelu": False},
    "mlp3-heads4-list-size": _vision(mlp_ratio=3.0, head_width=16, image_size=[40, 40], patch_size=5),
    "odd-size": _vision(image_size=36, patch_size=8, layers=1),  # open_clip's grid floors 36 / 8
}
PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25], "interpolation": "bilinear", "resize_mode": "squash"}


@pytest.mark.parametrize("name", sorted(LIGHT_VISION))
def test_light_vision_tower_matches_open_clip(tmp_path, name):
    from unclip_cli.models.clip_vision import VisionTower

    write_clip_dir(tmp_path, LIGHT_VISION[name], seed=8)
    light, full = ClipEncoder.load(tmp_path), ClipEncoder.load(tmp_path)
    emb = light.encode_image(_images())
    assert isinstance(light._vision, VisionTower) and light._model is None
    assert light.preprocess_cfg == open_clip.get_model_preprocess_cfg(full.model)
    assert torch.equal(emb, full.encode_image(_images()))  # the same forward over open_clip's modules
    ref = full.model.encode_image(full.preprocess(_images()), normalize=False)  # open_clip's own forward
    torch.testing.assert_close(emb, ref, atol=1e-6, rtol=0)
    assert emb.shape == (4, 32) and not torch.allclose(emb[0], emb[1])


def test_light_preprocess_settings_are_open_clips(tmp_path):
    write_clip_dir(tmp_path, TINY_CLIP_CONFIG, PREPROCESS, seed=9)
    light, full = ClipEncoder.load(tmp_path), ClipEncoder.load(tmp_path)
    assert light.preprocess_cfg == open_clip.get_model_preprocess_cfg(full.model)
    assert light.preprocess_cfg["interpolation"] == "bilinear" and light.image_size == 32
    images = [im.convert("RGB") for im in _images()]
    ref_tf = open_clip.image_transform(32, is_train=False, **{k: PREPROCESS[k] for k in ("mean", "std", "interpolation", "resize_mode")})
    torch.testing.assert_close(light.preprocess(images), torch.stack([ref_tf(im) for im in images]), atol=1e-6, rtol=0)
    torch.testing.assert_close(light.encode_image(images), full.model.encode_image(full.preprocess(images)), atol=1e-6, rtol=0)
    assert light._model is None


@pytest.mark.parametrize("change", [
    {"ls_init_value": 0.1}, {"pool_type": "avg"}, {"no_ln_pre": True}, {"final_ln_after_pool": True},
    {"layers": [1, 1, 1, 1], "width": 8, "head_width": 8},  # ModifiedResNet
])
def test_other_vision_towers_use_open_clip(tmp_path, change):
    write_clip_dir(tmp_path, _vision(**change), seed=10)
    enc = ClipEncoder.load(tmp_path)
    assert enc._model is None  # the text tower is still the light one
    emb = enc.encode_image(_images())
    assert enc._model is not None and enc._vision is None
    torch.testing.assert_close(emb, enc.model.encode_image(enc.preprocess(_images())), atol=1e-6, rtol=0)


@pytest.mark.parametrize("change", [
    {"vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "width": 96}},
    {"vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "layers": 3}},
    {"vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "image_size": 64}},
    {"text_cfg": {**TINY_CLIP_CONFIG["text_cfg"], "width": 64}},
    {"embed_dim": 16},
    # a config that would build ~40 GB of parameters: refused from the header, before any allocation
    {"text_cfg": {**TINY_CLIP_CONFIG["text_cfg"], "width": 16384, "layers": 12, "heads": 16}},
])
def test_config_that_does_not_fit_its_weights_is_refused(tmp_path, change):
    write_clip_dir(tmp_path, TINY_CLIP_CONFIG, seed=11)
    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    config["model_cfg"] = {**config["model_cfg"], **change}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"^{tmp_path}: weights do not fit its config: tensors") as e:
        ClipEncoder.load(tmp_path)
    assert "\n" not in str(e.value)


def test_empty_prompts_need_no_tokenizer_tables(clip_dir):
    from unclip_cli.models.clip_text import empty_prompt_ids, load_tokenizer, plain_text_config

    cfg = plain_text_config(TINY_CLIP_CONFIG)
    for L in (77, 2, 5):
        assert torch.equal(empty_prompt_ids(dict(cfg, context_length=L), 3), load_tokenizer(cfg)([""] * 3, context_length=L))
    assert empty_prompt_ids(dict(cfg, tokenizer_kwargs={"clean": "whitespace"}), 1) is None
    light, full = ClipEncoder.load(clip_dir), ClipEncoder.load(clip_dir)
    full.tokenizer  # noqa: B018 (built: tokenizes the empty prompt as any other)
    for a, b in zip(light.encode_text(["", ""]), full.encode_text(["", ""])):
        assert torch.equal(a, b)
    assert light._tokenizer is None
    light.encode_text(["", "a red star"])
    assert light._tokenizer is not None


def test_other_towers_that_do_not_fit_are_refused_before_building(tmp_path):
    """open_clip's own towers (layer scale here) are compared from its meta-device build: a config
    of ~7 billion parameters over tiny weights is refused in a moment, naming the folder."""
    cfg = {**TINY_CLIP_CONFIG, "text_cfg": {**TINY_CLIP_CONFIG["text_cfg"], "ls_init_value": 0.1}}
    write_clip_dir(tmp_path, cfg, seed=12)
    assert ClipEncoder.load(tmp_path)._model is not None  # fits: open_clip's model
    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"].update(width=16384, heads=16)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"^{tmp_path}: weights do not fit its config: tensors 32 of other shapes .*text_projection"):
        ClipEncoder.load(tmp_path)


def test_cli_refuses_a_set_whose_clip_config_does_not_fit(cli, tiny_set, tmp_path):
    import shutil

    model = tmp_path / "set"
    shutil.copytree(tiny_set, model)
    path = model / "clip" / "open_clip_config.json"
    config = json.loads(path.read_text())
    config["model_cfg"]["vision_cfg"]["layers"] += 1
    path.write_text(json.dumps(config))
    r = cli("encode-text", "a red star", "--model", model, "-o", tmp_path / "t.safetensors")
    assert r.code == 1 and not (tmp_path / "t.safetensors").exists()
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and f"{model / 'clip'}: weights do not fit its config" in lines[0], r
    assert "missing (visual.transformer.resblocks.2." in lines[0]
