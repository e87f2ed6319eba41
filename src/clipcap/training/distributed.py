"""Data-parallel training under ``torchrun``: the process group, rank-0-only work, reductions.

``torchrun --nproc_per_node N -m clipcap.cli train`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
without them everything here is a no-op and training runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes (identity in one process)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64,
                              device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: Any) -> list[Any] | None:
        """Every process's ``value``, by rank, on rank 0 (None on the others); ``[value]`` in one process."""
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (idempotent)."""
    context = current_context()
    if context.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return context


def current_context() -> DistContext:
    """The context of this process as ``torchrun`` describes it (no process group needed)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    return DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
