"""Data parallelism for the trainer: process group setup, sharding, and the few collectives it needs.

Under torchrun (WORLD_SIZE > 1 in the environment) `init()` joins the process
group (gloo on CPU, NCCL on CUDA); otherwise everything here is the trivial
single-process version, so the trainer has one code path.

    dp = parallel.init()
    mine = dp.shard(rows)                      # this rank's contiguous share
    everyone = dp.gather(obj)                  # [obj of rank 0, obj of rank 1, ...]
    total = dp.sum([a, b])                     # elementwise sums over ranks (float64)
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """This rank's contiguous share of `items`; shares differ in length by at most one, in rank order."""
        n = len(items)
        return list(items[self.rank * n // self.world:(self.rank + 1) * n // self.world])

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable Python data), in rank order."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: Sequence[float]) -> list[float]:
        """Elementwise sum over ranks of a list of numbers, in float64."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def max(self, values: Sequence[float]) -> list[float]:
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(device: torch.device | str = "cpu") -> DataParallel:
    """Joins torchrun's process group when WORLD_SIZE > 1 (gloo for CPU, NCCL for CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DataParallel()
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return DataParallel(rank=dist.get_rank(), world=dist.get_world_size())


def shutdown() -> None:
    """Leaves the process group. First frees what may still hold it (a DistributedDataParallel
    module left in a reference cycle goes only when gc runs), then waits for every rank: a rank
    that tore gloo down while its peer still used it, or exited with gloo's threads alive, died
    of SIGABRT ("terminate called without an active exception") in about 1 run of 30 in CI."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
