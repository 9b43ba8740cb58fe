"""Sharding for elastic groups (``--min-workers``): the global batches are the same
samples whatever happens; each is cut over the workers alive when it is cut.

"Keep the global batch": while a worker is missing, the survivors take over its share
of every global batch, so every sample is still seen once per epoch and each step's
gradient is the mean over the same samples as in a run without failures.
:class:`ElasticBatchSampler` cuts each batch by the group's membership at the moment
it is cut and remembers that cut, so the strategy can tell whether a batch loaded
ahead still matches the group it trains in, and load the right slice if not.
"""
from __future__ import annotations

from typing import Callable

import torch

from paratrain.data.sampler import ShardedBatchSampler, shard_bounds

#: Cuts remembered (batches a loader may have prefetched).
REMEMBERED_CUTS = 64


class ElasticBatchSampler(ShardedBatchSampler):
    """A :class:`ShardedBatchSampler` whose ``(rank, world)`` is ``membership()`` at
    the time each batch is cut (slices then differ by at most one sample)."""

    def __init__(self, dataset_len: int, global_batch: int, membership: Callable[[], tuple[int, int]],
                 seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(dataset_len, global_batch, 0, 1, seed, shuffle)
        self.membership = membership
        self._cuts: dict[tuple[int, int], tuple[int, int]] = {}
        self._order: tuple[int, torch.Tensor] | None = None

    def cut(self, epoch: int, index: int, batch_len: int) -> tuple[int, int]:
        rank, world = self.membership()
        self._cuts[(epoch, index)] = (rank, world)
        while len(self._cuts) > REMEMBERED_CUTS:
            self._cuts.pop(next(iter(self._cuts)))
        return shard_bounds(batch_len, rank, world)

    def cut_of(self, epoch: int, index: int) -> tuple[int, int] | None:
        """The ``(rank, world)`` batch ``index`` of ``epoch`` was last cut for."""
        return self._cuts.get((epoch, index))

    def shard(self, epoch: int, index: int, rank: int, world: int) -> torch.Tensor:
        """Worker ``rank`` of ``world``'s sample indices of global batch ``index``."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.global_order(epoch))
        batch = self._order[1][index * self.global_batch:(index + 1) * self.global_batch]
        start, end = shard_bounds(len(batch), rank, world)
        return batch[start:end]
