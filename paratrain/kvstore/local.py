"""``local``: one process, values kept in memory. A push replaces the stored value by
the pushed one (summed over a list), like MXNet's local store without an updater; with
an updater (``kv._set_updater(fn)``) the push calls ``fn(key, pushed, stored)``, which
changes ``stored`` in place, as MXNet's local store does.

Row-sparse keys (``kv.init(key, torch.zeros((rows, dim), layout=torch.sparse_coo),
initializer=...)``) hold their table here; a push of a sparse COO gradient replaces
the rows it carries (or hands them to the updater as a sparse tensor), and
``row_sparse_pull`` reads rows in the order asked."""
from __future__ import annotations

from typing import Any, Callable

import torch

from paratrain.errors import ConfigError
from paratrain.kvstore.base import (Handle, Key, KVStore, TensorOrList, check_key, copy_out, init_value, per_key,
                                    sum_values)
from paratrain.kvstore.row_sparse import check_table, coalesced_rows, is_sparse
from paratrain.ps.row_init import RowInitializer, fill_rows


class LocalKVStore(KVStore):
    type = "local"
    capabilities = frozenset({"broadcast", "pushpull", "row_sparse"})

    def __init__(self) -> None:
        self._store: dict[Key, torch.Tensor] = {}
        self._tables: set[Key] = set()
        self._updater: Callable | None = None

    def _get(self, key: Key) -> torch.Tensor:
        if check_key(key) not in self._store:
            raise ConfigError(f"key {key!r} was never initialised; call kv.init({key!r}, tensor) first")
        return self._store[key]

    @per_key("value")
    def init(self, key: Key, value: TensorOrList, *, initializer: Any = None, lr_mult: float = 1.0) -> None:
        """``value``: a dense tensor, or an empty sparse COO ``(rows, dim)`` for a
        row-sparse key whose rows ``initializer`` makes (``lr_mult`` is for servers)."""
        value = init_value(check_key(key), value)
        if is_sparse(value):
            rows, dim, dtype = check_table(key, value)
            self._store[key] = fill_rows(RowInitializer.from_spec(initializer), torch.empty(rows, dim, dtype=dtype), 0)
            self._tables.add(key)
            return
        self._store[key] = value.detach().clone()
        self._tables.discard(key)

    @per_key("value")
    def push(self, key: Key, value: TensorOrList, priority: int = 0) -> Handle:
        stored = self._get(key)
        if key in self._tables:
            ids, rows = coalesced_rows(key, value, tuple(stored.shape))
            if self._updater is not None:
                pushed = torch.sparse_coo_tensor(ids[None], rows, tuple(stored.shape), check_invariants=False)
                self._updater(key, pushed, stored)   # ids: coalesced, in range
            else:
                stored[ids] = rows.to(stored.dtype)
            return Handle.completed()
        total = sum_values(value)
        if total.shape != stored.shape:
            raise ConfigError(f"push to key {key!r}: shape {tuple(total.shape)} != stored {tuple(stored.shape)}")
        if self._updater is not None:
            self._updater(key, total, stored)
        else:
            stored.copy_(total)
        return Handle.completed()

    @per_key("out")
    def pull(self, key: Key, out: TensorOrList, priority: int = 0, block: bool = True) -> Handle:
        if key in self._tables:
            raise ConfigError(f"key {key!r} is row-sparse: read its rows with kv.row_sparse_pull({key!r}, out=..., "
                              f"row_ids=...)")
        copy_out(self._get(key), out)
        return Handle.completed(out)

    @per_key("value", "out")
    def pushpull(self, key: Key, value: TensorOrList, out: TensorOrList | None = None,
                 priority: int = 0, block: bool = True) -> Handle:
        return super().pushpull(key, value, out, priority, block)

    @per_key("out", "row_ids")
    def row_sparse_pull(self, key: Key, out: TensorOrList, row_ids: Any, priority: int = 0,
                        block: bool = True) -> Handle:
        stored = self._get(key)
        if key not in self._tables:
            raise ConfigError(f"key {key!r} is dense: read it with kv.pull({key!r}, out=...)")
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        for target in outs:
            ids = torch.as_tensor(row_ids).reshape(-1).to(torch.int64)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= stored.shape[0]):
                raise ConfigError(f"row_sparse_pull of key {key!r}: row ids must be in [0, {stored.shape[0]})")
            if is_sparse(target) or tuple(target.shape) != (ids.numel(), stored.shape[1]):
                raise ConfigError(f"row_sparse_pull of key {key!r}: out must be a dense ({ids.numel()}, "
                                  f"{stored.shape[1]}) tensor")
            target.copy_(stored[ids])
        return Handle.completed(out)

    def _set_updater(self, updater: Callable) -> None:
        """``updater(key, pushed, stored)`` changes ``stored`` in place on every push
        (``pushed`` is sparse COO for a row-sparse key); None: pushes replace again."""
        if updater is not None and not callable(updater):
            raise ConfigError(f"updater={updater!r} must be a callable (key, pushed, stored) or None")
        self._updater = updater
