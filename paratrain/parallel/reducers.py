"""The one reducer protocol: how a flat gradient bucket is summed across workers.

:class:`~paratrain.parallel.data_parallel.BucketedAllreduceSync` calls
``reducer.describe_bucket(index, shapes)`` once per bucket, then, every step,
``reducer.launch(index, flat)`` when the bucket is ready during backward and later
``pending.wait(timeout)``, which returns the SUM over workers (shape and dtype of
``flat``). Launch and wait happen in bucket order on every rank, so collectives match.

This module holds the protocol (:class:`BucketReducer`, :class:`PendingReduce`) and the
plain reducer (:class:`AllreduceReducer`); the compressed ones (fp16/bf16 casts, 2bit,
top-k, PowerSGD) are in :mod:`paratrain.parallel.compressed`.
"""
from __future__ import annotations

import abc
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from paratrain.comm.accounting import ring_allreduce_bytes, tensor_nbytes
from paratrain.comm.process_group import group_size, launch_collective, wait_work


class PendingReduce:
    """A bucket's reduction in flight. ``wait(timeout)`` returns the sum over workers
    (computed once; a second call returns the same tensor)."""

    def __init__(self, finish: Callable[[float], torch.Tensor]) -> None:
        self._finish = finish
        self._result: torch.Tensor | None = None

    def wait(self, timeout: float) -> torch.Tensor:
        if self._result is None:
            self._result = self._finish(timeout)
            self._finish = None   # drop references to buffers
        return self._result


class BucketReducer(abc.ABC):
    """Sums one flat gradient bucket across the workers of ``group``.

    Counters, both cumulative: ``payload_bytes`` is the encoded size of this worker's
    gradients (what a parameter-server push would carry); ``bytes_sent`` is what this
    worker sends under the collective's algorithm (:mod:`paratrain.comm.accounting`).
    """

    #: True when the sum is linear in the gradients and computed in their own dtype,
    #: so gradients pre-multiplied by a power of two come out multiplied by exactly it
    #: (see :attr:`paratrain.parallel.base.GradientSync.linear`).
    linear: bool = False

    def __init__(self, group=None) -> None:
        self.group = group
        self.bytes_sent = 0
        self.payload_bytes = 0

    @property
    def num_workers(self) -> int:
        return group_size(self.group)

    def state_snapshot(self) -> object:
        """This worker's reducer state (error-feedback residuals, warm starts) as it is
        now, cheaply: a step that fails before its update puts it back with
        :meth:`restore_snapshot`, so a recomputed step does not count its gradient twice."""
        return None

    def restore_snapshot(self, snapshot: object) -> None:
        """Return to the state :meth:`state_snapshot` gave."""

    def on_regroup(self) -> None:
        """The workers summed over changed (an elastic group re-formed): drop state
        that must be equal on every worker and a newcomer cannot have (PowerSGD's
        warm-started ``Q``); per-worker state (residuals) stays."""

    def describe_bucket(self, bucket_index: int, shapes: Sequence[torch.Size]) -> None:
        """The shapes of the parameters packed (in order) into the bucket, given once
        before its first launch. PowerSGD compresses each matrix on its own; the
        other reducers need nothing."""

    @abc.abstractmethod
    def launch(self, bucket_index: int, flat: torch.Tensor) -> PendingReduce:
        """Start summing ``flat`` across workers (asynchronously where possible)."""

    def _count_all_reduce(self, tensor: torch.Tensor) -> None:
        nbytes = tensor_nbytes(tensor)
        self.payload_bytes += nbytes
        self.bytes_sent += ring_allreduce_bytes(nbytes, self.num_workers)

    def _all_reduce(self, tensor: torch.Tensor):
        if self.num_workers == 1:
            return None
        return launch_collective(lambda: dist.all_reduce(tensor, group=self.group, async_op=True), "all_reduce")

    def _all_gather(self, out: torch.Tensor, tensor: torch.Tensor):
        if self.num_workers == 1:
            out.copy_(tensor.reshape(-1))
            return None
        return launch_collective(lambda: dist.all_gather_single(out, tensor, group=self.group, async_op=True),
                                 "all_gather")


class AllreduceReducer(BucketReducer):
    """The plain reducer: an asynchronous in-place ``all_reduce`` (sum) of the bucket
    itself, so the gradients that view it receive the result with no copy."""

    linear = True

    def launch(self, bucket_index: int, flat: torch.Tensor) -> PendingReduce:
        work = self._all_reduce(flat)
        self._count_all_reduce(flat)
        what = f"allreduce of gradient bucket {bucket_index}"

        def finish(timeout: float) -> torch.Tensor:
            wait_work(work, timeout, what)
            return flat
        return PendingReduce(finish)
