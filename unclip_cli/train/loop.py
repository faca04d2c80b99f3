"""The training loop shared by every component: AdamW with linear warm-up, gradient clipping, EMA,
bf16 autocast on CUDA, an atomic resumable state, a JSONL log, and data parallelism under torchrun.

Determinism: the random draws of step k on rank r (data, crops, corruptions, dropout of the
conditioning, t, noise; and the global torch RNG) come from generators seeded with
(seed, r, k), never from a stream carried across steps. So a run stopped after k steps and resumed
from its state continues exactly as an uninterrupted run (same weights, bit for bit, on the same
device), and the state needs no RNG snapshot.

Distributed: under torchrun (WORLD_SIZE > 1) each rank trains on its own draws (its rank is in the
seeds), gradients are averaged by DistributedDataParallel (nccl on CUDA, gloo on the CPU), and
rank 0 alone writes the model set, the state and the log.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from unclip_cli.distributed import Dist, setup_distributed, shutdown
from unclip_cli.errors import UserError
from unclip_cli.io import atomic_write

STATE_NAME = "train-state.pt"
LOG_NAME = "train.jsonl"
STATE_FORMAT = "unclip-train-state"
TRAINABLE = ("clip", "prior", "prior-ar", "decoder", "upsampler-256", "upsampler-1024")
EMA_WARMUP = 10  # EMA decay ramps as min(decay, (1 + k) / (10 + k)): early EMA follows the weights


@dataclass
class TrainOptions:
    """How to train (what to train is the component and the model set)."""

    steps: int  # train until this many optimizer steps in total (a resumed run continues to it)
    batch_size: int = 8  # per rank
    lr: float = 1e-4  # peak learning rate, reached after `warmup` steps, then constant
    warmup: int = 500  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay on matrices (not on biases, norms, vectors)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    ema_decay: float = 0.9999  # decay of the EMA weights the model set stores
    seed: int = 0
    save_every: int = 1000  # steps between writes of the component and the state
    log_every: int = 10  # steps averaged into one JSONL line
    log_file: str | None = None  # default: DIR/<component>/train.jsonl
    resume: bool = True  # continue from DIR/<component>/train-state.pt when it exists
    fixed_batch: bool = False  # draw one batch and train on it at every step (overfitting checks)
    device: str | None = None  # torch device name; under torchrun, cuda means cuda:LOCAL_RANK
    color_jitter: float | None = None  # upsamplers: largest color offset of a crop (None: degrade.JITTER_OFFSET)
    crop: int | None = None  # upsamplers: training crop side in output pixels (None: a quarter of the output size)
    hard_negatives: int | None = None  # clip on shapes data: scenes per group of hard negatives (None: independent scenes)


def seed_for(*parts) -> int:
    """A 63-bit seed from any tuple (seed, rank, step, purpose): independent streams per step."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed_for(*parts))


# ---------------------------------------------------------------------- pieces


def make_optimizer(module: nn.Module, opts: TrainOptions) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and higher-rank tensors only (nanoGPT's split)."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step: int, opts: TrainOptions) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant."""
    if opts.warmup <= 0:
        return opts.lr
    return opts.lr * min(1.0, (step + 1) / opts.warmup)


class EMA:
    """Exponential moving average of a module's weights; non-trained tensors are copied."""

    def __init__(self, module: nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: nn.Module, steps_done: int) -> None:
        decay = min(self.decay, (1 + steps_done) / (EMA_WARMUP + steps_done))
        for e, p in zip(self.module.parameters(), module.parameters()):
            if p.requires_grad:
                e.lerp_(p.detach(), 1.0 - decay)
            else:
                e.copy_(p.detach())
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)


def save_state(path: Path, state: dict) -> None:
    """torch.save to a temporary file beside `path`, then rename (never a partial state)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: Path, component: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: damaged training state ({type(e).__name__}); pass --no-resume to start over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path}: not an unclip training state; pass --no-resume to start over")
    if state.get("component") != component:
        raise UserError(f"{path}: training state of {state.get('component')!r}, not {component!r}")
    return state


def open_log(path: Path, start: int):
    """The JSONL log, opened to append after step `start` (lines of steps past it, logged by a run
    killed before it could save, are dropped) or afresh for a new run."""
    if start > 0 and path.is_file():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= start:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        atomic_write(path, "".join(kept).encode())
    return open(path, "a" if start > 0 else "w")


class Prefetcher:
    """Fetches the data of step k + 1 in a background thread while step k trains."""

    def __init__(self, fetch: Callable[[int], dict], end: int):
        self.fetch, self.end = fetch, end
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unclip-data")
        self.pending: dict = {}

    def get(self, step: int) -> dict:
        future = self.pending.pop(step, None) or self.pool.submit(self.fetch, step)
        if step + 1 < self.end:
            self.pending[step + 1] = self.pool.submit(self.fetch, step + 1)
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def stop_requests():
    """First SIGINT / SIGTERM sets a flag (stop after this step, save); a second SIGINT interrupts at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def global_rng_scope(device: torch.device):
    """Leave the caller's global RNG as it was (training reseeds it every step)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def seed_global_rng(seed: int, device: torch.device) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


# ---------------------------------------------------------------------- inputs


def open_inputs(component: str, ms, data: str | None, cache_path: str | None, say: Callable[[str], None]):
    """The data source and embedding cache a component needs, checked against the model set.

    The source is opened with its default stream (shapes seed 0, what `data embed` caches): the
    training --seed picks draws from the data, not the data itself."""
    source = cache = None
    if cache_path is not None:
        if component not in ("prior", "prior-ar", "decoder"):
            raise UserError("--cache (precomputed CLIP embeddings) is for the priors and the decoder")
        from unclip_cli.data.cache import EmbeddingCache

        cache = EmbeddingCache.load(cache_path)
        if cache.clip != ms.clip_identity:
            raise UserError(f"{cache_path}: embeddings of CLIP {cache.clip}, but model set {ms.name!r} uses {ms.clip_identity}")
        if len(cache) == 0:
            raise UserError(f"{cache_path}: empty embedding cache")
    if data is None:
        if component in ("prior", "prior-ar") and cache is not None:
            return None, cache
        raise UserError(f"training {component} needs --data (shapes, a folder of captioned images, a .tar or a glob)")
    from unclip_cli.data.sources import open_source

    source = open_source(data)
    if len(source) == 0:
        raise UserError(f"{data}: no training examples")
    if cache is not None and cache.source != source.name:
        say(f"warning: {cache_path} was made from {cache.source!r}, --data is {source.name!r}: its rows must be the same items")
    return source, cache


# ---------------------------------------------------------------------- the loop


def train(
    component: str,
    model: str | None,
    data: str | None,
    opts: TrainOptions,
    *,
    cache: str | None = None,
    say: Callable[[str], None] = lambda msg: None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Train `component` of the model set `model` for `opts.steps` steps in total; returns a summary.

    say(msg): messages for the user (rank 0). on_step(step, steps, loss): after every step (rank 0).
    """
    from unclip_cli.modelset import ModelSet
    from unclip_cli.train.components import make_task

    if component not in TRAINABLE:
        raise UserError(f"unknown component {component!r} (trainable: {', '.join(TRAINABLE)})")
    for name, value, minimum in (
        ("--steps", opts.steps, 1), ("--batch-size", opts.batch_size, 1), ("--save-every", opts.save_every, 1),
        ("--log-every", opts.log_every, 1), ("--warmup", opts.warmup, 0), ("--seed", opts.seed, 0),
    ):
        if value < minimum:
            raise UserError(f"{name} must be >= {minimum}")
    if not opts.lr > 0 or opts.weight_decay < 0 or opts.grad_clip < 0 or not 0 <= opts.ema_decay < 1:
        raise UserError("need --lr > 0, --weight-decay >= 0, --grad-clip >= 0 and 0 <= --ema-decay < 1")

    for flag, value, owner in (
        ("--color-jitter", opts.color_jitter, "upsampler"), ("--crop", opts.crop, "upsampler"),
        ("--hard-negatives", opts.hard_negatives, "clip"),
    ):
        if value is not None and not component.startswith(owner):
            raise UserError(f"{flag} is for {owner} training only; {component} takes none")
    if opts.color_jitter is not None and not 0 <= opts.color_jitter <= 1:
        raise UserError(f"--color-jitter must be between 0 and 1 (got {opts.color_jitter})")
    if opts.hard_negatives is not None and (opts.hard_negatives < 1 or opts.batch_size % opts.hard_negatives):
        raise UserError(f"--hard-negatives must divide --batch-size {opts.batch_size} (got {opts.hard_negatives})")
    if opts.log_file is not None and not Path(opts.log_file).resolve().parent.is_dir():
        raise UserError(f"--log {opts.log_file}: folder {Path(opts.log_file).parent} does not exist")
    ms = ModelSet.open(model)
    ms.require(component)
    dist_info, device = setup_distributed(opts.device)
    try:
        source, emb_cache = open_inputs(component, ms, data, cache, say if dist_info.main else (lambda m: None))
        amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
        task = make_task(
            component, ms, device, source, emb_cache, dist_info.rank, dist_info.world_size, amp, opts.color_jitter,
            opts.crop, opts.hard_negatives,
        )
        with global_rng_scope(device):
            return _run(task, ms, opts, dist_info, device, say if dist_info.main else (lambda m: None), on_step)
    finally:
        shutdown(dist_info)


def _shown(value):
    """An option's value in a message; None is an option left at its default."""
    return "default" if value is None else value


def _run(task, ms, opts: TrainOptions, d: Dist, device: torch.device, say, on_step) -> dict:
    folder = ms.path / task.component
    state_path = folder / STATE_NAME
    log_path = Path(opts.log_file) if opts.log_file else folder / LOG_NAME
    module = task.module
    record = {
        "seed": opts.seed, "batch_size": opts.batch_size, "world_size": d.world_size, "fixed_batch": opts.fixed_batch,
        "color_jitter": opts.color_jitter, "crop": opts.crop, "hard_negatives": opts.hard_negatives,
    }

    state = load_state(state_path, task.component) if opts.resume and state_path.is_file() else None
    if state is None:
        task.setup(say)
        start = 0
    else:
        start = int(state["step"])
        module.load_state_dict(state["model"])
        changed = [
            f"{k} {_shown(state['options'].get(k))} -> {_shown(v)}" for k, v in record.items() if state["options"].get(k) != v
        ]
        if changed:
            say(f"warning: resuming with {', '.join(changed)}: the run will differ from an uninterrupted one")
    if start >= opts.steps:
        say(f"{task.component}: the training state is already at step {start} (--steps {opts.steps}); nothing to do")
        return {"component": task.component, "step": start, "loss": None, "stopped": False}

    ema = EMA(module, opts.ema_decay)
    optimizer = make_optimizer(module, opts)
    if state is not None:
        ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        say(f"{task.component}: resuming from step {start}")
    del state

    net = task.net
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in module.parameters() if p.requires_grad]

    def save(step: int) -> None:
        if not d.main:
            return
        task.save(ema.module, say)
        save_state(state_path, {
            "format": STATE_FORMAT, "version": 1, "component": task.component, "step": step,
            "model": module.state_dict(), "ema": ema.module.state_dict(), "optimizer": optimizer.state_dict(),
            "options": record, "train_options": json.dumps(asdict(opts)),
        })

    batches = Batches(task, opts, d.rank)
    log = JsonlLog(open_log(log_path, start)) if d.main else None
    try:
        with stop_requests() as stop:
            for step in range(start, opts.steps):
                seed_global_rng(seed_for(opts.seed, d.rank, step, "global"), device)
                lr = lr_at(step, opts)
                terms = train_step(task, net, optimizer, params, batches.get(step),
                                   generator(opts.seed, d.rank, step, "noise"), lr, opts.grad_clip)
                ema.update(module, step + 1)
                terms = mean_over_ranks({**terms, "stop": float(stop.is_set())}, d)
                stopping = terms.pop("stop") > 0
                if not math.isfinite(terms["loss"]):
                    raise UserError(f"training diverged: loss {terms['loss']} at step {step + 1} (try a lower --lr)")
                done = step + 1
                if log is not None:
                    log.add(terms)
                    if done % opts.log_every == 0 or done == opts.steps:
                        log.write(done, lr)
                if on_step is not None and d.main:
                    on_step(done, opts.steps, terms["loss"])
                if done % opts.save_every == 0 or done == opts.steps or stopping:
                    save(done)
                if stopping:
                    say(f"{task.component}: stopped at step {done}; saved. Run the same command to resume.")
                    break
    finally:
        batches.close()
        if log is not None:
            log.close()
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has written everything
    return {"component": task.component, "step": done, "loss": terms["loss"], "stopped": done < opts.steps}


def train_step(task, net, optimizer, params, batch, g: torch.Generator, lr: float, grad_clip: float) -> dict:
    """One optimizer step; returns the loss terms (tensors) and the gradient norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, parts = task.loss(net, batch, g)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    task.after_step()
    return {"loss": loss.detach(), "grad_norm": grad_norm, **parts}


def mean_over_ranks(terms: dict, d: Dist) -> dict[str, float]:
    """Scalars (tensors or floats) averaged over the processes, as floats (one all-reduce)."""
    ref = terms["loss"]
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(ref.device) for v in terms.values()])
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(values)
        values /= d.world_size
    return dict(zip(terms, values.tolist()))


class Batches:
    """The data of each step: one fixed batch (--fixed-batch), or step k's own draw, prefetched."""

    def __init__(self, task, opts: TrainOptions, rank: int):
        fetch = lambda *key: task.fetch(opts.batch_size, generator(opts.seed, rank, *key))  # noqa: E731
        self.fixed = fetch("fixed-batch") if opts.fixed_batch else None
        self.prefetch = None if opts.fixed_batch else Prefetcher(lambda k: fetch(k, "data"), opts.steps)

    def get(self, step: int):
        return self.fixed if self.prefetch is None else self.prefetch.get(step)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()


class JsonlLog:
    """Loss terms averaged over the steps since the last line: {step, loss, ..., lr, time, elapsed}."""

    def __init__(self, file):
        self.file, self.t0, self.sums, self.count = file, time.time(), {}, 0

    def add(self, terms: dict[str, float]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def write(self, step: int, lr: float) -> None:
        now = time.time()
        line = {"step": step, **{k: v / self.count for k, v in self.sums.items()}, "lr": lr,
                "time": round(now, 3), "elapsed": round(now - self.t0, 3)}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        self.sums, self.count = {}, 0

    def close(self) -> None:
        self.file.close()
