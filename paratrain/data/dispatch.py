"""Dynamic dispatch of batches from a shared queue, for asynchronous training.

The queue is a counter in the job's TCP store: each worker atomically takes the next
unused slice of the epoch's (seeded) permutation, so a worker twice as fast processes
about twice as many batches, every sample is still seen exactly once per epoch, and a
dead worker's share is simply taken by the others. Used by async strategies only: in
sync modes every worker must take part in every round anyway.
"""
from __future__ import annotations

from dataclasses import dataclass

from paratrain.data.sampler import ShardedBatchSampler


@dataclass
class DynamicBatchSampler:
    """Same interface as :class:`ShardedBatchSampler`; batches come from ``store``."""

    store: object              # a torch.distributed Store shared by all workers
    dataset_len: int
    global_batch: int
    world: int
    seed: int = 0
    key_prefix: str = "dispatch"

    def __post_init__(self) -> None:
        # Reuse the sharded sampler's validation and its seeded permutation.
        self._order = ShardedBatchSampler(self.dataset_len, self.global_batch, 0, self.world, self.seed)
        self.unit = self.global_batch // self.world

    def __len__(self) -> int:
        """Expected batches per worker per epoch (progress bars); the real count varies."""
        return -(-self.dataset_len // self.global_batch)

    def batches(self, epoch: int, start_batch: int = 0):
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
