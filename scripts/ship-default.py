"""Copy a trained model set into weights/ as the shipped default: weights, configs and manifest only.

    python scripts/ship-default.py TRAINED_DIR [--name shapes-small]
    python scripts/ship-default.py TRAINED_DIR --dest DIR   # keep a set in progress elsewhere

Training states, logs and embedding caches stay behind; weights/DEFAULT names the set. With --dest
the set goes to that folder instead and weights/DEFAULT is left alone (a set still in training, kept
so that a later session trains on from it, as the shipped set's phase 7 was; see its model card).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEP = {"model.json", "config.json", "model.safetensors", "open_clip_config.json", "open_clip_model.safetensors"}
LIMIT = 16 * 2**20  # per file (the brief's limit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trained")
    ap.add_argument("--name", default="shapes-small")
    ap.add_argument("--dest", help="copy to this folder instead of weights/NAME; weights/DEFAULT is not changed")
    args = ap.parse_args()
    src = Path(args.trained)
    dst = Path(args.dest) if args.dest else ROOT / "weights" / args.name
    if not (src / "model.json").is_file():
        raise SystemExit(f"error: {src}: not a model set (no model.json)")
    card = (dst / "README.md").read_text() if (dst / "README.md").is_file() else None
    extras = {p.name: p.read_bytes() for p in dst.glob("*.png")} if dst.is_dir() else {}
    if dst.exists():
        if any(dst.iterdir()) and not (dst / "model.json").is_file():
            raise SystemExit(f"error: {dst}: exists and is not a model set; not replacing it")
        shutil.rmtree(dst)
    total = 0
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.name in KEEP:
            out = dst / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
            size = out.stat().st_size
            assert size <= LIMIT, f"{out}: {size} bytes is over 16 MiB"
            total += size
            print(f"{size / 2**20:7.2f} MiB  {out}")
    if card is not None:
        (dst / "README.md").write_text(card)
    for name, data in extras.items():
        (dst / name).write_bytes(data)
    if not args.dest:
        (ROOT / "weights" / "DEFAULT").write_text(args.name + "\n")
    print(f"{total / 2**20:7.2f} MiB  in all")


if __name__ == "__main__":
    main()
