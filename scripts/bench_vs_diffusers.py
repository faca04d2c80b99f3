"""Benchmark: unclip against diffusers' UnCLIPPipeline on random Karlo-architecture weights, side by side.

    python scripts/bench_vs_diffusers.py [--scale small|karlo] [--batches 1,8] [--device cpu|cuda]
                                         [--repeats N] [--threads N] [--steps N] [--quality] [--work DIR]

One command. The parent builds random weights in memory with diffusers / transformers
(tests/helpers_karlo.py: `--scale karlo` is Karlo v1 alpha's real configs, 3.4 B parameters, for a
GPU; `--scale small` the same architecture with narrow widths, for a CPU), saves them once as a
diffusers snapshot (`save_pretrained`) and converts that into a unclip model set (`unclip_cli.convert`);
nothing is downloaded. Each side then runs in a fresh process per batch size, the way its users run
it, so start-up and loading count:
  - unclip: the CLI, `unclip generate PROMPTS --size 256 --model SET --seed 0 -o ...` (`--precision
    auto` where the CLI has it: fp32 on the CPU, bf16 on CUDA), its Typer app run by a small wrapper
    that times the Pipeline's stages;
  - diffusers: a child that imports diffusers, `UnCLIPPipeline.from_pretrained(SNAPSHOT,
    torch_dtype=fp16 on CUDA / fp32 on the CPU)`, generates and saves the PNGs.
Both use the same steps (prior 25, decoder 25, super-res 7; `--steps N` sets all three) and guidance
(4 / 8), one CPU generator seeded 0, 256 px. Each child writes its in-process stage times and peak
memory (RSS, VmHWM; on CUDA torch.cuda.max_memory_allocated) as JSON; the parent measures the
whole-process wall time (median of `--repeats`), and counts each network's FLOPs on one step with
torch.utils.flop_counter.FlopCounterMode (on the meta device: nothing computed) to give the UNets'
math rate, and on CUDA their share of `--peak-tflops` (default 989: H200 bf16 dense).
"CPU s": the child's user + system time, the steadier figure on a machine shared with other work
(with `--threads 1` no thread spins waiting for a descheduled sibling). "same pixels": the share of
uint8 values of unclip's PNGs equal to diffusers' (on the CPU both run fp32: the same maths).
`--quality`: unclip's images at bf16 and fp16 against fp32 (same seed, batch 1, fresh process each):
PSNR over [-1, 1] and the largest difference.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "a high-resolution photograph of a big red frog on a green leaf",
    "an oil painting of a fox in the snow",
    "a corgi wearing a red bowtie and a purple party hat",
    "a bowl of soup that looks like a monster, knitted out of wool",
    "3D render of a cute tropical fish in an aquarium on a dark blue background",
    "a watercolor of a lighthouse at dusk",
    "an astronaut riding a horse on the moon, digital art",
    "a stained glass window of a red panda",
]
STAGES = ("start", "load", "text", "prior", "decoder", "super-res", "rest")  # columns of the table


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# --------------------------------------------------------------------------- children (one process each)


def child_diffusers(a: argparse.Namespace) -> dict:
    """diffusers as its users run it; stage boundaries are the first call of each stage's network."""
    import torch
    from diffusers import UnCLIPPipeline

    t_import = time.time()
    dtype = torch.float16 if a.device.startswith("cuda") else torch.float32
    pipe = UnCLIPPipeline.from_pretrained(a.snapshot, torch_dtype=dtype).to(a.device)
    pipe.set_progress_bar_config(disable=True)
    sync(a.device)
    t_load = time.time()
    marks: dict[str, float] = {}

    def mark(stage: str):
        def hook(module, args):
            if stage not in marks:
                sync(a.device)
                marks[stage] = time.time()
        return hook

    for stage, module in (("prior", pipe.prior), ("decoder", pipe.text_proj), ("super-res", pipe.super_res_first)):
        module.register_forward_pre_hook(mark(stage))
    steps = a.steps or {}
    images = pipe(
        PROMPTS[: a.batch], generator=torch.Generator().manual_seed(a.seed),
        prior_num_inference_steps=steps.get("prior", 25), decoder_num_inference_steps=steps.get("decoder", 25),
        super_res_num_inference_steps=steps.get("super-res", 7), prior_guidance_scale=4.0, decoder_guidance_scale=8.0,
    ).images
    sync(a.device)
    t_done = time.time()
    for i, img in enumerate(images):
        img.save(Path(a.out) / f"diffusers-{i}.png")
    times = {
        "start": t_import - a.launch, "load": t_load - t_import, "text": marks["prior"] - t_load,
        "prior": marks["decoder"] - marks["prior"], "decoder": marks["super-res"] - marks["decoder"],
        "super-res": t_done - marks["super-res"],
    }
    return _finish(a, times)


def child_unclip(a: argparse.Namespace, argv: list[str]) -> dict:
    """unclip's CLI in this process, its Pipeline's stages timed (exclusive of the network loads inside)."""
    from unclip_cli.modelset import ModelSet
    from unclip_cli.pipeline import Pipeline

    totals: dict[str, float] = {}
    stack: list[float] = []  # time spent in timed calls nested in each open call
    entered: dict[str, float] = {}

    def timed(owner, method: str, stage: str) -> None:
        fn = getattr(owner, method)

        def wrapper(*args, **kw):
            entered.setdefault(stage, time.time())
            entered.setdefault(f"load before {stage}", totals.get("load", 0.0))
            stack.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                sync(a.device)
                dt = time.perf_counter() - t
                inner = stack.pop()
                totals[stage] = totals.get(stage, 0.0) + dt - inner
                if stack:
                    stack[-1] += dt

        setattr(owner, method, wrapper)

    for owner, method, stage in ((ModelSet, "load", "load"), (Pipeline, "generate", "generate"),
                                 (Pipeline, "text_cond", "text"), (Pipeline, "null", "text"),
                                 (Pipeline, "sample_prior", "prior"), (Pipeline, "run_decoder", "decoder"),
                                 (Pipeline, "run_upsampler", "super-res")):
        timed(owner, method, stage)
    from unclip_cli.cli import main

    sys.argv = ["unclip", *argv]
    try:
        main()
    except SystemExit as e:
        if e.code:
            raise
    times = {k: totals.get(k, 0.0) for k in ("load", "text", "prior", "decoder", "super-res")}
    times["start"] = entered["generate"] - a.launch - entered["load before generate"]
    return _finish(a, times)


def _finish(a: argparse.Namespace, times: dict) -> dict:
    """Stage times plus `rest` (the in-process total less the stages) and the GPU's peak memory."""
    total = time.time() - a.launch
    times["rest"] = total - sum(times.values())
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"stages": times, "in_process": total, "rss_peak": _vm_hwm(), "cpu": usage.ru_utime + usage.ru_stime}
    if a.device.startswith("cuda"):
        import torch

        result["gpu_peak"] = torch.cuda.max_memory_allocated()
    return result


def _vm_hwm() -> int:
    """This process's peak RSS in bytes (VmHWM starts afresh at exec; a child's ru_maxrss would include
    the RSS of the parent it was forked from)."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))


def child_quality(a: argparse.Namespace) -> dict:
    """unclip at one precision, batch 1, through the Python API: the image floats saved for the parent."""
    import numpy as np
    import torch

    from unclip_cli.pipeline import Pipeline

    t = time.time()
    pipe = Pipeline.load(a.set, device=a.device, **({} if a.precision == "default" else {"precision": a.precision}))
    steps = a.steps or {}
    x, _ = pipe.generate_tensor(
        PROMPTS[:1], torch.Generator().manual_seed(a.seed), size=a.size, prior_steps=steps.get("prior"),
        decoder_steps=steps.get("decoder"), upsampler_steps=steps.get("super-res"),
    )
    np.save(Path(a.out) / f"quality-{a.precision}.npy", x.float().numpy())
    return {"seconds": time.time() - t, "rss_peak": _vm_hwm()}


# --------------------------------------------------------------------------- the parent


def build(scale: str, work: Path, dtype: str = "fp32") -> None:
    """Random Karlo-architecture weights -> WORK/snapshot (diffusers) -> WORK/set (unclip), once; built and
    saved in `dtype` (bf16 halves the memory a Karlo-size build needs)."""
    made = {"scale": scale, "dtype": dtype}
    if (work / "set" / "model.json").exists():
        if json.loads((work / "made.json").read_text()) != made:
            sys.exit(f"{work} holds weights made with {(work / 'made.json').read_text().strip()}, not {json.dumps(made)}")
        print(f"reusing {work}/snapshot and {work}/set", file=sys.stderr)
        return
    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers_karlo import bench_config, build_components, text_to_image_pipeline

    from unclip_cli.convert.diffusers import import_snapshot

    import torch

    t = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16 if dtype == "bf16" else torch.float32)
    pipe = text_to_image_pipeline(build_components(bench_config(scale), work))
    pipe.save_pretrained(work / "snapshot")
    torch.set_default_dtype(torch.float32)
    del pipe
    gc.collect()  # the networks hold reference cycles: free them before the conversion
    import_snapshot(work / "snapshot", work / "set")
    (work / "made.json").write_text(json.dumps(made))
    print(f"built and converted the {scale} weights in {time.perf_counter() - t:.1f} s", file=sys.stderr)


def count_flops(scale: str, batch: int, steps: dict) -> dict:
    """FLOPs of each stage at `batch` images: one step of each network counted on the meta device (guided
    networks see 2 x batch), times the stage's steps. diffusers' networks; unclip's compute the same maths."""
    import torch
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers_karlo import CONTEXT, bench_config

    cfg = bench_config(scale)
    D, W, B = cfg.D, cfg.text["hidden_size"], 2 * batch
    tokens = CONTEXT + cfg.text_proj.get("clip_extra_context_tokens", 4)
    with torch.device("meta"), torch.no_grad():
        prior = PriorTransformer(num_embeddings=CONTEXT, additional_embeddings=4, **cfg.prior)
        decoder, sr = UNet2DConditionModel(**cfg.decoder), UNet2DModel(**cfg.super_res)
        t = torch.full((B,), 500)
        calls = {
            "prior": lambda: prior(torch.randn(B, D), timestep=t, proj_embedding=torch.randn(B, D),
                                   encoder_hidden_states=torch.randn(B, CONTEXT, W),
                                   attention_mask=torch.ones(B, CONTEXT, dtype=torch.bool)),
            "decoder": lambda: decoder(torch.randn(B, 3, 64, 64), t, encoder_hidden_states=torch.randn(B, tokens, 2 * D),
                                       class_labels=torch.randn(B, cfg.text_proj["time_embed_dim"]),
                                       attention_mask=torch.ones(B, tokens, dtype=torch.bool)),
            "super-res": lambda: sr(torch.randn(batch, 6, 256, 256), t[:batch]),
        }
        flops = {}
        for stage, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            flops[stage] = counter.get_total_flops() * steps[stage]
    return flops


def run_child(args: list[str], work: Path, name: str) -> tuple[float, int, dict]:
    """(whole-process wall seconds, ru_maxrss, the child's JSON) of one fresh child process."""
    sys.path.insert(0, str(HERE))
    from bench_generate import run_once

    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    launch = time.time()
    wall, rss = run_once([sys.executable, str(Path(__file__).resolve()), "--launch", str(launch), "--result", str(result), *args])
    return wall, rss, json.loads(result.read_text())


# --------------------------------------------------------------------------- the report


def machine_line(device: str) -> str:
    import platform

    import diffusers
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.machine())
    gpu = f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {cpu}, {os.cpu_count()} CPUs{gpu}; "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}; "
            f"threads {os.environ.get('OMP_NUM_THREADS', 'default')}; load average {os.getloadavg()[0]:.1f}")


def _steps(a: argparse.Namespace) -> dict:
    return {"prior": a.steps or 25, "decoder": a.steps or 25, "super-res": a.steps or 7}


def _precision_flag() -> list[str]:
    """`--precision auto` where this unclip's generate has the option (fp32 on the CPU either way)."""
    import inspect

    from unclip_cli.cli.stages import generate

    return ["--precision", "auto"] if "precision" in inspect.signature(generate).parameters else []


def _median(runs: list[tuple[float, int, dict]]) -> dict:
    stages = {k: statistics.median(r[2]["stages"][k] for r in runs) for k in STAGES}
    peak = max(r[2].get("gpu_peak", r[2]["rss_peak"]) for r in runs)
    return {"wall": statistics.median(r[0] for r in runs), "cpu": statistics.median(r[2]["cpu"] for r in runs),
            "stages": stages, "peak": peak}


def _agreement(work: Path, batch: int) -> str:
    """How many uint8 values of unclip's PNGs equal diffusers' (same seed), and the largest difference."""
    import numpy as np
    from PIL import Image

    def pixels(side: str, names: list[str]) -> np.ndarray:
        return np.stack([np.asarray(Image.open(work / f"out-{side}-{batch}" / n).convert("RGB")) for n in names]).astype(int)

    ours = pixels("unclip", ["unclip.png"] if batch == 1 else [f"unclip-{i}.png" for i in range(batch)])
    diff = np.abs(ours - pixels("diffusers", [f"diffusers-{i}.png" for i in range(batch)]))
    return f"{100 * (diff == 0).mean():.3f}% (max {diff.max()})"


def speed_table(a: argparse.Namespace, device: str, work: Path, batches: list[int]) -> str:
    """Both sides at each batch size, fresh processes, `--repeats` times (sides alternating): one table."""
    steps = _steps(a)
    common = ["--device", device, "--step-json", json.dumps(steps), "--seed", str(a.seed)]
    flag = _precision_flag()
    head = ["batch", "side", "wall s"] + [f"{s} s" for s in STAGES] + ["images/s", "unclip/diffusers", "CPU s",
                                                                       "unclip/diffusers (CPU time)", "peak memory",
                                                                       "decoder / super-res math rate", "same pixels"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for batch in batches:
        flops = count_flops(a.scale, batch, steps)
        runs: dict[str, list] = {"diffusers": [], "unclip": []}
        for r in range(a.repeats):
            for side in ("diffusers", "unclip") if r % 2 == 0 else ("unclip", "diffusers"):
                out = work / f"out-{side}-{batch}"
                out.mkdir(exist_ok=True)
                if side == "diffusers":
                    args = ["--child", side, "--snapshot", str(work / "snapshot"), "--out", str(out), "--batch", str(batch)]
                    args += common
                else:
                    args = ["--child", side] + common + [
                        "--", "generate", *PROMPTS[:batch], "--size", "256", "--model", str(work / "set"),
                        "--seed", str(a.seed), "-q", "-o", str(out / "unclip.png"), "--device", device, *flag,
                        "--prior-steps", str(steps["prior"]), "--decoder-steps", str(steps["decoder"]),
                        "--upsampler-steps", str(steps["super-res"]), "--prior-guidance", "4", "--decoder-guidance", "8",
                    ]
                runs[side].append(run_child(args, work, side))
                print(f"batch {batch}, {side}, run {r + 1}: {runs[side][-1][0]:.1f} s", file=sys.stderr)
        med = {side: _median(v) for side, v in runs.items()}
        for side in ("diffusers", "unclip"):
            m = med[side]
            st = m["stages"]
            ratio = med["diffusers"]["wall"] / m["wall"]
            rates = [flops[s] / max(st[s], 1e-9) for s in ("decoder", "super-res")]
            if device.startswith("cuda"):
                rate = " / ".join(f"{100 * r / (a.peak_tflops * 1e12):.0f}% ({r / 1e12:.0f} TFLOP/s)" for r in rates)
            else:
                rate = " / ".join(f"{r / 1e9:.0f}" for r in rates) + " GFLOP/s"
            memory = f"{m['peak'] / 2**30:.2f} GiB" + (" GPU" if device.startswith("cuda") else " RSS")
            cells = [str(batch), side, f"{m['wall']:.1f}"] + [f"{st[s]:.2f}" for s in STAGES]
            same = _agreement(work, batch) if side == "unclip" else "-"
            cpu_ratio = med["diffusers"]["cpu"] / m["cpu"]
            cells += [f"{batch / m['wall']:.3f}", f"{ratio:.2f}x" if side == "unclip" else "1", f"{m['cpu']:.1f}",
                      f"{cpu_ratio:.2f}x" if side == "unclip" else "1", memory, rate, same]
            lines.append("| " + " | ".join(cells) + " |")
        per_image = ", ".join(f"{k} {v / batch / 1e9:.1f}" for k, v in flops.items())
        lines.append(f"<!-- batch {batch}: GFLOP per image (counted, one step x steps): {per_image} -->")
    return "\n".join(lines)


def quality(a: argparse.Namespace, device: str, work: Path) -> str:
    """unclip's bf16 and fp16 images against its fp32 image, same seed, batch 1, one fresh process each."""
    import numpy as np
    import torch

    from unclip_cli.stages.images import psnr

    lines = [f"quality (unclip, batch 1, seed {a.seed}, {a.size} px, steps {_steps(a)}):"]
    images = {}
    for precision in ("fp32", "bf16", "fp16"):
        result = work / f"quality-{precision}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "quality", "--launch", str(time.time()),
               "--result", str(result), "--set", str(work / "set"), "--out", str(work), "--precision", precision,
               "--device", device, "--step-json", json.dumps(_steps(a)), "--seed", str(a.seed), "--size", str(a.size)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.quality_timeout)
        except subprocess.TimeoutExpired:
            lines.append(f"  {precision}: not finished within --quality-timeout {a.quality_timeout} s")
            continue
        if proc.returncode:
            why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            lines.append(f"  {precision}: failed: {why}")
            continue
        images[precision] = torch.from_numpy(np.load(work / f"quality-{precision}.npy"))
        info = json.loads(result.read_text())
        cost = f"{info['seconds']:.1f} s in process, peak RSS {info['rss_peak'] / 2**30:.2f} GiB"
        if precision == "fp32":
            lines.append(f"  fp32: the reference ({cost})")
        elif "fp32" in images:
            x, ref = images[precision], images["fp32"]
            lines.append(f"  {precision}: PSNR {psnr(x, ref).item():.1f} dB against fp32 (images in [-1, 1]), "
                         f"largest difference {(x - ref).abs().max().item():.3f} ({cost})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=("small", "karlo"), default="small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side and batch (median; sides alternate)")
    ap.add_argument("--steps", type=int, help="steps of every stage (default: 25 / 25 / 7 as diffusers)")
    ap.add_argument("--size", type=int, default=256, help="--quality's image size (64 skips the super-res)")
    ap.add_argument("--quality", action="store_true", help="PSNR of unclip's bf16 and fp16 images against fp32")
    ap.add_argument("--quality-timeout", type=int, default=900, help="seconds for each --quality run")
    ap.add_argument("--no-speed", action="store_true", help="skip the side-by-side runs (with --quality)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's peak rate (default: H200 bf16 dense)")
    ap.add_argument("--weights-dtype", choices=("fp32", "bf16"), default="fp32", help="the random weights' dtype")
    ap.add_argument("--work", help="folder for the snapshot and set (kept; reused when present)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads of both sides' children (default: torch's choice)")
    # child side (internal)
    ap.add_argument("--child", choices=("unclip", "diffusers", "quality"), help=argparse.SUPPRESS)
    for name in ("--launch", "--result", "--snapshot", "--set", "--out", "--precision", "--batch", "--step-json"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    a, rest = ap.parse_known_args()
    if a.child:
        a.launch, a.batch = float(a.launch), int(a.batch or 1)
        rest = rest[1:] if rest[:1] == ["--"] else rest
        a.steps = json.loads(a.step_json) if a.step_json else None
        result = {"unclip": lambda: child_unclip(a, rest), "diffusers": lambda: child_diffusers(a),
                  "quality": lambda: child_quality(a)}[a.child]()
        Path(a.result).write_text(json.dumps(result))
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.threads:  # read by each child's torch at start-up
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        build(a.scale, work, a.weights_dtype)
        print(machine_line(device))
        if not a.no_speed:
            print(speed_table(a, device, work, [int(b) for b in a.batches.split(",")]))
            print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        if a.quality:
            print(quality(a, device, work))


if __name__ == "__main__":
    main()
