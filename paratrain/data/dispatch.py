"""Dynamic dispatch of batches from a shared queue, for asynchronous training.

The queue is a counter in the job's TCP store: each worker atomically takes the next
unused slice of the epoch's (seeded) permutation, so a worker twice as fast processes
about twice as many batches, every sample is still seen exactly once per epoch, and a
dead worker's share is simply taken by the others. Used by async strategies only: in
sync modes every worker must take part in every round anyway.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from paratrain.data.sampler import ShardedBatchSampler


class DynamicBatchSampler(Sampler[list[int]]):
    """The :class:`ShardedBatchSampler` interface; batches come from ``store``, a
    torch.distributed Store shared by all workers."""

    def __init__(self, store, dataset_len: int, global_batch: int, world: int, seed: int = 0,
                 key_prefix: str = "dispatch") -> None:
        # Reuse the sharded sampler's validation and its seeded permutation.
        self._order = ShardedBatchSampler(dataset_len, global_batch, 0, world, seed)
        self.store, self.dataset_len, self.global_batch, self.world = store, dataset_len, global_batch, world
        self.key_prefix = key_prefix
        self.unit = global_batch // world
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        """Expected batches per worker per epoch (progress bars); the real count varies."""
        return -(-self.dataset_len // self.global_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_len(self, index: int, local_len: int) -> int:
        """A slice stands for a step of the whole job: its length times the workers
        (what the gradient is normalised by)."""
        return local_len * self.world

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """``(global_len, local_indices)`` until the epoch's queue is empty. ``global_len``
        is this slice scaled to the whole job (it normalises the gradient)."""
        order = self._order.global_order(epoch)
        units = -(-self.dataset_len // self.unit)
        while True:
            index = self.store.add(f"{self.key_prefix}/epoch{epoch}", 1) - 1
            if index >= units:
                return
            indices = order[index * self.unit:(index + 1) * self.unit]
            yield len(indices) * self.world, indices

    def __iter__(self) -> Iterator[list[int]]:
        for _, indices in self.batches(self.epoch, self.start_batch):
            yield indices.tolist()
