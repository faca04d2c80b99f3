"""Benchmark: wall time and peak memory of `unclip generate` from the shell, per output size.

    python scripts/bench_generate.py [--model DIR] [--repeats 3] [--sizes 64,256,1024]

Runs `unclip generate PROMPT --size S --seed i -o TMP.png` as a fresh process (interpreter start,
imports and weight loading included, as a user sees it) `--repeats` times per size and prints the
median and worst wall-clock seconds and the largest peak resident memory (the child's ru_maxrss).
The figures are what this machine measured; nothing is compared against a threshold here.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def run_once(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one child process."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: exec the command, output to /dev/null
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        subprocess.run(cmd, check=True)  # rerun in the open to show the error
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model set (default: the shipped one)")
    ap.add_argument("--prompt", default="a red star on a blue background")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="64,256,1024")
    args = ap.parse_args()
    exe = shutil.which("unclip") or sys.exit("unclip is not on PATH (pip install -e .)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"command: unclip generate {args.prompt!r} --size S --seed i -o out.png" + (f" --model {args.model}" if args.model else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            walls, peak = [], 0
            for i in range(args.repeats):
                cmd = [exe, "generate", args.prompt, "--size", str(size), "--seed", str(i), "-q", "-o", f"{tmp}/out.png"]
                if args.model:
                    cmd += ["--model", args.model]
                wall, rss = run_once(cmd)
                walls.append(wall)
                peak = max(peak, rss)
            print(
                f"--size {size:>4}: median {statistics.median(walls):6.2f} s, worst {max(walls):6.2f} s, "
                f"peak RSS {peak / 2**30:.2f} GiB over {args.repeats} runs"
            )


if __name__ == "__main__":
    main()
