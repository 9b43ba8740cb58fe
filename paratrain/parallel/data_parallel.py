"""Data parallelism: every worker holds the whole model; gradients are summed across
workers in buckets that start communicating during backward.

Buckets are filled in reverse parameter order (roughly the order backward produces
gradients) and always launched in bucket order, on every rank, so collectives match
even when some parameters get no gradient in a step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch.autograd import Variable

from paratrain.comm.accounting import tensor_nbytes
from paratrain.errors import ConfigError
from paratrain.parallel.base import GradientSync, nearest_power_of_two
from paratrain.parallel.reducers import BucketReducer, PendingReduce

# DDP's bucket sizes: a small first bucket leaves while the rest of backward runs; big
# later ones amortise the per-collective latency (measurements: docs/internals.md).
FIRST_BUCKET_MB = 1.0
BUCKET_CAP_MB = 25.0


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    offsets: list[int]
    flat: torch.Tensor
    ready: set[int] = field(default_factory=set)   # indices into params
    pending: PendingReduce | None = None
    launch_s: float = 0.0
    done_s: float | None = None


def assign_buckets(sizes_bytes: Sequence[int], first_cap: float = FIRST_BUCKET_MB * 2**20,
                   cap: float = BUCKET_CAP_MB * 2**20) -> list[list[int]]:
    """Group parameter indices (given in the order they should be reduced) into buckets;
    a bucket closes as soon as it holds ``cap`` bytes (``first_cap`` for the first), so
    its last tensor may take it past the cap. A pure function.

    This is DDP's rule. Closing a bucket *before* a tensor that would overflow it
    instead leaves a first bucket of only the tiny last layers when the next weight is
    big (MLP 784-1024-1024-10: 41 KB), and pushes that weight into the bucket that is
    launched when backward ends, where it cannot overlap with anything."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index, nbytes in enumerate(sizes_bytes):
        current.append(index)
        size += nbytes
        if size >= (first_cap if not buckets else cap):
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


class BucketedAllreduceSync(GradientSync):
    """Sum gradients across workers, overlapping communication with backward."""

    def __init__(self, reducer: BucketReducer, *, num_workers: int, timeout_s: float = 60.0,
                 first_bucket_mb: float = FIRST_BUCKET_MB, bucket_cap_mb: float = BUCKET_CAP_MB) -> None:
        super().__init__()
        if first_bucket_mb <= 0 or bucket_cap_mb <= 0:
            raise ConfigError(f"bucket sizes must be > 0 MB; got first={first_bucket_mb}, cap={bucket_cap_mb}")
        self.reducer = reducer
        self.linear = reducer.linear
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self._first_cap = first_bucket_mb * 2**20
        self._cap = bucket_cap_mb * 2**20
        self._buckets: list[_Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}   # id(param) -> (bucket, slot)
        self._next_launch = 0
        self._end_of_backward_queued = False
        self._summed = False   # every bucket holds its sum (backward ended, reduce is due)
        # Linear reducers: the hooks multiply each gradient by this power of two as they
        # copy it into its bucket (the last step's scale, rounded), so reduce() need not
        # pass over the buckets again when the scale is unchanged. Exact: scaling by a
        # power of two commutes with rounding, so the sum and the remaining factor give
        # bitwise the result of scaling the sum (barring underflow below 2**-126).
        self._prescale = 1.0
        self._step_snapshot = reducer.state_snapshot()   # what abandon_step restores

    def attach(self, params: Sequence[torch.nn.Parameter]) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            for param in params:   # every worker starts from rank 0's weights
                dist.broadcast(param.data, src=0)
        ordered = list(reversed(list(params)))
        sizes = [tensor_nbytes(p) for p in ordered]
        for indices in assign_buckets(sizes, self._first_cap, self._cap):
            self._add_bucket([ordered[i] for i in indices])
        self._hook_gradients(ordered, self._on_grad_ready)

    def _add_bucket(self, bucket_params: list[torch.nn.Parameter]) -> None:
        dtypes = {p.dtype for p in bucket_params}
        if len(dtypes) != 1:   # keep it simple: one dtype per model is the common case
            raise ConfigError(f"parameters of mixed dtypes {sorted(map(str, dtypes))} in one bucket; "
                              "cast the model to one dtype (master weights stay fp32 under --amp)")
        offsets, total = [], 0
        for param in bucket_params:
            offsets.append(total)
            total += param.numel()
        flat = torch.zeros(total, dtype=bucket_params[0].dtype, device=bucket_params[0].device)
        index = len(self._buckets)
        self.reducer.describe_bucket(index, [p.shape for p in bucket_params])
        for slot, param in enumerate(bucket_params):
            self._where[id(param)] = (index, slot)
        self._buckets.append(_Bucket(bucket_params, offsets, flat))
        for slot in range(len(bucket_params)):
            self._point_grad_at_bucket(self._buckets[-1], slot)

    @staticmethod
    def _grad_view(bucket: _Bucket, slot: int) -> torch.Tensor:
        param, start = bucket.params[slot], bucket.offsets[slot]
        return bucket.flat[start:start + param.numel()].view_as(param)

    def _point_grad_at_bucket(self, bucket: _Bucket, slot: int, factor: float = 1.0) -> None:
        """Make ``param.grad`` a view into the bucket that is reduced in place, so the
        optimizer reads the result with no copy out. ``zero_grad`` sets grads to None:
        backward then hands over a fresh tensor (no memset, no in-place add) that is
        copied into the bucket once, here, times ``factor`` (as DDP divides while copying)."""
        param, view = bucket.params[slot], self._grad_view(bucket, slot)
        if param.grad is None:
            view.zero_()
        elif param.grad.data_ptr() != view.data_ptr():
            if factor == 1.0:
                view.copy_(param.grad)
            else:
                torch.mul(param.grad, factor, out=view)
        else:
            if factor != 1.0:   # gradients kept from before (not zeroed): scale in place
                view.mul_(factor)
            return
        param.grad = view

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        if not self.sync_enabled:
            return
        if not self._end_of_backward_queued:
            # As DDP: when this backward ends, wait for every bucket, so whatever reads
            # or changes the gradients after it (clipping) sees the sums on every rank.
            Variable._execution_engine.queue_callback(self._finish_backward)
            self._end_of_backward_queued = True
        index, slot = self._where[id(param)]
        bucket = self._buckets[index]
        if bucket.pending is not None or slot in bucket.ready:
            raise RuntimeError("backward ran twice before trainer.step(); accumulate gradients "
                               "inside `with trainer.no_sync():` (or use --accumulate)")
        self._fill(bucket, slot)
        if len(bucket.ready) == len(bucket.params):
            self._launch_ready()

    def _fill(self, bucket: _Bucket, slot: int) -> None:
        self._point_grad_at_bucket(bucket, slot, self._prescale)   # unused this step: zeros
        bucket.ready.add(slot)

    def _launch_ready(self) -> None:
        # Launch strictly in bucket order so every rank issues the same collectives.
        while self._next_launch < len(self._buckets):
            bucket = self._buckets[self._next_launch]
            if len(bucket.ready) < len(bucket.params):
                return
            bucket.launch_s = time.perf_counter()
            bucket.pending = self.reducer.launch(self._next_launch, bucket.flat)
            self._next_launch += 1

    def _finish_backward(self) -> None:
        self._end_of_backward_queued = False
        with self.timeline.span("gradient wait", "wait"):
            self._sum_buckets()

    def _sum_buckets(self) -> None:
        """Launch what is left (parameters whose hooks never fired this step give
        zeros), wait for every bucket and leave each sum in it."""
        for bucket in self._buckets:
            for slot in range(len(bucket.params)):
                if slot not in bucket.ready:
                    self._fill(bucket, slot)
        self._launch_ready()
        for index, bucket in enumerate(self._buckets):
            summed = bucket.pending.wait(self.timeout_s)
            self.timeline.complete(f"allreduce bucket {index}", "comm", bucket.launch_s, time.perf_counter(),
                                   tid="comm", bytes=tensor_nbytes(bucket.flat))
            if summed is not bucket.flat:   # a compressed reducer returns a new tensor
                bucket.flat.copy_(summed)
        self._summed = True

    def reduce(self, scale: float) -> None:
        if not self._summed:   # no hook fired (every parameter unused), or sync was off
            self._sum_buckets()
        remaining = scale / self._prescale   # exact: _prescale is a power of two
        for bucket in self._buckets:
            if remaining != 1.0:
                bucket.flat.mul_(remaining)   # every param.grad is a view of it
            bucket.ready.clear()
            bucket.pending = None
        self._next_launch = 0
        self._summed = False
        if self.linear and scale > 0:
            self._prescale = nearest_power_of_two(scale)

    def set_group(self, group) -> None:
        self.reducer.group = group
        self.num_workers = self.reducer.num_workers if group is not None else self.num_workers
        if group is not None:
            self.reducer.on_regroup()

    def begin_step(self) -> None:
        self._step_snapshot = self.reducer.state_snapshot()

    def abandon_step(self) -> None:
        """Forget every bucket's progress and pending reduction (no ``Work`` may keep a
        failed group's sockets open) and the reducer's state changes of this step."""
        for bucket in self._buckets:
            bucket.ready.clear()
            bucket.pending = None
        self._next_launch = 0
        self._end_of_backward_queued = False
        self._summed = False
        self.reducer.restore_snapshot(self._step_snapshot)

    @property
    def bytes_sent(self) -> int:
        return self.reducer.bytes_sent


class LocalSync(GradientSync):
    """One worker: gradients only need scaling."""

    linear = True

    def attach(self, params: Sequence[torch.nn.Parameter]) -> None:
        self._params = list(params)

    def reduce(self, scale: float) -> None:
        if scale != 1.0:
            grads = [param.grad for param in self._params if param.grad is not None]
            torch._foreach_mul_(grads, scale)   # one fused pass, as torch.optim does
