"""Bad input to the readers (issue 25): one `unclip: error:` line naming the culprit, no output, no
traceback; and fuzzed stage files, .npy, PNG carry chunks, manifests and configs: a UserError or a
success, never another exception, never a large allocation."""

from __future__ import annotations

import io
import json
import random
import resource
import shutil
import struct

import numpy as np
import pytest
import torch

from unclip_cli import io as uio
from unclip_cli.errors import UserError
from unclip_cli.modelset.components import read_component_config
from unclip_cli.modelset.manifest import read_manifest
from conftest import write_png
from test_cli import assert_user_error, ok

STAGE_META = {"format": uio.STAGE_FORMAT, "version": uio.STAGE_VERSION, "kind": "image"}


def stage(tensors: dict, kind: str = "image") -> bytes:
    return uio.safetensors_bytes(tensors, {**STAGE_META, "kind": kind})


def raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    head = json.dumps({"__metadata__": STAGE_META, **header}).encode()
    return struct.pack("<Q", len(head)) + head + data


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


E = torch.randn(1, 32)
STAGE_ROWS = {
    "entry not an object": (raw_safetensors({"image_embed": 5}), "image_embed"),
    "unknown dtype": (raw_safetensors({"image_embed": {"dtype": "F33", "shape": [1, 2], "data_offsets": [0, 8]}}, bytes(8)), "dtype"),
    "shape not sizes": (raw_safetensors({"image_embed": {"dtype": "F32", "shape": [1, -2], "data_offsets": [0, 8]}}, bytes(8)), "shape"),
    "offsets not a pair": (raw_safetensors({"image_embed": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0]}}, bytes(8)), "data_offsets"),
    "offsets vs dtype x numel": (raw_safetensors({"image_embed": {"dtype": "F32", "shape": [1, 3], "data_offsets": [0, 8]}}, bytes(8)), "data_offsets"),
    "offsets out of the file": (raw_safetensors({"image_embed": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}, bytes(8)), "truncated"),
    "metadata not str->str": (struct.pack("<Q", 30) + b'{"__metadata__": {"a": 1}}    ', "metadata"),
    "image_embed rank 3": (stage({"image_embed": torch.randn(1, 2, 32)}), "image_embed"),
    "empty batch": (stage({"image_embed": torch.zeros(0, 32)}), "empty"),
    "int image_embed": (stage({"image_embed": torch.ones(1, 32, dtype=torch.int64)}), "image_embed"),
    "widths disagree": (stage({"image_embed": E, "text_embed": torch.randn(1, 16)}), "text_embed"),
    "batches disagree": (stage({"image_embed": E, "text_embed": torch.randn(2, 32)}), "text_embed"),
    "mask not bool": (stage({"image_embed": E, "text_hidden": torch.randn(1, 77, 48), "text_mask": torch.ones(1, 77)}), "text_mask"),
    "NaN": (stage({"image_embed": torch.full((1, 32), float("nan"))}), "NaN"),
    "npy inf in float32": (npy(np.full((1, 32), 1e300)), "float32"),
    "npy complex": (npy(np.ones((1, 32), dtype=np.complex64)), "complex"),
    "npy rank 3": (npy(np.ones((1, 2, 32), dtype=np.float32)), "shape"),
    "npy zero size": (npy(np.ones((0, 32), dtype=np.float32)), "shape"),
    "npy shorter than its shape": (npy(np.ones((1, 32), dtype=np.float32)).replace(b"(1, 32)", b"(9, 32)"), "truncated"),
}


@pytest.mark.parametrize("row", STAGE_ROWS, ids=list(STAGE_ROWS))
def test_bad_stage_file_is_one_line(cli, tiny_set, tmp_path, row):
    data, mentions = STAGE_ROWS[row]
    out = tmp_path / "out.png"
    run = cli("decode", "--model", tiny_set, "-q", "--steps", "2", "-o", out, stdin=data)
    assert_user_error(run, mentions=mentions)
    assert "<stdin>" in run.err
    assert not out.exists()


def test_image_over_the_pixel_limit(cli, tiny_set, tmp_path):
    png = write_png(tmp_path / "in.png", (64, 64))
    out = tmp_path / "out.png"
    run = cli("upsample", "--model", tiny_set, "-q", png, "-o", out, env={"UNCLIP_MAX_PIXELS": "1000"})
    assert_user_error(run, mentions="UNCLIP_MAX_PIXELS")
    assert not out.exists()
    # a header claiming 30000 x 30000 is refused before decoding, at the default limit
    data = bytearray(png.read_bytes())
    data[16:24] = struct.pack(">II", 30000, 30000)
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    assert_user_error(cli("upsample", "--model", tiny_set, "-q", tmp_path / "bomb.png", "-o", out), mentions="bomb.png")
    assert not out.exists()


def test_damaged_carry_is_ignored(cli, tiny_set, tmp_path):
    small = ok(cli("decode", "--model", tiny_set, "-q", "--steps", "2", "--seed", "1", stdin=npy(np.ones((1, 32), np.float32)))).out
    img = uio.decode_image(small, "x")
    for carry in ({"image": torch.zeros(3, 5, 5)}, {"rng_state": torch.zeros(7, dtype=torch.uint8)}, {"image": torch.zeros(3, 64, 64, dtype=torch.float64)}):
        bad = uio.png_bytes(img, carry)
        assert uio.read_images([_file(tmp_path, bad)])[0][0].info.get(uio.CARRY_KEY) is None
        ok(cli("upsample", "--model", tiny_set, "-q", "--steps", "2", stdin=bad))


def _file(tmp_path, data: bytes) -> str:
    path = tmp_path / f"f{random.random()}.png"
    path.write_bytes(data)
    return str(path)


def _edit_set(tiny_set, tmp_path, edit) -> str:
    folder = tmp_path / "set"
    shutil.copytree(tiny_set, folder)
    edit(folder)
    return str(folder)


def _json_edit(rel: str, change):
    def edit(folder):
        path = folder / rel
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return edit


SET_ROWS = {
    "steps 1": (_json_edit("model.json", lambda m: m["sampling"].setdefault("decoder", {}).update(steps=1)), "sampling.decoder.steps"),
    "guidance a string": (_json_edit("model.json", lambda m: m["sampling"].setdefault("decoder", {}).update(guidance="x")), "guidance"),
    "embed_dim negative": (_json_edit("model.json", lambda m: m["clip"].update(embed_dim=-3)), "clip.embed_dim"),
    "unknown component": (_json_edit("model.json", lambda m: m["components"].append("vae")), "vae"),
    "config int as string": (_json_edit("decoder/config.json", lambda c: c.update(num_extra_tokens="4")), "num_extra_tokens"),
    "config unknown enum": (_json_edit("decoder/config.json", lambda c: c["diffusion"].update(prediction="v")), "prediction"),
    "config size 0": (_json_edit("decoder/config.json", lambda c: c["unet"].update(time_embed_dim=0)), "time_embed_dim"),
    "config not its weights": (_json_edit("decoder/config.json", lambda c: c["unet"].update(channels=[32, 4096])), "do not fit"),
    "config far bigger than its weights": (
        _json_edit("decoder/config.json", lambda c: c["unet"].update(channels=[8192, 8192], time_embed_dim=8192, context_dim=8192)),
        "do not fit",
    ),
}


@pytest.mark.parametrize("row", SET_ROWS, ids=list(SET_ROWS))
def test_bad_manifest_or_config_is_one_line(cli, tiny_set, tmp_path, row):
    edit, mentions = SET_ROWS[row]
    folder = _edit_set(tiny_set, tmp_path, edit)
    out = tmp_path / "out.png"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = cli("decode", "--model", folder, "-q", "--steps", "2", "-o", out, stdin=npy(np.ones((1, 32), np.float32)))
    assert_user_error(run, mentions=mentions)
    assert not out.exists()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB


# ---------------------------------------------------------------------- fuzzing


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.randrange(4)
    if op == 0:  # flip a few bytes, mostly in the header
        for _ in range(rng.randint(1, 4)):
            b[min(len(b) - 1, int(rng.expovariate(1 / 100)))] = rng.randrange(256)
    elif op == 1:
        del b[rng.randrange(len(b)) :]
    elif op == 2:
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    else:
        i = rng.randrange(min(len(b), 200))
        b[i : i + 8] = struct.pack("<Q", rng.choice([0, 1, 2**31, 2**63, len(b)]))
    return bytes(b)


WEIRD = [None, True, -1, 0, 1, 2**70, 1e308, float("nan"), "x", "", [], [1, "a"], {}, {"a": 1}, [[0]] * 3]


def _mutate_json(value, rng: random.Random):
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(list(value))
        return {**value, key: _mutate_json(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.7:
        i = rng.randrange(len(value))
        return [*value[:i], _mutate_json(value[i], rng), *value[i + 1 :]]
    return rng.choice(WEIRD)


def _survives(fn) -> None:
    try:
        fn()
    except UserError as e:
        assert "\n" not in str(e)


def test_fuzz_readers(tiny_set, tmp_path):
    rng = random.Random(25)
    text = uio.safetensors_bytes(
        {"text_embed": torch.randn(2, 32), "text_hidden": torch.randn(2, 4, 48), "text_mask": torch.ones(2, 4, dtype=torch.bool)},
        {**STAGE_META, "kind": "text"},
    )
    latent = stage({"image_embed": torch.randn(1, 32), "noise": torch.randn(1, 3, 8, 8)}, "latent")
    arr = npy(np.random.default_rng(0).standard_normal((2, 32)))
    img = uio.decode_image(uio.png_bytes(uio.tensor_to_images(torch.zeros(1, 3, 8, 8))[0]), "x")
    png = uio.png_bytes(img, {"image": torch.zeros(3, 8, 8), "rng_state": torch.Generator().get_state()})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(300):
        for data in (text, latent, arr):
            _survives(lambda: uio.parse_stage(_mutate(data, rng), "fuzz"))
        bad = _mutate(png, rng)
        _survives(lambda: [uio.decode_image(p, "fuzz") for p in uio.split_pngs(bad, "fuzz")])
        uio._png_carry(bad)  # damaged carry: None, never an exception
    folder = tmp_path / "set"
    shutil.copytree(tiny_set, folder)
    manifest = json.loads((folder / "model.json").read_text())
    config = json.loads((folder / "decoder" / "config.json").read_text())
    for i in range(200):
        (folder / "model.json").write_text(json.dumps(_mutate_json(manifest, rng)))
        _survives(lambda: read_manifest(folder))
        (folder / "decoder" / "config.json").write_text(json.dumps(_mutate_json(config, rng)))
        _survives(lambda: read_component_config(folder / "decoder", "decoder"))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB
