"""`unclip model import` on diffusers-format Karlo snapshots, and parity with diffusers' pipelines.

Tiny random snapshots are built with diffusers / transformers (tests/helpers_karlo.py), saved with
`save_pretrained` as the public `kakaobrain/karlo-v1-alpha(-image-variations)` folders are, and
imported through the CLI. Then, CPU fp32:
  - every network on identical inputs: max abs difference <= 1e-5;
  - `unclip generate` against `UnCLIPPipeline` (one prompt, and a batch of 2) and
    `unclip encode-image | unclip decode | unclip upsample` against `UnCLIPImageVariationPipeline`,
    same seed: >= 99.9% identical uint8 values and none off by more than 1.
diffusers and transformers are test-only references.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
from diffusers import UnCLIPPipeline  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from helpers_karlo import CONFIGS, build_components, text_to_image_pipeline, variation_pipeline  # noqa: E402
from unclip_cli.io import split_pngs  # noqa: E402
from unclip_cli.modelset import ModelSet  # noqa: E402

TOL = 1e-5
STEPS = {"prior": 5, "decoder": 3, "super_res": 3}  # few steps, passed explicitly to both sides
PROMPTS = ["a red circle on a blue background", "two green squares, digital art"]
ORDINARY_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A corgi wearing a red bowtie and a purple party hat",
    "an oil painting of a fox in the snow, by Claude Monet",
    "Teddy bears working on new AI research underwater with 1990s technology",
    "3D render of a cute tropical fish in an aquarium on a dark blue background",
    "panda mad scientist mixing sparkling chemicals, artstation",
    "it's 12:30 -- isn't it? (yes); \"quoted\" #tag @name 50% off",
    "ÉCOLE café naïve façade",
    "",
    " ".join(["horse"] * 90),  # truncated to 77 tokens, EOT kept
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unclip-test: network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module", params=list(CONFIGS))
def karlo(request, tmp_path_factory):
    """Both snapshots of one configuration: the pipelines, saved and imported.

    The references are the pipeline objects that were saved. (One loaded back with `from_pretrained`
    keeps its weights in the memory-mapped file, at addresses that are not 64-byte aligned, and
    oneDNN then picks other convolution kernels: its own images differ from the saved pipeline's
    in the last bits, and so in a few pixels.)
    """
    from typer.testing import CliRunner

    from unclip_cli.cli import app

    name = request.param
    tmp = tmp_path_factory.mktemp(f"karlo-{name}")
    comps = build_components(CONFIGS[name], tmp)
    t2i, var = text_to_image_pipeline(comps), variation_pipeline(comps)
    t2i.save_pretrained(tmp / "snap-t2i")
    var.save_pretrained(tmp / "snap-var")
    for kind in ("t2i", "var"):
        result = CliRunner().invoke(app, ["model", "import", str(tmp / f"snap-{kind}"), "-o", str(tmp / f"set-{kind}")])
        assert result.exit_code == 0, (result.stderr, result.exception)
    for pipe in (t2i, var):
        pipe.set_progress_bar_config(disable=True)
    return SimpleNamespace(
        name=name, tmp=tmp, comps=comps, t2i=t2i, var=var,
        snap_t2i=tmp / "snap-t2i", snap_var=tmp / "snap-var", set_t2i=tmp / "set-t2i", set_var=tmp / "set-var",
    )


def _pixels(data: bytes) -> np.ndarray:
    """PNG bytes (one or several back to back) -> (B, H, W, 3) uint8."""
    return np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in split_pngs(data, "out")])


def _reference_pixels(images: np.ndarray) -> np.ndarray:
    """The pipeline's output_type="np" images -> uint8 as its PIL output (numpy_to_pil)."""
    return (images * 255).round().astype(np.uint8)


def _check_pixels(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    identical, worst = float((diff == 0).mean()), int(diff.max())
    unsaturated = float(((ref > 0) & (ref < 255)).mean())
    print(f"{what}: {100 * identical:.4f}% identical uint8 values, max difference {worst} "
          f"({ours.shape[0]}x{ours.shape[1]}x{ours.shape[2]}, {100 * unsaturated:.0f}% unsaturated)")
    assert unsaturated > 0.3  # random networks saturate; the comparison must not be between clamped values
    assert identical >= 0.999 and worst <= 1, f"{what}: {identical:.5f} identical, max difference {worst}"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------- the imported sets


def test_manifest_and_configs(karlo):
    t2i, var = ModelSet.open(str(karlo.set_t2i)), ModelSet.open(str(karlo.set_var))
    assert t2i.manifest["components"] == ["clip", "prior", "decoder", "upsampler-256"]
    assert var.manifest["components"] == ["clip", "decoder", "upsampler-256"]  # no prior in the variations snapshot
    assert t2i.manifest["sampling"] == {
        "prior": {"steps": 25, "guidance": 4.0}, "decoder": {"steps": 25, "guidance": 8.0}, "upsampler-256": {"steps": 7}
    }
    assert t2i.manifest["source"]["pipeline"] == "UnCLIPPipeline"
    assert var.manifest["source"]["pipeline"] == "UnCLIPImageVariationPipeline"
    assert t2i.manifest["clip"]["vision"] is False and var.manifest["clip"]["vision"] is True
    assert t2i.clip_dim == var.clip_dim == CONFIGS[karlo.name].D

    prior = t2i.load_config("prior").diffusion
    assert (prior.prediction, prior.variance, prior.clip_range, prior.num_timesteps) == ("x0", "fixed_small_log", 5.0, 1000)
    decoder = t2i.load_config("decoder")
    assert (decoder.diffusion.prediction, decoder.diffusion.variance, decoder.diffusion.clip_range) == (
        "eps", "learned_range", 1.0,
    )
    up = t2i.load_config("upsampler-256")
    assert (up.low_res, up.size, up.last is not None) == (64, 256, True)
    assert (up.diffusion.prediction, up.diffusion.variance) == ("eps", "fixed_small_log")
    assert decoder.num_extra_tokens == karlo.comps["text_proj"].clip_extra_context_tokens


@torch.no_grad()
def test_networks_match_diffusers(karlo):
    c = karlo.comps
    ms = ModelSet.open(str(karlo.set_t2i))
    D = CONFIGS[karlo.name].D
    g = torch.Generator().manual_seed(0)
    diffs = {}

    # CLIP text tower (open_clip) vs transformers' CLIPTextModelWithProjection
    clip = ms.load("clip")
    embed, hidden, mask = clip.encode_text(PROMPTS + [""])
    tok = c["tokenizer"](PROMPTS + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ref = c["text_encoder"](tok.input_ids)
    diffs["text_embed"] = _max_diff(embed, ref.text_embeds)
    diffs["text_hidden"] = _max_diff(hidden, ref.last_hidden_state)
    assert torch.equal(mask, tok.attention_mask.bool())

    # CLIP vision tower of the variations set vs CLIPVisionModelWithProjection (+ CLIPImageProcessor)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(3)]
    vclip = ModelSet.open(str(karlo.set_var)).load("clip")
    pixels = c["feature_extractor"](images=images, return_tensors="pt").pixel_values
    diffs["preprocess"] = _max_diff(vclip.preprocess(images), pixels)
    diffs["image_embed"] = _max_diff(vclip.encode_image(images), c["image_encoder"](pixels).image_embeds)

    # prior (normalized-space x0 prediction, and the mapping back)
    prior, B = ms.load("prior"), 3
    x_t, t = torch.randn(B, D, generator=g), torch.tensor([999, 500, 0])
    got = prior(x_t, t, embed[:B], hidden[:B], mask[:B])
    want = c["prior"](x_t, timestep=t, proj_embedding=embed[:B], encoder_hidden_states=hidden[:B],
                      attention_mask=mask[:B]).predicted_image_embedding
    diffs["prior"] = _max_diff(got, want)
    diffs["prior_denormalize"] = _max_diff(prior.denormalize(x_t), c["prior"].post_process_latents(x_t))

    # decoder: text_proj + UNet
    decoder = ms.load("decoder")
    image_embed = torch.randn(B, D, generator=g)
    cond = decoder.condition(image_embed, embed[:B], hidden[:B], mask[:B])
    context, emb_add = c["text_proj"](
        image_embeddings=image_embed, prompt_embeds=embed[:B], text_encoder_hidden_states=hidden[:B],
        do_classifier_free_guidance=False,
    )
    diffs["text_proj_context"] = _max_diff(cond.context, context)
    diffs["text_proj_emb"] = _max_diff(cond.emb_add, emb_add)
    x = torch.randn(B, 3, 64, 64, generator=g)
    n = c["text_proj"].clip_extra_context_tokens
    want = c["decoder"](x, t, encoder_hidden_states=context, class_labels=emb_add,
                        attention_mask=torch.nn.functional.pad(mask[:B], (n, 0), value=True)).sample
    diffs["decoder"] = _max_diff(decoder(x, t, cond), want)
    assert torch.equal(decoder.null_image_embed(1)[0], c["text_proj"].learned_classifier_free_guidance_embeddings)

    # super-res first / last
    up = ms.load("upsampler-256")
    x, low = torch.randn(1, 3, 256, 256, generator=g), torch.randn(1, 3, 256, 256, generator=g)
    for part, last, t in (("first", False, torch.tensor([999])), ("last", True, torch.tensor([0]))):
        want = c[f"super_res_{part}"](torch.cat([x, low], dim=1), t).sample
        diffs[f"super_res_{part}"] = _max_diff(up(x, t, low, last_step=last), want)

    print(f"[{karlo.name}] max abs differences: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs


# --------------------------------------------------------------------------- whole pipelines


def _generate(cli, karlo, prompts, seed):
    result = cli(
        "generate", *prompts, "--model", karlo.set_t2i, "--seed", seed, "--size", 256, "-q",
        "--prior-steps", STEPS["prior"], "--decoder-steps", STEPS["decoder"], "--upsampler-steps", STEPS["super_res"],
    )
    assert result.code == 0, result
    return _pixels(result.out)


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_matches_unclip_pipeline(cli, karlo, batch):
    prompts, seed = PROMPTS[:batch], 7 + batch
    ours = _generate(cli, karlo, prompts, seed)
    ref = karlo.t2i(
        prompts, prior_num_inference_steps=STEPS["prior"], decoder_num_inference_steps=STEPS["decoder"],
        super_res_num_inference_steps=STEPS["super_res"], generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images
    assert ours.shape == (batch, 256, 256, 3)
    _check_pixels(ours, _reference_pixels(ref), f"[{karlo.name}] generate, batch {batch}")
    if batch == 2:
        assert np.abs(ours[0].astype(int) - ours[1]).mean() > 10  # two prompts, two images


def test_variation_pipe_matches_image_variation_pipeline(cli, karlo, tmp_path):
    """encode-image | decode | upsample: the 64px PNG carries its exact values and the generator state."""
    rng = np.random.default_rng(3)
    sizes = [(45, 61), (80, 52)] if karlo.name == "deeper" else [(45, 61)]  # odd crops; a batch of 2 once
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(tmp_path / f"in-{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    seed = 5
    emb = cli("encode-image", *paths, "--model", karlo.set_var)
    assert emb.code == 0, emb
    small = cli("decode", "--model", karlo.set_var, "--seed", seed, "--steps", STEPS["decoder"], "-q", stdin=emb.out)
    assert small.code == 0, small
    big = cli("upsample", "--model", karlo.set_var, "--steps", STEPS["super_res"], "-q", stdin=small.out)
    assert big.code == 0, big
    images = [Image.open(p) for p in paths]
    ref = karlo.var(
        images if len(images) > 1 else images[0], decoder_num_inference_steps=STEPS["decoder"],
        super_res_num_inference_steps=STEPS["super_res"], generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images
    _check_pixels(_pixels(big.out), _reference_pixels(ref), f"[{karlo.name}] variations, batch {len(sizes)}")



# --------------------------------------------------------------------------- tokenizer


def test_prompt_ids_equal_the_snapshot_tokenizer(karlo):
    """Ordinary prompts: open_clip's ids and mask equal the CLIPTokenizer's (which pads with "!" = 0).
    Known differences (README): "!" itself, and HTML entities, which open_clip unescapes."""
    hf = CLIPTokenizer.from_pretrained(karlo.snap_t2i / "tokenizer", local_files_only=True)
    ids, mask = ModelSet.open(str(karlo.set_t2i)).load("clip").tokenize(ORDINARY_PROMPTS)
    ref = hf(ORDINARY_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids, ref.input_ids)
    assert torch.equal(mask, ref.attention_mask.bool())


# --------------------------------------------------------------------------- what an imported set refuses


def test_no_1024_upsampler_and_no_vision_tower(cli, karlo, tmp_path):
    Image.new("RGB", (256, 256), (10, 200, 30)).save(tmp_path / "mid.png")
    r = cli("upsample", tmp_path / "mid.png", "--model", karlo.set_t2i, "-o", tmp_path / "big.png")
    assert r.code == 1 and r.err.count("\n") == 1 and "Karlo has no 256->1024 upsampler" in r.err, r
    r = cli("encode-image", tmp_path / "mid.png", "--model", karlo.set_t2i, "-o", tmp_path / "e.safetensors")
    assert r.code == 1 and r.err.count("\n") == 1 and "no image encoder" in r.err, r
    r = cli("encode-text", "a cat", "--model", karlo.set_var, "-o", tmp_path / "t.safetensors")
    assert r.code == 0, r
    r = cli("prior", tmp_path / "t.safetensors", "--model", karlo.set_var, "-o", tmp_path / "p.safetensors")
    assert r.code == 1 and "no prior component" in r.err, r


# --------------------------------------------------------------------------- import errors and variants


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """The fast-test text-to-image snapshot only (for the error cases)."""
    tmp = tmp_path_factory.mktemp("karlo-fast")
    text_to_image_pipeline(build_components(CONFIGS["fast-test"], tmp)).save_pretrained(tmp / "snap")
    return tmp / "snap"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _fails(cli, snap, out, *extra) -> str:
    """Import fails with one error line (after progress lines), leaving no output and no temporary folder."""
    existed = Path(out).exists()
    r = cli("model", "import", snap, "-o", out, *extra)
    *progress, error = r.err.splitlines()
    assert r.code == 1 and error.startswith("unclip: error: ") and all(ln.startswith("unclip: ") for ln in progress), r
    assert existed or not Path(out).exists()
    assert not [p for p in Path(out).parent.iterdir() if p.name.startswith(f".{Path(out).name}.")]  # no temp folder
    return error


def test_import_refuses_what_is_not_a_snapshot(cli, fast, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a diffusers unCLIP snapshot: no model_index.json" in _fails(cli, empty, tmp_path / "a")
    snap = _copy(fast, tmp_path / "no-decoder")
    shutil.rmtree(snap / "decoder")
    err = _fails(cli, snap, tmp_path / "b")
    assert "not a diffusers unCLIP snapshot: no decoder/ (model_index.json says UnCLIPPipeline)" in err
    snap = _copy(fast, tmp_path / "other")
    index = json.loads((snap / "model_index.json").read_text())
    (snap / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    assert "model_index.json names 'StableDiffusionPipeline'" in _fails(cli, snap, tmp_path / "c")
    snap = _copy(fast, tmp_path / "no-weights")
    (snap / "prior" / "diffusion_pytorch_model.safetensors").unlink()
    assert "no diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin" in _fails(cli, snap, tmp_path / "d")
    snap = _copy(fast, tmp_path / "no-scheduler")
    (snap / "decoder_scheduler" / "scheduler_config.json").unlink()
    assert "no decoder_scheduler/scheduler_config.json" in _fails(cli, snap, tmp_path / "e")


def test_import_checks_every_tensor(cli, fast, tmp_path):
    from safetensors.torch import load_file, save_file

    snap = _copy(fast, tmp_path / "extra")
    f = snap / "prior" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(f), "extra.weight": torch.zeros(3)}, f)
    err = _fails(cli, snap, tmp_path / "a")
    assert "prior/" in err and "unused keys ['extra.weight']" in err
    snap = _copy(fast, tmp_path / "shape")
    f = snap / "super_res_last" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    state["conv_in.weight"] = state["conv_in.weight"][:, :3].contiguous()
    save_file(state, f)
    assert "super_res_last/" in (err := _fails(cli, snap, tmp_path / "b")) and "shape mismatch" in err
    snap = _copy(fast, tmp_path / "tokenizer")
    vocab = json.loads((snap / "tokenizer" / "vocab.json").read_text())
    vocab["hello</w>"], vocab["world</w>"] = vocab["world</w>"], vocab["hello</w>"]
    (snap / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    assert "not CLIP's BPE vocabulary" in _fails(cli, snap, tmp_path / "c")


def test_import_refuses_a_non_empty_output(cli, fast, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "exists and is not empty" in _fails(cli, fast, out)
    assert (out / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty-out"
    empty.mkdir()
    r = cli("model", "import", fast, "-o", empty)
    assert r.code == 0 and (empty / "model.json").is_file(), r
    assert "converting prior/" in r.err  # progress on stderr


def test_bin_snapshot_imports_the_same(cli, fast, tmp_path):
    """`.bin` weights (read with torch.load(weights_only=True)) give the same model set as safetensors."""
    from safetensors.torch import load_file

    pipe = UnCLIPPipeline.from_pretrained(fast, local_files_only=True)
    pipe.save_pretrained(tmp_path / "snap-bin", safe_serialization=False)
    assert (tmp_path / "snap-bin" / "prior" / "diffusion_pytorch_model.bin").is_file()
    assert not list((tmp_path / "snap-bin").rglob("*.safetensors"))
    for snap, out in ((fast, "a"), (tmp_path / "snap-bin", "b")):
        r = cli("model", "import", snap, "-o", tmp_path / out)
        assert r.code == 0, r
    a, b = ModelSet.open(str(tmp_path / "a")), ModelSet.open(str(tmp_path / "b"))
    assert a.clip_identity == b.clip_identity
    for component in ("prior", "decoder", "upsampler-256"):
        sa = load_file(tmp_path / "a" / component / "model.safetensors")
        sb = load_file(tmp_path / "b" / component / "model.safetensors")
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- --clip


def test_import_with_the_variation_sets_clip(cli, karlo, tiny_set, tmp_path):
    """The text-to-image snapshot with the variations set's CLIP: a vision tower, and one CLIP identity for
    both sets, so embeddings pass between them."""
    out = tmp_path / "t2i-with-vision"
    r = cli("model", "import", karlo.snap_t2i, "-o", out, "--clip", f"local-dir:{karlo.set_var / 'clip'}")
    assert r.code == 0, r
    ms, var = ModelSet.open(str(out)), ModelSet.open(str(karlo.set_var))
    assert ms.clip_identity == var.clip_identity and ms.manifest["clip"]["vision"] is True
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "img.png")
    emb = cli("encode-image", tmp_path / "img.png", "--model", karlo.set_var)
    assert emb.code == 0, emb
    r = cli("decode", "--model", out, "--steps", 2, "--seed", 1, "-q", "-o", tmp_path / "small.png", stdin=emb.out)
    assert r.code == 0, r

    err = _fails(cli, karlo.snap_t2i, tmp_path / "wrong", "--clip", tiny_set)  # another CLIP
    assert "differ from the snapshot's" in err


def test_init_with_a_local_open_clip(cli, karlo, tmp_path):
    out = tmp_path / "tiny-karlo-clip"
    r = cli("model", "init", "--preset", "tiny", "-o", out, "--clip", f"local-dir:{karlo.set_var / 'clip'}")
    assert r.code == 0, r
    ms = ModelSet.open(str(out))
    assert ms.clip_identity == ModelSet.open(str(karlo.set_var)).clip_identity
    assert ms.load_config("prior").embed_dim == ms.load_config("decoder").clip_embed_dim == CONFIGS[karlo.name].D
    assert ms.load("decoder") is not None and ms.load_config("prior").text_width == ms.manifest["clip"]["text_width"]
    text = cli("encode-text", "a red square", "--model", out)
    assert text.code == 0, text
    emb = cli("prior", "--model", out, "--steps", 2, "--seed", 0, "-q", stdin=text.out)
    assert emb.code == 0, emb
    r = cli("model", "init", "-o", tmp_path / "nope", "--clip", tmp_path)
    assert r.code == 1 and "not an open_clip local-dir folder" in r.err, r


def test_carried_values_are_used_only_while_they_match_the_pixels(tmp_path):
    """A PNG from `decode` carries its float image; once its pixels change, the pixels rule."""
    from unclip_cli.io import exact_images_to_tensor, images_to_tensor, png_bytes, read_images, tensor_to_images

    x = torch.rand(1, 3, 8, 8) * 2 - 1
    (img,) = tensor_to_images(x)
    edited = img.copy()
    edited.putpixel((0, 0), tuple(255 - v for v in img.getpixel((0, 0))))
    for name, pixels in (("same.png", img), ("edited.png", edited)):
        (tmp_path / name).write_bytes(png_bytes(pixels, {"image": x[0]}))
    (same,), (changed,) = ([im for im, _ in read_images([str(tmp_path / n)])] for n in ("same.png", "edited.png"))
    assert Image.open(tmp_path / "same.png").size == (8, 8)  # still an ordinary PNG
    assert torch.equal(exact_images_to_tensor([same])[0], x) and exact_images_to_tensor([same])[1]
    assert torch.equal(exact_images_to_tensor([changed])[0], images_to_tensor([edited]))
    assert not exact_images_to_tensor([changed])[1]
