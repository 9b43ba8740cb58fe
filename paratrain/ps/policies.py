"""When a server applies pushes and when it may answer a pull: sync, async and
bounded staleness as pluggable policies (ps-lite's request handles), not branches.

A policy sees one key slice at a time (:class:`SliceState`), counts every worker's
pushes as its clock, and calls ``apply(state, grad)`` (the optimizer, or "store the
sum") with a gradient and the scale to multiply it by, when an update is due.
"""
from __future__ import annotations

import abc
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from paratrain.errors import ConfigError
from paratrain.strategies import SERVER_KVSTORE_TYPES

#: (state, grad, scale); ``grad`` may be a read-only view of a received frame.
ApplyFn = Callable[["SliceState", torch.Tensor, float], None]


@dataclass
class SliceState:
    """One key slice on one server: its value, optimizer state and clocks."""

    #: a dense slice; a row range of a row-sparse key is a RowSliceState
    #: (:mod:`paratrain.ps.row_sparse`), whose pushes are RowGradients
    row_sparse: ClassVar[bool] = False

    value: torch.Tensor                 # flat, the key's dtype
    full_shape: tuple[int, ...]
    offset: int
    num_workers: int
    optimizer_state: dict = field(default_factory=dict)
    pushes: list[int] = field(default_factory=list)       # per worker: pushes received
    applied_rounds: int = 0
    late_dropped: int = 0               # sync with backup workers: pushes that came too late
    pending: list[deque] = field(default_factory=list)    # sync: queued pushes per worker
    lent: object = None                 # tracker of a zero-copy reply still reading value
    borrowed: bool = False              # value views memory it does not own (a received frame)

    def __post_init__(self) -> None:
        self.pushes = [0] * self.num_workers
        self.pending = [deque() for _ in range(self.num_workers)]

    @staticmethod
    def sum_round(pushes: list[tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, float]:
        """A sync round's pushes ``(grad, scale)``, in rank order, summed: the total and
        the scale the update applies to it once."""
        scales = {s for _, s in pushes}
        if len(scales) == 1:  # the usual case: sum, and let the update scale once
            if len(pushes) == 1:   # nothing to add: the (read-only) push itself
                return pushes[0][0], scales.pop()
            total = torch.add(pushes[0][0], pushes[1][0])   # one pass for the first two, in rank order
            for g, _ in pushes[2:]:
                total.add_(g)
            return total, scales.pop()
        total = pushes[0][0] * pushes[0][1]
        for g, s in pushes[1:]:
            total.add_(g, alpha=s)
        return total, 1.0

    def writable_value(self) -> torch.Tensor:
        """The value, safe to change in place: if a zero-copy reply may still be
        reading it, the state moves to a fresh copy first."""
        if self.borrowed or (self.lent is not None and not self.lent.done):
            self.value = self.value.clone()
        self.lent = None
        self.borrowed = False
        return self.value


class UpdatePolicy(abc.ABC):
    """How pushes become updates, and when pulls are answered."""

    name: str = "base"
    #: Async kinds have no round to sum, so without a server optimizer there is no
    #: meaningful value to store.
    needs_optimizer: bool = True

    @abc.abstractmethod
    def on_push(self, state: SliceState, worker: int, grad: torch.Tensor, scale: float, apply: ApplyFn) -> None:
        """Take ``grad * scale`` from ``worker``; ``grad`` is float32, possibly a
        read-only view of the received frame (copy before changing it)."""

    @abc.abstractmethod
    def blocking_workers(self, state: SliceState, worker: int) -> list[int]:
        """Workers whose pushes ``worker``'s pull still waits for (empty: answer now)."""

    def min_clock(self, state: SliceState) -> int:
        return min(state.pushes)

    def depart(self, worker: int) -> None:
        """``worker`` said goodbye: policies that wait for workers may stop waiting for it."""

    def apply_ready(self, state: SliceState, apply: ApplyFn) -> None:
        """Apply whatever became due without a new push (a worker departed, so a round
        that waited for it may now be complete). Default: nothing is ever held back."""


class SyncPolicy(UpdatePolicy):
    """MXNet ``dist_sync``: round ``i`` is applied once every worker pushed its i-th
    value, summed in rank order so the result does not depend on arrival order.

    With ``backup_workers=b`` a round is applied once ``N - b`` workers pushed it (the
    sum scaled by ``N / contributors``, so it is still a mean over the job's batch); a
    push for a round already applied is dropped (counted in ``late_dropped``) and its
    worker moves on to the current round, as in Chen et al.'s backup workers."""

    name = "dist_sync"
    needs_optimizer = False

    def __init__(self, backup_workers: int = 0):
        if isinstance(backup_workers, bool) or not isinstance(backup_workers, int) or backup_workers < 0:
            raise ConfigError(f"backup_workers={backup_workers!r} must be an int >= 0")
        self.backup_workers = backup_workers
        self.departed: set[int] = set()   # workers that said goodbye (backups: no longer awaited)

    def on_push(self, state: SliceState, worker: int, grad: torch.Tensor, scale: float, apply: ApplyFn) -> None:
        state.pushes[worker] += 1
        if state.pushes[worker] <= state.applied_rounds:   # its round went ahead without it
            state.pushes[worker] = state.applied_rounds
            state.late_dropped += 1
            return
        state.pending[worker].append((grad, scale))
        self.apply_ready(state, apply)

    def depart(self, worker: int) -> None:
        """With backup workers, a worker that finished is no longer waited for: a slow
        worker's last rounds, pushed after the others left, are applied with fewer."""
        if self.backup_workers:
            self.departed.add(worker)

    def apply_ready(self, state: SliceState, apply: ApplyFn) -> None:
        """Apply every round that has enough pushes."""
        needed = max(1, state.num_workers - max(self.backup_workers, len(self.departed)))
        while sum(1 for queue in state.pending if queue) >= needed:
            contributors = [rank for rank in range(state.num_workers) if state.pending[rank]]
            pushes = [state.pending[rank].popleft() for rank in contributors]
            total, round_scale = state.sum_round(pushes)
            if len(contributors) < state.num_workers:
                round_scale *= state.num_workers / len(contributors)
            apply(state, total, round_scale)
            state.applied_rounds += 1

    def blocking_workers(self, state: SliceState, worker: int) -> list[int]:
        # This worker's last round is applied once everyone reached it.
        target = state.pushes[worker]
        if state.applied_rounds >= target:
            return []
        return [rank for rank in range(state.num_workers) if state.pushes[rank] < target]


class AsyncPolicy(UpdatePolicy):
    """MXNet ``dist_async``: every push is applied on arrival."""

    name = "dist_async"

    def on_push(self, state: SliceState, worker: int, grad: torch.Tensor, scale: float, apply: ApplyFn) -> None:
        state.pushes[worker] += 1
        apply(state, grad, scale)
        state.applied_rounds += 1

    def blocking_workers(self, state: SliceState, worker: int) -> list[int]:
        return []


class StalenessPolicy(AsyncPolicy):
    """Stale synchronous parallel: async updates, but a worker that pushed ``c``
    times gets its pull answered only when every worker pushed at least
    ``c - staleness`` times, so no worker runs more than ``staleness`` clocks ahead
    of the slowest."""

    name = "dist_ssp"

    def __init__(self, staleness: int):
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ConfigError(f"staleness={staleness!r} must be an int >= 0")
        self.staleness = staleness
        self.departed: set[int] = set()

    def depart(self, worker: int) -> None:
        # A worker that finished (dynamic dispatch gave it no more batches) pushes no
        # more: the others must not wait for it until the timeout.
        self.departed.add(worker)

    def blocking_workers(self, state: SliceState, worker: int) -> list[int]:
        floor = state.pushes[worker] - self.staleness
        return [rank for rank in range(state.num_workers)
                if state.pushes[rank] < floor and rank not in self.departed]


def build_policy(name: str, staleness: int = 0, backup_workers: int = 0) -> UpdatePolicy:
    """The policy for a kvstore type name."""
    if backup_workers and name != "dist_sync":
        raise ConfigError(f"backup_workers={backup_workers} applies to dist_sync only, not {name!r}")
    if name == "dist_sync":
        return SyncPolicy(backup_workers)
    if name == "dist_async":
        return AsyncPolicy()
    if name == "dist_ssp":
        return StalenessPolicy(staleness)
    raise ConfigError(f"kvstore mode={name!r} is not known; choose one of: {', '.join(SERVER_KVSTORE_TYPES)}")
