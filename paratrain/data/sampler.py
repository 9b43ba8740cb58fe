"""Deterministic sharding of global batches across workers.

Each epoch draws one permutation of the dataset from ``(seed, epoch)``. The permutation
is cut into global batches, and worker ``r`` of ``W`` takes the r-th contiguous slice of
each global batch. So every sample is seen exactly once per epoch across all workers,
and the data order of a global batch does not depend on the number of workers: 4
workers x 16 see exactly the samples 1 worker x 64 sees, step by step.

:class:`ShardedBatchSampler` is a ``torch.utils.data.Sampler`` of index lists, so a
``DataLoader(dataset, batch_sampler=sampler)`` of your own loads exactly what ``fit``
would; call :meth:`~ShardedBatchSampler.set_epoch` before each epoch.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from paratrain.errors import ConfigError


def shard_bounds(batch_len: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of worker ``rank``'s slice of a global batch of ``batch_len``.

    Slices differ in length by at most one (only the last, short batch of an epoch
    can be uneven)."""
    base, extra = divmod(batch_len, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedBatchSampler(Sampler[list[int]]):
    """This worker's indices of each global batch of an epoch."""

    def __init__(self, dataset_len: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if global_batch < 1:
            raise ConfigError(f"batch size {global_batch} must be >= 1")
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"rank {rank} must be in [0, {world})")
        if global_batch % world:
            raise ConfigError(f"global batch size {global_batch} is not divisible by "
                              f"the number of workers {world}; use a multiple of {world}")
        if dataset_len < 1:
            raise ConfigError("the dataset is empty")
        self.dataset_len, self.global_batch, self.rank, self.world = dataset_len, global_batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        """Global batches per epoch."""
        return -(-self.dataset_len // self.global_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` next, from its batch ``start_batch`` (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def global_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_len, generator=gen)

    def global_batch_len(self, index: int) -> int:
        """Samples in global batch ``index`` (the last one of an epoch may be short)."""
        return min(self.global_batch, self.dataset_len - index * self.global_batch)

    def global_len(self, index: int, local_len: int) -> int:
        """The samples of the whole step this worker's batch ``index`` is part of."""
        return self.global_batch_len(index)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """``(global_batch_len, local_indices)`` for each batch from ``start_batch`` on."""
        order = self.global_order(epoch)
        for index in range(start_batch, len(self)):
            batch = order[index * self.global_batch:(index + 1) * self.global_batch]
            start, end = self.cut(epoch, index, len(batch))
            yield len(batch), batch[start:end]

    def cut(self, epoch: int, index: int, batch_len: int) -> tuple[int, int]:
        """[start, end) of this worker's slice of global batch ``index`` of ``epoch``."""
        return shard_bounds(batch_len, self.rank, self.world)

    def __iter__(self) -> Iterator[list[int]]:
        for _, indices in self.batches(self.epoch, self.start_batch):
            yield indices.tolist()
