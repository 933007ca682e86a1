"""Data-parallel training across processes: what ``torchrun`` tells each process, and the few collective
operations the trainer needs.

Under ``torchrun --nproc_per_node=N`` every process reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from
its environment and joins one process group: NCCL when it trains on a GPU (process ``LOCAL_RANK`` on GPU
``LOCAL_RANK``), gloo on CPU. Without those variables the trainer is one process and no group exists, so a
plain ``pacs-node train`` is unchanged. Rank 0 alone writes checkpoints, logs and progress bars.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run: ``rank`` of ``world`` processes, on ``device``."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over all processes (itself on one)."""
        if not self.distributed:
            return value
        out = value.detach().clone().float()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one: collective decisions (a time budget ran out)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str) -> DistContext:
    """Join the process group ``torchrun`` describes (if any); ``device`` is ``auto``, ``cpu``, ``cuda`` or
    ``cuda:N`` (a GPU index is ignored under torchrun: each process takes GPU ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if world > 1:
        where = torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")
        if kind == "cuda":
            torch.cuda.set_device(where)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world)
        return DistContext(rank, world, local_rank, where)
    return DistContext(0, 1, 0, torch.device(device) if device != "auto" else torch.device(kind))
