"""The contract between a model's tables and the gradient sync: modules whose rows
can live on the parameter servers (:class:`ServerTable`, e.g.
:class:`paratrain.nn.ServerEmbedding`) and the client that moves their rows
(:class:`TableClient`).

A gradient sync says whether it keeps such tables on its servers
(:attr:`paratrain.parallel.base.GradientSync.holds_tables`). If it does, the Trainer
leaves each table's ``weight`` out of the dense parameters (no dense push, no local
optimizer, no checksum) and the sync binds the table to a :class:`TableClient`: the
table's forward pulls the distinct rows of its batch, its backward records their
gradient, and the sync pushes one sparse gradient per table per step, deferred like
the dense pushes, so one COMMIT brings the step's scale and learning rate to both.
Otherwise the Trainer materializes each table as a plain local ``weight``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn

from paratrain.kvstore.base import Handle, Key, ServerKVStore
from paratrain.ps.row_init import RowInitializer


@dataclass(frozen=True)
class TableSpec:
    """What the servers need to make a table: its shape, dtype, how rows start, and the
    multiplier of the server rule's learning rate for it."""

    num_rows: int
    dim: int
    dtype: torch.dtype
    initializer: RowInitializer
    lr_mult: float = 1.0


class ServerTable(nn.Module, abc.ABC):
    """A module holding a table ``weight`` of ``(num_rows, dim)`` that may live on the
    parameter servers. Until :meth:`materialize` or :meth:`bind`, ``weight`` holds no
    memory (a zero-stride placeholder of the table's shape)."""

    weight: nn.Parameter

    @abc.abstractmethod
    def table_spec(self) -> TableSpec:
        """The table's shape, dtype, initializer and ``lr_mult``."""

    @abc.abstractmethod
    def materialize(self) -> None:
        """Make ``weight`` a plain local table (rows from the initializer)."""

    @abc.abstractmethod
    def bind(self, client: "TableClient") -> None:
        """From now on the rows live on the servers: forward pulls through ``client``."""

    @property
    @abc.abstractmethod
    def bound(self) -> bool:
        """Whether the rows live on the servers."""


def server_tables(module: nn.Module) -> list[ServerTable]:
    """The tables of ``module``, each once, in module order."""
    seen, tables = set(), []
    for child in module.modules():
        if isinstance(child, ServerTable) and id(child) not in seen:
            seen.add(id(child))
            tables.append(child)
    return tables


def local_parameters(module: nn.Module) -> list[nn.Parameter]:
    """``module.parameters()`` without the weights of tables bound to servers."""
    remote = {id(table.weight) for table in server_tables(module) if table.bound}
    return [param for param in module.parameters() if id(param) not in remote]


class TableClient:
    """One table's rows on the servers, as its module uses them. ``push_empty``: push an
    empty gradient when the step touched no row (a dist_sync round counts every worker)."""

    def __init__(self, kv: ServerKVStore, key: Key, spec: TableSpec, *, push_empty: bool) -> None:
        self.kv, self.key, self.spec, self.push_empty = kv, key, spec, push_empty
        self._recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def pull(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows ``ids`` (1-D int64), ``(len(ids), dim)`` on the CPU."""
        rows = torch.empty(len(ids), self.spec.dim, dtype=self.spec.dtype)
        self.kv.row_sparse_pull(self.key, out=rows, row_ids=ids)
        return rows

    def record(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """The gradient of rows ``ids`` from one use of the table (a backward hook)."""
        self._recorded.append((ids.to("cpu"), grad.detach().to("cpu", self.spec.dtype)))

    def push(self) -> Handle | None:
        """Push the step's gradient (every use summed, duplicates too) with
        ``defer_scale=True``; None when there is nothing to push."""
        if not self._recorded and not self.push_empty:
            return None
        recorded, self._recorded = self._recorded, []
        ids = torch.cat([ids for ids, _ in recorded]) if recorded else torch.empty(0, dtype=torch.int64)
        grads = torch.cat([g for _, g in recorded]) if recorded else torch.empty(0, self.spec.dim, dtype=self.spec.dtype)
        gradient = torch.sparse_coo_tensor(ids[None], grads, (self.spec.num_rows, self.spec.dim), check_invariants=False)
        return self.kv.push(self.key, gradient, defer_scale=True)

    def discard(self) -> None:
        """Forget recorded gradients (the step was abandoned)."""
        self._recorded = []

