"""Gradient aggregation through any :class:`~paratrain.kvstore.KVStore`, as MXNet's
Trainer does with a kvstore that has no updater: each gradient is pushed under its
parameter's key and the aggregated value pulled back into ``p.grad``; the optimizer
runs on the worker. The specialised syncs (bucketed allreduce, the parameter server's
hook pushes) are faster; this one works with a KVStore of your own."""
from __future__ import annotations

import time
from typing import Sequence

import torch

from paratrain.kvstore.base import KVStore, claim_key_namespace, namespaced
from paratrain.parallel.base import GradientSync, start_from_store


class KVStoreSync(GradientSync):
    """One key per trainable parameter (its index in model order)."""

    def __init__(self, kv: KVStore) -> None:
        super().__init__()
        self.kv = kv
        self._namespace = claim_key_namespace()
        self._params: list[torch.nn.Parameter] = []
        self._keys: list = []

    def attach(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Initialise every key and start every worker from the store's values."""
        self._params = list(params)
        self._keys = [namespaced(self._namespace, index) for index in range(len(self._params))]
        start_from_store(self.kv, self._keys, self._params)

    def reduce(self, scale: float) -> None:
        start = time.perf_counter()
        handles = []
        for key, param in zip(self._keys, self._params):
            if param.grad is None:   # unused this step: it still takes part in the sum
                param.grad = torch.zeros_like(param)
            handles.append(self.kv.pushpull(key, param.grad, out=param.grad, block=False))
        for handle in handles:
            handle.wait(None)
        if scale != 1.0:
            torch._foreach_mul_([param.grad for param in self._params], scale)
        self.timeline.complete("push/pull", "comm", start, time.perf_counter())

    @property
    def bytes_sent(self) -> int:
        return self.kv.bytes_sent
