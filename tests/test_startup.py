"""Start-up: which modules the stage commands import (not how long they take: scripts/bench_startup.py
measures that). open_clip's package imports torchvision and torch._dynamo, about as much start-up as
`import torch` itself; the commands build CLIP's towers without it where the config allows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_png

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "shapes-small"
# packages no stage command on a standard model set needs at start-up
HEAVY = ("open_clip", "torchvision", "torch._dynamo", "transformers", "diffusers", "timm",
         "unclip_cli.train", "unclip_cli.convert", "unclip_cli.evaluate")


def _imports(tmp_path: Path, *args: str) -> set[str]:
    """The modules `python -m unclip_cli ARGS` imports (from `-X importtime`), after checking it succeeds."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "unclip_cli", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.splitlines()
    assert done.returncode == 0, "\n".join(ln for ln in lines if not ln.startswith("import time:"))[-2000:]
    return {ln.split("|")[2].strip() for ln in lines if ln.startswith("import time:") and ln.count("|") == 2}


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("command", [
    ["encode-text", "a red star on a blue background", "-o", "t.safetensors"],
    ["encode-image", "in.png", "-o", "i.safetensors"],
    ["info", "in.png"],
], ids=lambda c: c[0])
def test_shipped_set_commands_import_no_heavy_package(tmp_path, command):
    write_png(tmp_path / "in.png", (80, 60))
    modules = _imports(tmp_path, *command, "--model", str(SHIPPED)) if command[0] != "info" else _imports(tmp_path, *command)
    assert "torch" in modules and "unclip_cli.cli" in modules  # the list is real
    assert _heavy(modules) == []


def test_image_side_sampling_imports_no_heavy_package(tmp_path, tiny_set):
    """vary: CLIP's image tower, inversion and the decoder, on a tiny set with a standard CLIP."""
    write_png(tmp_path / "in.png", (64, 64))
    modules = _imports(tmp_path, "vary", "in.png", "-n", "1", "--steps", "2", "--refine", "0", "--seed", "0", "-q",
                       "-o", "v.png", "--model", str(tiny_set))
    assert "unclip_cli.models.clip_vision" in modules and "unclip_cli.stages.manipulate" in modules
    assert _heavy(modules) == []


@pytest.mark.parametrize("command", ["encode-image", "encode-text"])
def test_other_vision_towers_load_open_clip_for_images_only(tmp_path, tiny_set, command):
    """The check can fail: a vision tower clip_vision.py does not build (average pooling) brings
    open_clip in to encode images, while the text still needs none of it."""
    model = tmp_path / "set"
    shutil.copytree(tiny_set, model)
    path = model / "clip" / "open_clip_config.json"
    config = json.loads(path.read_text())
    config["model_cfg"]["vision_cfg"]["pool_type"] = "avg"
    path.write_text(json.dumps(config))
    write_png(tmp_path / "in.png", (64, 64))
    source = "in.png" if command == "encode-image" else "a red star"
    modules = _imports(tmp_path, command, source, "-o", "e.safetensors", "--model", str(model))
    if command == "encode-image":
        assert "open_clip" in _heavy(modules) and "torchvision" in _heavy(modules)
    else:
        assert _heavy(modules) == []
