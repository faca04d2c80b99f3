"""Generation at scale: a prompt file -> a folder of images, resumable, sharded over torchrun ranks.

    unclip generate --prompts prompts.txt --out-dir out/ --batch-size 8 --seed 0
    torchrun --nproc-per-node 4 -m unclip_cli generate --prompts prompts.txt --out-dir out/ ...

Items: FILE holds one prompt per line, or JSON lines `{"prompt": ..., "seed": ...}` (seed optional;
a file whose first non-blank line starts with "{" is JSON lines). An item's index is its line
number counted from 0 (blank lines make no item but keep their number). Its seed is the one given
on its line, else `item_seed(base, index)`: the first 8 bytes of SHA-256("BASE/INDEX"), big-endian,
shifted right by one (63 bits), with BASE the run's --seed (drawn when not given, printed and kept
in DIR/run.json). Each item draws all its noise from its own generator (one per batch row), so its
image does not depend on the batch size, the number of ranks or where a run was resumed; and it is
the image of `unclip generate PROMPT --seed SEED` with the same settings.

Output (--format png): DIR/000000.png... (the index, six digits at least), each with its record
as any `generate` PNG. --format tar: webdataset shards DIR/shard-000000.tar of --shard-size items
(key.png, key.txt the prompt, key.json its manifest line), which `unclip train --data
'DIR/shard-*.tar'` reads. Both: DIR/manifest.jsonl, one line per item in index order (index, prompt,
seed, file, [shard], and the sampling settings), and DIR/run.json, the run's settings.

Resume: a file (or shard) that exists is complete (it is written to a temporary name and renamed),
so a rerun skips it and makes the rest; a rerun with other settings into the same folder is refused.
Ranks: item n (counted over the items) goes to rank n mod K, tar shard s to rank s mod K; each
rank writes its part of the manifest and rank 0 merges them after the last item. Memory is flat in
the number of prompts: the file is streamed (stdin is held as its lines), one batch in flight.
"""

from __future__ import annotations

import hashlib
import heapq
import io as _io
import itertools
import json
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from unclip_cli.device import make_generator, make_generators
from unclip_cli.distributed import Dist, barrier, from_rank0, setup_distributed, shutdown, sum_over_ranks
from unclip_cli.errors import UserError
from unclip_cli.io import RECORD_KEY, atomic_file, atomic_write, png_bytes, read_json_object, show, tensor_to_images
from unclip_cli.pipeline import PRIOR_KINDS, UPSAMPLERS, Pipeline
from unclip_cli.record import png_text

RUN_NAME = "run.json"
MANIFEST_NAME = "manifest.jsonl"
PART_GLOB = ".manifest.rank-*.jsonl"
FORMATS = ("png", "tar")
ProgressFn = Callable[[int, int], None]  # (items done, all items), on rank 0


@dataclass
class Item:
    index: int  # line number in the prompt file, from 0
    prompt: str
    seed: int


@dataclass
class BulkOptions:
    """How to run a prompt file (the sampling options are those of `generate`; None: the set's default)."""

    out_dir: str
    format: str = "png"  # png files or webdataset tar shards
    batch_size: int = 1  # items per forward pass
    shard_size: int = 1000  # tar: items per shard
    size: int = 64
    seed: int | None = None  # base of the items' seeds (drawn, or read back from DIR/run.json, when None)
    sampling: dict = field(default_factory=dict)  # prior_kind, prior_steps, prior_guidance, decoder_steps, decoder_guidance, upsampler_steps


def item_seed(base: int, index: int) -> int:
    """The seed of item `index` of a run with seed `base` (when its line gives none)."""
    return int.from_bytes(hashlib.sha256(f"{base}/{index}".encode()).digest()[:8], "big") >> 1


# ---------------------------------------------------------------------- the prompt file


def prompt_lines(source: str) -> Callable[[], Iterator[str]]:
    """A way to read FILE's lines again and again, streaming; '-': stdin, read once and held as strings."""
    if source == "-":
        if sys.stdin.isatty():
            raise UserError("--prompts -: stdin is a terminal; pipe the prompts in, one per line")
        lines = sys.stdin.read().splitlines()
        return lambda: iter(lines)
    path = Path(source)
    if not path.is_file():
        raise UserError(f"--prompts {show(source)}: no such file")

    def read() -> Iterator[str]:
        try:
            with open(path, encoding="utf-8") as f:
                yield from f
        except UnicodeDecodeError:
            raise UserError(f"{show(source)}: not UTF-8 text") from None
        except OSError as e:
            raise UserError(f"{show(source)}: cannot read ({(e.strerror or str(e)).lower()})") from None

    return read


def read_items(lines: Iterable[str], base_seed: int, name: str = "prompts") -> Iterator[Item]:
    """The items of a prompt file, streamed; a malformed line is one UserError naming FILE:LINE."""
    jsonl = None
    for number, line in enumerate(lines):
        text = line.strip()
        if not text:
            continue
        if jsonl is None:
            jsonl = text.startswith("{")
        seed = None
        if jsonl:
            where = f"{name}:{number + 1}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not a JSON object ({e.msg}); the file is JSON lines, as its first line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise UserError(f'{where}: expected {{"prompt": "...", "seed": N}} with a non-empty prompt')
            text, seed = obj["prompt"].strip(), obj.get("seed")
            if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):
                raise UserError(f"{where}: seed must be an integer in [0, 2^63), got {seed!r}")
        yield Item(number, text, item_seed(base_seed, number) if seed is None else seed)


# ---------------------------------------------------------------------- settings


def resolved_settings(pipe: Pipeline, size: int, sampling: dict) -> dict:
    """The sampling settings a `generate_tensor` call with these options uses (the set's defaults filled
    in, checked), as its record names them."""
    kind = pipe.prior_kind(sampling.get("prior_kind"))
    steps = {"steps": sampling.get("prior_steps")} if kind == "diffusion" else {}
    prior = pipe.settings(PRIOR_KINDS[kind], guidance=sampling.get("prior_guidance"), **steps)
    decoder = pipe.settings("decoder", steps=sampling.get("decoder_steps"), guidance=sampling.get("decoder_guidance"))
    out = {"size": size, "prior_kind": kind, **{f"prior_{k}": v for k, v in prior.items()}, "prior_candidates": 1,
           "decoder_steps": decoder["steps"], "decoder_guidance": decoder["guidance"]}
    out["precision"] = pipe.precision  # the networks' weights (fp32, bf16...): part of what makes the pixels
    ups = sampling.get("upsampler_steps") or {}
    for low, component in UPSAMPLERS.items():
        if size > low:
            steps = ups.get(component) if isinstance(ups, dict) else ups
            out[f"upsampler_{low * 4}_steps"] = pipe.settings(component, steps=steps)["steps"]
    return out


def _run_settings(pipe: Pipeline, opts: BulkOptions, seed: int, settings: dict) -> dict:
    """What DIR/run.json keeps: everything that decides an item's pixels or its place in the folder."""
    run = {"format": opts.format, "seed": seed, "model": pipe.name, "model_identity": pipe.record()["model_identity"], **settings}
    if opts.format == "tar":
        run["shard_size"] = opts.shard_size
    return run


def _check_folder(out: Path, run: dict, stored: dict | None) -> None:
    """Refuse a folder made with other settings, or one that holds files but no run.json."""
    if stored is None:
        if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise UserError(f"--out-dir {show(out)}: holds files but no {RUN_NAME}; give a new or empty folder")
        return
    if stored != run:
        diff = [f"{k} {stored.get(k)!r} there, {run.get(k)!r} now" for k in sorted(set(stored) | set(run)) if stored.get(k) != run.get(k)]
        raise UserError(f"--out-dir {show(out)} was made with other settings ({'; '.join(diff)}): "
                        "rerun with its options to resume, or give another folder")


def _stored_run(out: Path) -> dict | None:
    path = out / RUN_NAME
    return read_json_object(path, "run settings") if path.is_file() else None


# ---------------------------------------------------------------------- the run


class _Writer:
    """One rank's items -> files, yielding the count of items finished after each batch (or skipped unit)."""

    def __init__(self, pipe: Pipeline, opts: BulkOptions, settings: dict, d: Dist, part):
        self.pipe, self.opts, self.settings, self.d, self.part = pipe, opts, settings, d, part
        self.out = Path(opts.out_dir)
        self.generated = 0

    def images(self, items: list[Item]) -> list[bytes]:
        """PNG bytes of a batch of items, each from its own generator, with its own record."""
        generators = make_generators([it.seed for it in items])
        x, used = self.pipe.generate_tensor([it.prompt for it in items], generators, size=self.opts.size, **self.opts.sampling)
        out = []
        for it, img in zip(items, tensor_to_images(x)):
            record = self.pipe.record(stages=["generate"], prompts=[it.prompt], seed=it.seed, size=self.opts.size, **used)
            img.info[RECORD_KEY] = png_text(record)
            out.append(png_bytes(img))
        self.generated += len(items)
        return out

    def line(self, it: Item, **where) -> dict:
        return {"index": it.index, "prompt": it.prompt, "seed": it.seed, **where, **self.settings}

    def note(self, lines: list[dict]) -> None:
        for line in lines:
            self.part.write(json.dumps(line) + "\n")

    def png(self, items: Iterator[Item]) -> Iterator[int]:
        mine = itertools.islice(items, self.d.rank, None, self.d.world_size)
        while chunk := list(itertools.islice(mine, self.opts.batch_size)):
            names = [_png_name(it.index) for it in chunk]
            todo = [it for it, name in zip(chunk, names) if not (self.out / name).is_file()]
            if todo:
                for it, data in zip(todo, self.images(todo)):
                    atomic_write(self.out / _png_name(it.index), data)
            self.note([self.line(it, file=name) for it, name in zip(chunk, names)])
            yield len(chunk)

    def tar(self, items: Iterator[Item]) -> Iterator[int]:
        shards = itertools.groupby(enumerate(items), key=lambda p: p[0] // self.opts.shard_size)
        for s, group in shards:
            shard_items = (it for _, it in group)
            if s % self.d.world_size != self.d.rank:
                continue
            name = f"shard-{s:06d}.tar"
            if (self.out / name).is_file():
                lines = [self.line(it, file=_png_name(it.index), shard=name) for it in shard_items]
                self.note(lines)
                yield len(lines)
                continue
            lines = []
            with atomic_file(self.out / name) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                while batch := list(itertools.islice(shard_items, self.opts.batch_size)):
                    for it, data in zip(batch, self.images(batch)):
                        line = self.line(it, file=_png_name(it.index), shard=name)
                        key = f"{it.index:06d}"
                        for ext, blob in (("png", data), ("txt", it.prompt.encode()), ("json", json.dumps(line).encode())):
                            _add_member(tar, f"{key}.{ext}", blob)
                        lines.append(line)
                    yield len(batch)
            self.note(lines)


def _png_name(index: int) -> str:
    return f"{index:06d}.png"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A tar member with fixed owner, mode and time, so that the same items give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, _io.BytesIO(data))


def _part_name(rank: int) -> str:
    return f".manifest.rank-{rank:05d}.jsonl"


def _merge_manifest(out: Path) -> None:
    """The ranks' parts (each in index order) -> DIR/manifest.jsonl in index order, streamed; parts removed."""
    parts = sorted(out.glob(PART_GLOB))
    files = [open(p, encoding="utf-8") for p in parts]
    try:
        with atomic_file(out / MANIFEST_NAME) as f:
            for line in heapq.merge(*files, key=lambda ln: json.loads(ln)["index"]):
                f.write(line.encode())
    finally:
        for fh in files:
            fh.close()
    for p in parts:
        p.unlink(missing_ok=True)


def _prepare(out: Path, d: Dist) -> None:
    """Rank 0: make DIR; remove what a killed run left (temporary files, manifest parts)."""
    if not d.main:
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir {show(out)}: exists and is not a folder")
    if not out.resolve().parent.is_dir():
        raise UserError(f"--out-dir {show(out)}: folder {show(out.resolve().parent)} does not exist")
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"--out-dir {show(out)}: cannot write ({(e.strerror or str(e)).lower()})") from None
    for p in [*out.glob(".*.tmp"), *out.glob(PART_GLOB)]:
        p.unlink(missing_ok=True)


def generate_bulk(
    prompts: str, opts: BulkOptions, *, model: str | None = None, device: str | None = None,
    load: dict | None = None, log: Callable[[str], None] | None = None, progress: ProgressFn | None = None,
) -> dict:
    """Run a prompt file (see the module's docstring) on this process's share of the items; under
    torchrun every rank calls this. log and progress are called on rank 0 only. Returns, on every
    rank, {"items", "generated" (made by this run, all ranks), "seed", "rank"}."""
    if opts.format not in FORMATS:
        raise UserError(f"--format must be png or tar, got {opts.format!r}")
    for name, v in (("--batch-size", opts.batch_size), ("--shard-size", opts.shard_size)):
        if v < 1:
            raise UserError(f"{name} must be >= 1")
    lines = prompt_lines(prompts)
    d, dev = setup_distributed(device)
    try:
        if prompts == "-" and d.enabled:
            raise UserError("--prompts -: stdin cannot be shared by torchrun's ranks; save the prompts to a file")
        return _generate(lines, prompts, opts, d, dev, model, load or {}, log if d.main else None, progress if d.main else None)
    finally:
        shutdown(d)


def _generate(lines, name, opts, d, dev, model, load, log, progress) -> dict:
    say = log or (lambda m: None)
    out = Path(opts.out_dir)
    pipe = Pipeline.load(model, device=dev, log=say, **load)
    settings = resolved_settings(pipe, opts.size, opts.sampling)
    stored = _stored_run(out)
    seed = opts.seed
    if seed is None:
        seed = stored["seed"] if stored and isinstance(stored.get("seed"), int) else make_generator(None)[1]
        seed = from_rank0(seed, d, dev)
        if not stored:
            say(f"seed {seed}")
    total = sum(1 for _ in read_items(lines(), seed, name))  # also checks every line before any work
    if total == 0:
        raise UserError(f"--prompts {show(name)}: no prompts (one per line, or JSON lines with \"prompt\")")
    run = _run_settings(pipe, opts, seed, settings)
    _check_folder(out, run, stored)
    _prepare(out, d)
    barrier(d)
    if d.main and stored is None:
        atomic_write(out / RUN_NAME, (json.dumps(run, indent=1, sort_keys=True) + "\n").encode())
    local = 0
    with open(out / _part_name(d.rank), "w", encoding="utf-8") as part:
        writer = _Writer(pipe, opts, settings, d, part)
        steps = getattr(writer, opts.format)(read_items(lines(), seed, name))
        while True:  # every rank takes part in each count until all are done
            n = next(steps, None)
            local += n or 0
            if n is None:
                part.flush()
            done, generated, running = sum_over_ranks([local, writer.generated, int(n is not None)], d, dev)
            if progress is not None:
                progress(done, total)
            if not running:
                break
    barrier(d)
    if d.main:
        _merge_manifest(out)
    return {"items": total, "generated": generated, "seed": seed, "rank": d.rank}
