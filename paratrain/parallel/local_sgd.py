"""Local SGD: every worker steps on its own gradients and the models are averaged
every ``sync_every`` steps (Lin et al. 2018, "Don't use large mini-batches, use local
SGD"). Communication falls by a factor of ``sync_every`` against per-step allreduce;
optimizer state (momentum) stays local, as in the paper.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from paratrain.errors import ConfigError
from paratrain.parallel.base import GradientSync, scale_to_local_batch
from paratrain.comm.accounting import ring_allreduce_bytes, tensor_nbytes
from paratrain.comm.process_group import group_size, wait_work


class LocalSGDSync(GradientSync):
    """Average parameters (and any buffers given) across workers every ``sync_every``
    optimizer steps; between averages each worker updates alone.

    ``reduce(scale)`` only rescales the local gradient: the Trainer's ``scale`` is
    1 / global batch, and a worker stepping alone must divide by its own batch, so the
    gradient is multiplied by ``scale * num_workers``.
    """

    linear = True   # reduce only rescales the local gradient

    def __init__(self, sync_every: int, *, group=None, buffers: Sequence[torch.Tensor] = (),
                 timeout_s: float = 60.0) -> None:
        super().__init__()
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ConfigError(f"sync_every={sync_every!r} must be an integer >= 1")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s={timeout_s!r} must be > 0")
        self.sync_every = sync_every
        self.group = group
        self.timeout_s = timeout_s
        self._buffers = list(buffers)
        self._params: list[torch.nn.Parameter] = []
        self._bytes_sent = 0      # counted as the allreduce path counts: ring, 2(N-1)/N
        self.payload_bytes = 0    # the parameters' own size, once per average
        self.steps = 0
        self.averages = 0
        # The Trainer copies rank 0's buffers after every step unless told not to;
        # buffers handed to us are averaged with the parameters instead.
        self.buffers_follow_rank0 = not self._buffers

    @property
    def num_workers(self) -> int:
        return group_size(self.group)

    def attach(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Keep the parameters and start every worker from rank 0's values."""
        self._params = list(params)
        if self.num_workers > 1:
            flat = self._flatten()
            work = dist.broadcast(flat, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                  group=self.group, async_op=True)
            wait_work(work, self.timeout_s, "broadcast of the initial parameters from rank 0")
            self._unflatten(flat)

    def reduce(self, scale: float) -> None:
        scale_to_local_batch(self._params, scale, self.num_workers)

    def after_step(self) -> None:
        """Count the step; every ``sync_every``-th one averages the models."""
        self.steps += 1
        if self.steps % self.sync_every == 0:
            self.average_now()

    def consolidate(self) -> None:
        """Average now unless the last step already did: evaluation and checkpoints
        at an epoch's end then see the one agreed model."""
        if self.steps % self.sync_every:
            self.average_now()

    def average_now(self) -> None:
        """Average parameters (and buffers) across workers now, e.g. before evaluating
        or saving when the step count is not a multiple of ``sync_every``."""
        if self.num_workers == 1:
            return
        flat = self._flatten()
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        nbytes = tensor_nbytes(flat)
        self.payload_bytes += nbytes
        self._bytes_sent += ring_allreduce_bytes(nbytes, self.num_workers)
        wait_work(work, self.timeout_s, f"all_reduce of the parameters (model average {self.averages + 1})")
        flat.div_(self.num_workers)
        self._unflatten(flat)
        self.averages += 1

    def _tensors(self) -> list[torch.Tensor]:
        # Integer buffers (BatchNorm's num_batches_tracked) cannot be averaged; they
        # advance identically on every worker anyway.
        return [p.data for p in self._params] + [b for b in self._buffers if b.is_floating_point()]

    def _flatten(self) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).float() for t in self._tensors()])

    def _unflatten(self, flat: torch.Tensor) -> None:
        offset = 0
        for tensor in self._tensors():
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent
