"""Copy a model set with its decoder and upsamplers switched from eps to x0 prediction, weights kept.

    python scripts/switch-to-x0.py SRC_DIR DST_DIR

How the shipped set went from the first recipe (eps, as Karlo) to the small preset's x0 networks
without starting over: every weight carries over (the decoder's output convolution keeps its first
3 channels, dropping the learned-variance ones), the configs change to x0 prediction with the fixed
variance, and training then continues with `unclip train ... --no-resume` on the copy (a fresh
optimizer; the old networks are only a starting point). CLIP, the priors and model.json are copied.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

from unclip_cli.modelset import ModelSet, save_component

SWITCHED = ("decoder", "upsampler-256", "upsampler-1024")


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: switch-to-x0.py SRC_DIR DST_DIR")
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    if dst.exists():
        sys.exit(f"{dst} exists")
    ms = ModelSet.open(str(src))
    dst.mkdir(parents=True)
    shutil.copy(src / "model.json", dst / "model.json")
    skip = shutil.ignore_patterns("train-state.pt", "train.jsonl")
    for name in ("clip", "prior", "prior-ar"):
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, ignore=skip)
    for name in SWITCHED:
        cfg = ms.load_config(name)
        state = ms.load(name).state_dict()
        x0 = dataclasses.replace(cfg.diffusion, prediction="x0", variance="fixed_small_log")
        if name == "decoder":
            cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, out_channels=3), diffusion=x0)
            for key in ("unet.out_conv.weight", "unet.out_conv.bias"):
                state[key] = state[key][:3].clone()  # eps channels; the variance channels go
        else:
            cfg = dataclasses.replace(cfg, diffusion=x0)
        save_component(dst, name, cfg, state)
        ModelSet.open(str(dst)).load(name)  # loads strictly with the new config
        print(f"{name}: x0 prediction, fixed variance")


if __name__ == "__main__":
    main()
