"""Processes under torchrun: which rank this is, joining the process group (nccl on CUDA, gloo on the
CPU; one device per rank through LOCAL_RANK), and the few collectives that training and bulk
generation share. Outside torchrun (WORLD_SIZE unset or 1) every call is a no-op for one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from unclip_cli.device import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str | None) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; join the process group (nccl on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist

    d = Dist(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


def shutdown(d: Dist) -> None:
    """Leave the process group (if this process joined one)."""
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def sum_over_ranks(values: list[int], d: Dist, device: torch.device) -> list[int]:
    """Integers summed element-wise over the processes (one all-reduce; on `device` for nccl)."""
    if not d.enabled:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def from_rank0(value: int, d: Dist, device: torch.device) -> int:
    """Rank 0's integer, on every process (one broadcast)."""
    if not d.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())
