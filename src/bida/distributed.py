"""Distributed data parallel through ``torchrun`` (nccl on GPU, gloo on CPU).

:func:`init_from_env` reads torchrun's environment; without it every method is a cheap
no-op, so the trainer has one code path. Per-class prototype sums and counts are
all-reduced with a differentiable all-reduce, so W processes with batch b build the same
prototypes as one process with batch W*b.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .prototypes import class_sums, prototypes_from_sums


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        ids = [self.local_rank] if self.device is not None and self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def shard(self, dataset):
        """Every world_size-th item from this rank (evaluation and pseudo labels)."""
        if not self.enabled:
            return dataset
        return torch.utils.data.Subset(dataset, list(range(self.rank, len(dataset), self.world_size)))

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if not self.enabled:
            return tensor
        t = tensor.to(self.device or "cpu")
        dist.all_reduce(t)
        return t.to(tensor.device)

    def prototype_reducer(self, num_classes: int) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        """Global prototypes from all-reduced class sums and counts (None when single process)."""
        if not self.enabled:
            return None
        from torch.distributed.nn.functional import all_reduce as diff_all_reduce

        def reduce(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
            sums, counts = class_sums(features, labels, num_classes)
            return prototypes_from_sums(diff_all_reduce(sums), diff_all_reduce(counts.detach().clone()))

        return reduce


def init_from_env() -> DistContext:
    """Join the process group that torchrun describes, or a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)
