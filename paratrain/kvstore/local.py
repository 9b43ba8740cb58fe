"""``local``: one process, values kept in memory. A push replaces the stored value by
the pushed one (summed over a list), like MXNet's local store without an updater."""
from __future__ import annotations

import torch

from paratrain.errors import ConfigError
from paratrain.kvstore.base import Handle, Key, KVStore, TensorOrList, check_key, copy_out, sum_values


class LocalKVStore(KVStore):
    type = "local"

    def __init__(self) -> None:
        self._store: dict[Key, torch.Tensor] = {}

    def _get(self, key: Key) -> torch.Tensor:
        if check_key(key) not in self._store:
            raise ConfigError(f"key {key!r} was never initialised; call kv.init({key!r}, tensor) first")
        return self._store[key]

    def init(self, key: Key, value: torch.Tensor) -> None:
        self._store[check_key(key)] = value.detach().clone()

    def push(self, key: Key, value: TensorOrList, priority: int = 0) -> Handle:
        stored = self._get(key)
        total = sum_values(value)
        if total.shape != stored.shape:
            raise ConfigError(f"push to key {key!r}: shape {tuple(total.shape)} != stored {tuple(stored.shape)}")
        stored.copy_(total)
        return Handle.completed()

    def pull(self, key: Key, out: TensorOrList, priority: int = 0, block: bool = True) -> Handle:
        copy_out(self._get(key), out)
        return Handle.completed(out)
