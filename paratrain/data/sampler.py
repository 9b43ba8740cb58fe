"""Deterministic sharding of global batches across workers.

Each epoch draws one permutation of the dataset from ``(seed, epoch)``. The permutation
is cut into global batches, and worker ``r`` of ``W`` takes the r-th contiguous slice of
each global batch. So every sample is seen exactly once per epoch across all workers,
and the data order of a global batch does not depend on the number of workers: 4
workers x 16 see exactly the samples 1 worker x 64 sees, step by step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from paratrain.errors import ConfigError


def shard_bounds(batch_len: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of worker ``rank``'s slice of a global batch of ``batch_len``.

    Slices differ in length by at most one (only the last, short batch of an epoch
    can be uneven)."""
    base, extra = divmod(batch_len, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass
class ShardedBatchSampler:
    """Yields this worker's index tensor for each global batch of an epoch."""

    dataset_len: int
    global_batch: int
    rank: int = 0
    world: int = 1
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise ConfigError(f"batch size {self.global_batch} must be >= 1")
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ConfigError(f"rank {self.rank} must be in [0, {self.world})")
        if self.global_batch % self.world:
            raise ConfigError(f"global batch size {self.global_batch} is not divisible by "
                              f"the number of workers {self.world}; use a multiple of {self.world}")
        if self.dataset_len < 1:
            raise ConfigError("the dataset is empty")

    def __len__(self) -> int:
        return -(-self.dataset_len // self.global_batch)

    def global_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_len, generator=gen)

    def batches(self, epoch: int, start_batch: int = 0):
        """``(global_batch_len, local_indices)`` for each batch from ``start_batch`` on
        (resume starts mid-epoch at the saved position)."""
        order = self.global_order(epoch)
        for index in range(start_batch, len(self)):
            batch = order[index * self.global_batch:(index + 1) * self.global_batch]
            start, end = shard_bounds(len(batch), self.rank, self.world)
            yield len(batch), batch[start:end]
