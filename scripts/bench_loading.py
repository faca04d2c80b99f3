"""Load time and peak memory of one Karlo-size component, this tree against another (e.g. the commit
before the meta-device loading), side by side in alternating fresh processes.

    git worktree add /tmp/base 3e350f3~1
    python scripts/bench_loading.py [--old /tmp/base] [--scale karlo|wide|small] [--rounds 2] [--dtype float32|bfloat16]

The weights (Karlo v1 alpha's decoder: 0.9 B parameters, 3.6 GB in float32; `--scale small`: the
same layout, narrow) are random and written once, tensor by tensor, to a temporary folder deleted at
the end. Each round loads the decoder with `ModelSet.load` in a fresh process per tree and reports
its wall time and its peak RSS above the process's RSS just before the load (the kernel's VmHWM,
reset at that point: `ru_maxrss` would hold the peak of the process that started it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

KARLO_DECODER = {
    "unet": {
        "in_channels": 3, "out_channels": 6, "channels": [320, 640, 960, 1280], "layers_per_block": 3,
        "attention": [False, True, True, True], "mid_attention": True, "head_dim": 64, "context_dim": 1536,
        "time_embed_dim": 1280, "add_embed": True, "scale_shift": True, "num_groups": 32, "norm_eps": 1e-5,
        "sample_size": 64,
    },
    "clip_embed_dim": 768, "text_width": 768, "num_extra_tokens": 4,
    "diffusion": {"num_timesteps": 1000, "schedule": "cosine", "prediction": "eps", "variance": "learned_range"},
}

PROBE = """
import json, sys, time
import torch
from pathlib import Path
from unclip_cli.modelset import ModelSet

def status(key):  # KiB
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key))

ms = ModelSet(path=Path(sys.argv[1]), manifest={"name": "bench", "components": ["decoder"]})
ms.load_config("decoder")
dtype = getattr(torch, sys.argv[2])
open("/proc/self/clear_refs", "w").write("5")
base, t = status("VmRSS"), time.perf_counter()
try:
    net = ms.load("decoder", "cpu", dtype)
except TypeError:  # a tree without precision: load, then cast
    net = ms.load("decoder").to(dtype)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_mib": (status("VmHWM") - base) / 1024,
                  "params": sum(p.numel() for p in net.parameters())}))
"""


def write_weights(folder: Path, cfg: dict) -> int:
    """config.json + model.safetensors of random float32 tensors (std 0.02), written one tensor at a time."""
    import torch

    from unclip_cli.models.configs import config_from_dict, config_to_dict
    from unclip_cli.modelset.components import CONFIG_TYPES, empty_component

    typed = config_from_dict(CONFIG_TYPES["decoder"], cfg)
    shapes = {k: tuple(v.shape) for k, v in empty_component("decoder", typed).state_dict().items()}
    cfg_json = json.dumps(config_to_dict(typed))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(cfg_json)
    header, offset = {"__metadata__": {"component": "decoder", "config": cfg_json}}, 0
    for name, shape in shapes.items():
        size = 4 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(0)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            f.write((torch.randn(shape, generator=g) * 0.02).numpy().tobytes())
    return offset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="a checkout of the tree to compare with (git worktree add ...); none: this tree alone")
    ap.add_argument("--scale", choices=("karlo", "wide", "small"), default="karlo",
                    help="karlo: 0.9 B parameters; wide: Karlo's layout at 0.6x its widths (0.33 B, for a machine "
                         "without 11 GB free for the old load); small: 0.03 B")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16 (the old tree casts after loading)")
    a = ap.parse_args()
    cfg = json.loads(json.dumps(KARLO_DECODER))
    if a.scale == "wide":
        cfg["unet"].update(channels=[192, 384, 576, 768], context_dim=960, time_embed_dim=768)
    if a.scale == "small":
        cfg["unet"].update(channels=[64, 128, 192, 256], context_dim=64, time_embed_dim=128)
        cfg.update(clip_embed_dim=64, text_width=64)
    work = Path(tempfile.mkdtemp(prefix="bench-loading-"))
    try:
        nbytes = write_weights(work / "decoder", cfg)
        trees = {"old": Path(a.old).resolve()} if a.old else {}
        trees["new"] = Path(__file__).resolve().parents[1]
        results = {name: [] for name in trees}
        for _ in range(a.rounds):
            for name, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": str(tree)}
                proc = subprocess.run([sys.executable, "-c", PROBE, str(work), a.dtype], cwd=tree, env=env,
                                      capture_output=True, text=True, check=True)
                results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        params = results["new"][0]["params"]
        print(f"decoder ({a.scale}): {params / 1e9:.3f} B parameters, weights file {nbytes / 2**20:.0f} MiB (float32), "
              f"loaded as {a.dtype}, {a.rounds} alternating rounds, median")
        print(f"{'tree':<6}{'load s':>9}{'peak RSS MiB':>15}{'peak / file':>13}")
        med = {}
        for name, runs in results.items():
            secs = sorted(r["seconds"] for r in runs)[len(runs) // 2]
            peak = sorted(r["peak_mib"] for r in runs)[len(runs) // 2]
            med[name] = (secs, peak)
            print(f"{name:<6}{secs:>9.2f}{peak:>15.0f}{peak / (nbytes / 2**20):>13.2f}")
        if "old" in med:
            print(f"new / old: load time {med['new'][0] / med['old'][0]:.2f}x, peak RSS {med['new'][1] / med['old'][1]:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
