"""Modules for models whose parameters live partly on the parameter servers.

    from paratrain.nn import ServerEmbedding
    table = ServerEmbedding(4_000_000, 64)      # used as nn.Embedding(4_000_000, 64)

Under ``dist_sync``/``dist_async``/``dist_ssp`` a :class:`ServerEmbedding`'s rows live on
the servers only, sharded by row range: its forward pulls the distinct rows of the
batch, its backward records their gradient, and the Trainer's step pushes it (one
sparse push per table per step, with the dense gradients' commit), where the servers'
rule updates those rows lazily. The worker never holds the table. Under ``local`` and
``allreduce`` it is a plain embedding with a dense gradient, so one model runs
everywhere; its rows are made from the same initializer either way, so a table starts
equal whichever strategy trains it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paratrain.errors import ConfigError
from paratrain.parallel.server_tables import ServerTable, TableClient, TableSpec, local_parameters, server_tables
from paratrain.ps.row_init import RowInitializer, fill_rows

__all__ = ["ServerEmbedding", "ServerTable", "server_tables", "local_parameters"]


def _placeholder(rows: int, dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A tensor of the table's shape that holds one element (zero stride): no memory."""
    return torch.zeros((), dtype=dtype, device=device).expand(rows, dim)


class ServerEmbedding(ServerTable):
    """``nn.Embedding(num_rows, embedding_dim)`` whose table may live on the parameter
    servers (see the module docs).

    ``initializer``: a :class:`~paratrain.ps.row_init.RowInitializer`, a kind name or a
    dict (default: normal(0, 1), as ``nn.Embedding``); its seed, where not given, is
    drawn from torch's global generator at construction, so ``torch.manual_seed`` fixes
    it. ``lr_mult`` multiplies the servers' learning rate for this table (MXNet's
    ``lr_mult``; under local and allreduce the Trainer's optimizer uses its own rate).

    ``weight`` has the table's shape but holds no memory until the table is made local
    (the first forward outside a parameter-server job, or :meth:`materialize`). Its
    state dict is the local table; with the rows on the servers it is refused (a
    worker's checkpoint cannot hold them: use the servers' snapshots).
    """

    def __init__(self, num_rows: int, embedding_dim: int, *, initializer: Any = None, lr_mult: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, value in (("num_rows", num_rows), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ServerEmbedding {name}={value!r} must be an int >= 1")
        if isinstance(lr_mult, bool) or not isinstance(lr_mult, (int, float)) or not 0 <= lr_mult < float("inf"):
            raise ConfigError(f"ServerEmbedding lr_mult={lr_mult!r} must be a finite number >= 0")
        if not dtype.is_floating_point:
            raise ConfigError(f"ServerEmbedding dtype={dtype} must be a float type")
        self.num_rows, self.embedding_dim, self.lr_mult = num_rows, embedding_dim, float(lr_mult)
        self.initializer = _with_seed(initializer)
        self.weight = nn.Parameter(_placeholder(num_rows, embedding_dim, dtype))
        self._materialized = False
        self._client: TableClient | None = None

    # -- the ServerTable contract --------------------------------------------------------

    def table_spec(self) -> TableSpec:
        return TableSpec(self.num_rows, self.embedding_dim, self.weight.dtype, self.initializer, self.lr_mult)

    def materialize(self) -> None:
        if self._materialized or self._client is not None:
            return
        rows = fill_rows(self.initializer, torch.empty(self.num_rows, self.embedding_dim, dtype=self.weight.dtype), 0)
        self.weight.data = rows.to(self.weight.device)
        self._materialized = True

    def bind(self, client: TableClient) -> None:
        self._client = client
        self.weight.data = _placeholder(self.num_rows, self.embedding_dim, self.weight.dtype, self.weight.device)
        self._materialized = False

    @property
    def bound(self) -> bool:
        return self._client is not None

    # -- nn.Module -------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._client is None:
            self.materialize()
            return F.embedding(ids, self.weight)
        unique, where = torch.unique(ids.reshape(-1), sorted=True, return_inverse=True)
        rows = self._client.pull(unique.to("cpu")).to(self.weight.device)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            rows.requires_grad_(True)
            client = self._client
            rows.register_hook(lambda grad: client.record(unique, grad))
        return F.embedding(where.view(ids.shape), rows)

    def _apply(self, fn, recurse: bool = True):
        if self._materialized:
            return super()._apply(fn, recurse)
        # No table to move: a placeholder of the new dtype and device stands in for it.
        probe = fn(torch.zeros((), dtype=self.weight.dtype, device=self.weight.device))
        self.weight.data = _placeholder(self.num_rows, self.embedding_dim, probe.dtype, probe.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self._refuse_if_bound("state_dict")
        self.materialize()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._refuse_if_bound("load_state_dict")
        self.materialize()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _refuse_if_bound(self, what: str) -> None:
        if self._client is not None:
            raise ConfigError(f"{what}: the {self.num_rows} x {self.embedding_dim} rows of this ServerEmbedding live "
                              f"on the parameter servers, not in this worker; a worker checkpoint cannot hold them "
                              f"(make the servers durable with --server-snapshot-dir under dist_async/dist_ssp)")

    def extra_repr(self) -> str:
        where = "on the servers" if self.bound else "local" if self._materialized else "not made yet"
        return f"{self.num_rows}, {self.embedding_dim}, lr_mult={self.lr_mult}, rows {where}"


def _with_seed(initializer: Any) -> RowInitializer:
    """The initializer, with a seed drawn from torch's global generator where the spec
    gave none (so that two tables never start equal by accident)."""
    seed = int(torch.randint(0, 2**62, ()))
    if initializer is None:
        return RowInitializer(kind="normal", mean=0.0, std=1.0, seed=seed)
    if isinstance(initializer, str):
        return RowInitializer(kind=initializer, seed=seed)
    if isinstance(initializer, dict) and "seed" not in initializer:
        return RowInitializer.from_spec({**initializer, "seed": seed})
    return RowInitializer.from_spec(initializer)
