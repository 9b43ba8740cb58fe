"""``allreduce``: no servers; a push starts a collective sum across all workers and a
pull waits for it. Initial values are broadcast from rank 0, so every worker starts
from the same state."""
from __future__ import annotations

import torch
import torch.distributed as dist

from paratrain.comm.accounting import ring_allreduce_bytes, tensor_nbytes
from paratrain.comm.process_group import init_process_group
from paratrain.env import DistEnv, read_env
from paratrain.errors import ConfigError
from paratrain.kvstore.base import (Handle, Key, KVStore, TensorOrList, check_key, copy_out, init_value, per_key,
                                    sum_values)
from paratrain.kvstore.row_sparse import refuse_sparse


class AllreduceKVStore(KVStore):
    type = "allreduce"

    def __init__(self, env: DistEnv | None = None, group=None) -> None:
        self._env = env or read_env()
        if self._env.distributed and not dist.is_initialized():
            init_process_group(self._env)   # like MXNet's create('dist_*'): join from the environment
        self._start(group, dist.get_world_size(group) if dist.is_initialized() else 1,
                        dist.get_rank(group) if dist.is_initialized() else 0)

    def _start(self, group, num_workers: int, rank: int) -> None:
        self._group, self._num_workers, self._rank = group, num_workers, rank
        self._store: dict[Key, torch.Tensor] = {}
        self._pending: dict[Key, tuple[torch.Tensor, object]] = {}
        self._bytes_sent = 0

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent

    @per_key("value")
    def init(self, key: Key, value: TensorOrList) -> None:
        """Every worker calls init; rank 0's value wins (broadcast)."""
        value = init_value(check_key(key), value)
        refuse_sparse(f"init of key {key!r} on kvstore 'allreduce' (dense keys only)", value)
        stored = value.detach().clone()
        if self._num_workers > 1:
            dist.broadcast(stored, group=self._group, group_src=0)
        self._store[check_key(key)] = stored

    @per_key("value")
    def push(self, key: Key, value: TensorOrList, priority: int = 0) -> Handle:
        check_key(key)
        if key in self._pending:  # a second push before the pull: fold the first one in
            self._wait_pending(key, self._env.timeout_s)
        total = sum_values(value)
        total = total.clone() if total is value else total
        if self._num_workers == 1:
            self._pending[key] = (total, None)
            return Handle.completed()
        work = dist.all_reduce(total, group=self._group, async_op=True)
        self._bytes_sent += ring_allreduce_bytes(tensor_nbytes(total), self._num_workers)
        self._pending[key] = (total, work)
        return Handle(lambda timeout: self._wait_pending(key, timeout), f"allreduce of key {key!r}")

    def _wait_pending(self, key: Key, timeout: float | None) -> torch.Tensor:
        total, work = self._pending.pop(key)
        if work is not None:
            # Bounded by the process group's timeout (PARATRAIN_TIMEOUT), set at init;
            # polling instead would steal the CPU the other workers compute on.
            try:
                work.wait()
            except RuntimeError as exc:
                raise TimeoutError(f"allreduce of key {key!r} failed or timed out waiting for "
                                   f"the other {self._num_workers - 1} workers: {exc}") from exc
        self._store[key] = total
        return total

    @per_key("out")
    def pull(self, key: Key, out: TensorOrList, priority: int = 0, block: bool = True) -> Handle:
        check_key(key)

        def finish(timeout: float | None) -> torch.Tensor:
            value = self._wait_pending(key, timeout) if key in self._pending else self._store.get(key)
            if value is None:
                raise ConfigError(f"key {key!r} was never initialised or pushed")
            copy_out(value, out)
            return value

        handle = Handle(finish, f"pull of key {key!r}")
        if block:
            handle.wait(self._env.timeout_s)
        return handle

    @per_key("value", "out")
    def pushpull(self, key: Key, value: TensorOrList, out: TensorOrList | None = None,
                 priority: int = 0, block: bool = True) -> Handle:
        return super().pushpull(key, value, out, priority, block)

    def barrier(self) -> None:
        if self._num_workers > 1:
            dist.barrier(group=self._group)


class ElasticAllreduceKVStore(AllreduceKVStore):
    """``allreduce`` over an elastic group (:mod:`paratrain.comm.elastic`), whose
    members change between steps: collectives run on the group its owner hands over
    with :meth:`set_group`; until the first one, ``num_workers`` is the job's full size."""

    def __init__(self, num_workers: int, env: DistEnv | None = None) -> None:
        self._env = env or read_env()
        self._start(None, num_workers, self._env.rank)

    def set_group(self, group) -> None:
        """Run on ``group`` from now on (None: hold no reference to any group)."""
        self._group = group
        if group is not None:
            self._num_workers, self._rank = group.size(), group.rank()
