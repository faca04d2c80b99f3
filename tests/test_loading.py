"""Loading a component: built on the meta device without random init, the weights read tensor by tensor
onto the device in the pipeline's precision, a config that does not fit its weights refused before any
large allocation (issue 24's loading, issue 25's config check)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unclip_cli.io import load_state_dict, read_safetensors_header, save_weights
from unclip_cli.models.configs import config_to_dict
from unclip_cli.models.prior import MASK_VALUE
from unclip_cli.modelset import ModelSet
from unclip_cli.modelset.components import CONFIG_TYPES, empty_component, no_init

COMPONENTS = ["prior", "prior-ar", "decoder", "upsampler-256"]


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("component", COMPONENTS)
def test_load_gives_the_file_s_tensors_without_drawing_random_numbers(tiny_set, component):
    ms = ModelSet.open(str(tiny_set))
    before = torch.random.get_rng_state()
    net = ms.load(component)
    assert torch.equal(torch.random.get_rng_state(), before), "loading ran a random init"
    stored = _stored(tiny_set / component)
    state = net.state_dict()
    assert state.keys() == stored.keys()
    assert all(torch.equal(state[k], stored[k]) for k in stored), component
    assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])
    assert not net.training and ms.load(component) is net  # cached


def test_causal_masks_are_materialized_after_a_meta_build(tiny_set):
    net = ModelSet.open(str(tiny_set)).load("prior")  # the AR prior makes its mask per call
    T = net.causal_mask.shape[0]
    assert torch.equal(net.causal_mask, torch.full((T, T), MASK_VALUE).triu_(1))


def test_no_init_restores_torch_init():
    saved = torch.nn.init.normal_
    with no_init():
        assert torch.nn.init.normal_ is not saved
        x = torch.zeros(4)
        torch.nn.init.normal_(x)
        assert torch.equal(x, torch.zeros(4))
    assert torch.nn.init.normal_ is saved


def test_reduced_precision_casts_learned_weights_only(tiny_set):
    ms = ModelSet.open(str(tiny_set))
    half = ms.load("prior-ar", "cpu", torch.bfloat16)
    full = ms.load("prior-ar", "cpu")
    assert half is not full and ms.load("prior-ar", "cpu", torch.bfloat16) is half
    for (name, p), q in zip(half.named_parameters(), full.parameters()):
        want = torch.bfloat16 if p.requires_grad else torch.float32  # data statistics (PCA, buckets) stay exact
        assert p.dtype == want, name
        assert torch.equal(p, q.to(want)), name
    assert half.kept == full.kept  # the kept count (a float) survives: 319 would not in bf16
    assert ms.load("clip", "cpu", torch.bfloat16) is ms.load("clip", "cpu")  # CLIP stays float32


def test_load_state_dict_reads_every_dtype(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
        "i64": torch.arange(7), "u8": torch.arange(9, dtype=torch.uint8), "b": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    }
    save_weights(tmp_path / "w.safetensors", tensors, {"k": "v"})
    back = load_state_dict(tmp_path / "w.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    cast = load_state_dict(tmp_path / "w.safetensors", dtype=torch.bfloat16)
    assert cast["f32"].dtype == torch.bfloat16 and cast["i64"].dtype == torch.int64 and cast["b"].dtype == torch.bool
    some = load_state_dict(tmp_path / "w.safetensors", dtype={"f16": torch.float32})
    assert some["f16"].dtype == torch.float32 and some["f32"].dtype == torch.float32 and some["bf16"].dtype == torch.bfloat16


def _typed(data: dict):
    from unclip_cli.models.configs import config_from_dict

    return config_from_dict(CONFIG_TYPES["decoder"], data)


def _write_decoder(folder: Path, cfg, state: dict[str, torch.Tensor] | None = None) -> None:
    """config.json and weights (the config also in their metadata, as save_component writes it)."""
    if state is None:
        g = torch.Generator().manual_seed(0)
        state = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in empty_component("decoder", cfg).state_dict().items()}
    cfg_json = json.dumps(config_to_dict(cfg))
    (folder / "config.json").write_text(cfg_json)
    save_weights(folder / "model.safetensors", state, {"component": "decoder", "config": cfg_json})


PROBE = """
import json, sys, time
from unclip_cli.errors import UserError
from unclip_cli.modelset import ModelSet

def status(key):  # KiB
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key))

ms, component = ModelSet.open(sys.argv[1]), sys.argv[2]
ms.load_config(component)
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := RSS now (ru_maxrss would hold the forking parent's)
base, t = status("VmRSS"), time.perf_counter()
try:
    ms.load(component)
    error = None
except UserError as e:
    error = str(e)
seconds = time.perf_counter() - t
grown = status("VmHWM") - base
print(json.dumps({"error": error, "seconds": seconds, "grown_mib": grown / 1024, "dynamo": "torch._dynamo" in sys.modules}))
"""


def _probe(model: Path, component: str = "decoder") -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, str(model), component], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_config_far_larger_than_its_weights_is_refused_before_allocating(cli, tiny_set, tmp_path):
    """Karlo's decoder (0.9 B parameters, 3.6 GB in float32) over the tiny set's weights, the config also
    in the weights' metadata (which used to skip the shape check): one line, no traceback, in well under
    the time and memory that building it would take."""
    model = tmp_path / "huge"
    shutil.copytree(tiny_set, model)
    data = json.loads((model / "decoder" / "config.json").read_text())
    data["unet"].update(channels=[320, 640, 960, 1280], layers_per_block=3, attention=[False, True, True, True],
                        head_dim=64, context_dim=1536, time_embed_dim=1280)
    cfg = _typed(data)
    _write_decoder(model / "decoder", cfg, _stored(tiny_set / "decoder"))
    assert json.loads(read_safetensors_header(model / "decoder" / "model.safetensors")["__metadata__"]["config"]) == data
    found = _probe(model)
    assert found["error"] and "weights do not fit its config" in found["error"], found
    assert found["seconds"] < 1.0 and found["grown_mib"] < 100 and not found["dynamo"], found
    run = cli("decode", "-q", "-o", tmp_path / "x.png", "--model", model, "-", stdin=_embedding(tiny_set))
    assert run.code == 1 and run.err.count("\n") == 1 and "weights do not fit" in run.err, run
    assert not (tmp_path / "x.png").exists()


def test_an_ar_prior_config_of_a_huge_embedding_is_refused_before_allocating(tiny_set, tmp_path):
    """The AR prior's longest sequence is L + 2 + embed_dim tokens: with embed_dim 40,000 its causal mask
    alone would be 6.4 GB if it were built with the network (it is made per call, at the call's length)."""
    model = tmp_path / "huge-ar"
    shutil.copytree(tiny_set, model)
    path = model / "prior-ar" / "config.json"
    data = json.loads(path.read_text())
    data["embed_dim"] = 40000
    path.write_text(json.dumps(data))
    found = _probe(model, "prior-ar")
    assert found["error"] and "weights do not fit its config" in found["error"], found
    assert found["seconds"] < 1.0 and found["grown_mib"] < 100 and not found["dynamo"], found


def _embedding(tiny_set: Path) -> bytes:
    import io

    import numpy as np

    dim = json.loads((tiny_set / "model.json").read_text())["clip"]["embed_dim"]
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).standard_normal((1, dim)).astype(np.float32))
    return buf.getvalue()


def test_load_peak_memory_stays_near_the_weights_size(tiny_set, tmp_path):
    """A decoder of ~40 MB: the load's peak RSS growth (fresh process) within 1.2x the weights file
    (the old load held the file's bytes, the parsed tensors and a random init: about 3x)."""
    model = tmp_path / "mid"
    shutil.copytree(tiny_set, model)
    data = json.loads((model / "decoder" / "config.json").read_text())
    data["unet"].update(channels=[64, 128, 256, 320], layers_per_block=2, attention=[False, True, True, True])
    _write_decoder(model / "decoder", _typed(data))
    size_mib = os.path.getsize(model / "decoder" / "model.safetensors") / 2**20
    assert size_mib > 30
    found = _probe(model)
    assert found["error"] is None, found
    assert found["grown_mib"] < 1.2 * size_mib, (found, size_mib)
