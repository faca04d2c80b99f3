#!/usr/bin/env python
"""Start-up of every stage command against a bare `python -c "import torch"`.

Each command runs with tiny work on a model set (default: the shipped one): two sampling steps
(the least), 64 px, one image. Runs alternate (import torch, command, import torch, next command...)
for --rounds rounds; the table gives each command's median time and its ratio to the median of
`import torch`, in wall time and in CPU time (user + system: steadier than wall time where other
processes share the CPUs). --importtime adds, per command, the packages it imports beyond torch's
and what they cost (self times from one `python -X importtime` run).

    python scripts/bench_startup.py [--model DIR] [--rounds 5] [--importtime] [--tree DIR]

--tree runs another checkout's `unclip_cli` (e.g. a `git worktree` of an older commit) for a
side-by-side comparison: give it once per tree; rows are then per tree.

--to-first-step times start-up proper: each command exits (os._exit) where its first sampling loop
(or DDIM inversion) would begin, after its imports, model loading and input reading, against
`import torch; os._exit(0)` (the same exit, without interpreter teardown); commands that do not
sample (encode-text, encode-image, info) run whole.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large red star on a blue background"
BASELINE = "import torch"
FIRST_STEP_BASELINE = "import torch, os; os._exit(0)"
# `python -c FIRST_STEP ARGS...`: the CLI, stopped where the first sampling loop would start
FIRST_STEP = """
import os, sys
from unclip_cli.diffusion import inversion, samplers
def _stop(*args, **kwargs):
    os._exit(0)
samplers.sample_ancestral = samplers.sample_ddim = inversion.ddim_invert_exact = _stop
from unclip_cli.cli import app
app(sys.argv[1:])
"""


def commands(work: Path) -> dict[str, list[str]]:
    """name -> arguments after `python -m unclip_cli`, reading the inputs that `prepare` made in `work`."""
    t, p, img, img2, out = (str(work / n) for n in ("t.safetensors", "p.safetensors", "a.png", "b.png", "out"))
    quick = ["--seed", "0", "-q"]
    return {
        "encode-text": ["encode-text", PROMPT, "-o", out + ".safetensors"],
        "encode-image": ["encode-image", img, "-o", out + ".safetensors"],
        "prior": ["prior", t, "--steps", "2", *quick, "-o", out + ".safetensors"],
        "decode": ["decode", p, "--steps", "2", *quick, "-o", out + ".png"],
        "upsample": ["upsample", img, "--steps", "2", *quick, "-o", out + ".png"],
        "generate": ["generate", PROMPT, "--size", "64", "--prior-steps", "2", "--decoder-steps", "2", *quick, "-o", out + ".png"],
        "interpolate": ["interpolate", img, img2, "--frames", "2", "--steps", "2", *quick, "-o", out + ".png"],
        "vary": ["vary", img, "-n", "1", "--steps", "2", "--refine", "0", *quick, "-o", out + ".png"],
        "invert": ["invert", img, "--steps", "2", "--refine", "0", "-q", "-o", out + ".safetensors"],
        "info": ["info", t],
    }


def _env(tree: Path, model: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(tree), UNCLIP_MODEL=model, UNCLIP_DEVICE="cpu")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(argv: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one run of `argv`."""
    cpu, start = _cpu(), time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(argv)}\n{done.stderr.strip()}")
    return seconds, _cpu() - cpu


def prepare(work: Path, tree: Path, model: str) -> None:
    """The commands' inputs: a prompt's text embedding, its prior output, two 64 px images."""
    env, py = _env(tree, model), [sys.executable, "-m", "unclip_cli"]
    steps = [
        ["encode-text", PROMPT, "-o", "t.safetensors"],
        ["prior", "t.safetensors", "--steps", "2", "--seed", "0", "-q", "-o", "p.safetensors"],
        ["decode", "p.safetensors", "--steps", "2", "--seed", "0", "-q", "-o", "a.png"],
        ["decode", "p.safetensors", "--steps", "2", "--seed", "1", "-q", "-o", "b.png"],
    ]
    for argv in steps:
        _run(py + argv, env, work)


def extra_imports(argv: list[str], env: dict, cwd: Path, top: int) -> list[tuple[float, str]]:
    """(ms, package) of the `top` costliest packages the command imports beyond `import torch`: the
    self times of its extra modules from `python -X importtime`, summed per package (torch's
    subpackages apart: torch._dynamo...)."""

    def imports(args: list[str]) -> dict[str, int]:
        done = subprocess.run([sys.executable, "-X", "importtime", *args], env=env, cwd=cwd, capture_output=True, text=True)
        found = {}
        for line in done.stderr.splitlines():
            parts = line.removeprefix("import time:").split("|")
            if len(parts) == 3 and parts[0].strip().isdigit():
                found[parts[2].strip()] = int(parts[0])
        return found

    base, cmd = imports(["-c", BASELINE]), imports(argv)
    groups: dict[str, float] = {}
    for name, us in cmd.items():
        if name not in base:
            parts = name.split(".")
            key = ".".join(parts[:2] if parts[0] in ("torch", "unclip_cli") else parts[:1])
            groups[key] = groups.get(key, 0.0) + us / 1000
    return sorted(((ms, k) for k, ms in groups.items()), reverse=True)[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "weights" / "shapes-small"), help="model-set folder")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="command names to run (default: all)")
    ap.add_argument("--tree", action="append", type=Path, help="checkout whose unclip_cli runs (default: this one)")
    ap.add_argument("--importtime", action="store_true", help="also list each command's imports beyond torch's")
    ap.add_argument("--to-first-step", action="store_true", help="stop each command where its first sampling loop starts")
    args = ap.parse_args()
    baseline = FIRST_STEP_BASELINE if args.to_first_step else BASELINE
    launch = ["-c", FIRST_STEP] if args.to_first_step else ["-m", "unclip_cli"]
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, trees[0], args.model)
        cmds = {k: v for k, v in commands(work).items() if not args.only or k in args.only}
        base: list[tuple[float, float]] = []
        times = {(tree, name): [] for tree in trees for name in cmds}
        for r in range(args.rounds):
            for name, argv in cmds.items():
                for tree in trees:
                    base.append(_run([sys.executable, "-c", baseline], _env(tree, args.model), work))
                    times[tree, name].append(_run([sys.executable, *launch, *argv], _env(tree, args.model), work))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        wall, cpu = (statistics.median(b[i] for b in base) for i in (0, 1))
        print(f"{'command':<14}{'tree':<12}{'wall s':>8}{'x torch':>9}{'CPU s':>8}{'x torch':>9}")
        print(f"{'import torch':<26}{wall:>8.2f}{1:>9.2f}{cpu:>8.2f}{1:>9.2f}" + ("  (then os._exit)" if args.to_first_step else ""))
        for name in cmds:
            for tree in trees:
                w, c = (statistics.median(t[i] for t in times[tree, name]) for i in (0, 1))
                print(f"{name:<14}{tree.name[:11]:<12}{w:>8.2f}{w / wall:>9.2f}{c:>8.2f}{c / cpu:>9.2f}")
        print(f"(medians: import torch of {len(base)} runs, each command of {args.rounds}, alternating; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end)")
        if args.importtime:
            for name, argv in cmds.items():
                rows = extra_imports(["-m", "unclip_cli", *argv], _env(trees[0], args.model), work, 6)
                print(f"\n{name}: " + ", ".join(f"{mod} {ms:.0f} ms" for ms, mod in rows))


if __name__ == "__main__":
    main()
