"""`generate --prompts FILE --out-dir DIR`: the Typer side of generation at scale (unclip_cli/bulk.py):
the options gathered, notes on stderr and one progress bar with the global count (rank 0 only)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from unclip_cli.cli.common import say


@contextlib.contextmanager
def item_progress(quiet: bool) -> Iterator:
    """Yields progress(done, total) for bulk.generate_bulk (None when quiet); the rich bar is made on the
    first call, so only the rank that reports (rank 0) draws one."""
    if quiet:
        yield None
        return
    with contextlib.ExitStack() as stack:
        state: dict = {}

        def update(done: int, total: int) -> None:
            if "bar" not in state:
                from rich.console import Console
                from rich.progress import (
                    BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
                )

                console = Console(stderr=True)
                state["bar"] = bar = stack.enter_context(Progress(
                    TextColumn("images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal,
                ))
                state["task"] = bar.add_task("images", total=total)
            state["bar"].update(state["task"], completed=done, total=total)

        yield update


def generate_from_file(
    prompts: str, out_dir: str, *, fmt: str, batch_size: int, shard_size: int, size: int, seed: int | None,
    model: str | None, device: str | None, quiet: bool, sampling: dict, load: dict | None = None,
) -> None:
    """Run `generate --prompts FILE --out-dir DIR` (see bulk.py); under torchrun on every rank."""
    from unclip_cli.bulk import BulkOptions, generate_bulk
    from unclip_cli.io import show

    opts = BulkOptions(out_dir=out_dir, format=fmt, batch_size=batch_size, shard_size=shard_size, size=size, seed=seed,
                       sampling=sampling)
    with item_progress(quiet) as progress:
        done = generate_bulk(prompts, opts, model=model, device=device, load=load, log=say, progress=progress)
    if done["rank"] == 0:
        made, total = done["generated"], done["items"]
        say(f"{total} items in {show(out_dir)}: {made} made now, {total - made} already there; see manifest.jsonl")
