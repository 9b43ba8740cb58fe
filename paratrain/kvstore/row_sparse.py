"""Row-sparse keys on the worker side: embedding tables whose rows live on the servers.

    kv.init("emb", torch.zeros((rows, dim), layout=torch.sparse_coo),
            initializer={"kind": "uniform", "low": -0.01, "high": 0.01, "seed": 0})
    kv.push("emb", table.weight.grad)                  # sparse COO, as nn.Embedding(sparse=True)
    kv.row_sparse_pull("emb", out=rows, row_ids=ids)   # rows: (len(ids), dim), in ids order

A table of ``(rows, dim)`` is cut into contiguous row ranges, one per server
(:func:`~paratrain.ps.sharding.plan_rows`); its rows are made on the servers from the
initializer and never sent. A push is coalesced first (duplicate ids summed), then
each server gets the ids in its range and their rows, and nothing else: the bytes of a
push grow with the rows it touches, never with the table. Every server gets a push,
empty if need be, so a ``dist_sync`` round counts every worker on every range. A pull
asks each server for the distinct ids in its range and scatters the answer into
``out`` in the order of ``row_ids``.

:class:`RowSparseKeys` is the part of :class:`~paratrain.kvstore.dist.DistKVStore`
that does this; it uses the store's connection, deferred-push count, compression and
byte counter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from paratrain.comm import codecs
from paratrain.comm.wire import dtype_code, tensor_bytes
from paratrain.errors import ConfigError, PeerError
from paratrain.kvstore.base import Handle, Key, TensorOrList, per_key
from paratrain.kvstore.server_connection import Request
from paratrain.ps import protocol
from paratrain.ps.protocol import Op
from paratrain.ps.row_init import RowInitializer
from paratrain.ps.sharding import KeySlice, key_name, plan_rows


def is_sparse(value: Any) -> bool:
    """A torch sparse tensor (COO, or a compressed layout, which is refused where used)."""
    return isinstance(value, torch.Tensor) and value.layout != torch.strided


def refuse_sparse(what: str, value: Any) -> None:
    """A clear error where a dense tensor is expected and a sparse one was given."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(is_sparse(v) for v in values):
        raise ConfigError(f"{what}: got a torch sparse tensor where a dense one is expected; row-sparse values go "
                          f"to keys initialised with a sparse tensor (kv.init(key, torch.zeros((rows, dim), "
                          f"layout=torch.sparse_coo))), read with kv.row_sparse_pull")


def check_table(key: Key, value: torch.Tensor) -> tuple[int, int, torch.dtype]:
    """``(rows, dim, dtype)`` of a row-sparse init value: an empty 2-D float COO tensor."""
    if value.layout != torch.sparse_coo:
        raise ConfigError(f"init of key {key!r}: layout {value.layout} is not supported; row-sparse keys are "
                          f"declared with torch.sparse_coo")
    if value.dim() != 2 or min(value.shape) < 1 or not value.is_floating_point():
        raise ConfigError(f"init of key {key!r}: a row-sparse key is a float table (rows, dim), got "
                          f"{tuple(value.shape)} of {value.dtype}")
    dtype_code(value.dtype)
    if value._nnz():
        raise ConfigError(f"init of key {key!r}: a row-sparse init value holds no entries (its rows are made on "
                          f"the servers); give torch.zeros(shape, layout=torch.sparse_coo) and an initializer")
    return value.shape[0], value.shape[1], value.dtype


def coalesced_rows(key: Key, value: TensorOrList, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted unique row ids and their summed rows of a sparse COO gradient (or a
    list of them, summed first): hybrid COO (``nn.Embedding(sparse=True)``: indices
    ``(1, nnz)``, values ``(nnz, dim)``) or fully sparse 2-D COO."""
    values = [value] if isinstance(value, torch.Tensor) else list(value)
    if not values or not all(isinstance(v, torch.Tensor) and v.layout == torch.sparse_coo for v in values):
        raise ConfigError(f"push to row-sparse key {key!r} takes torch sparse COO tensors (as "
                          f"nn.Embedding(sparse=True) gives), got {[type(v).__name__ for v in values]}")
    for v in values:
        if tuple(v.shape) != shape:
            raise ConfigError(f"push to key {key!r}: shape {tuple(v.shape)}, the table is {shape}")
    total = values[0].to("cpu")
    for extra in values[1:]:
        total = total + extra.to("cpu")
    total = total.coalesce()
    if total.sparse_dim() == 1:
        return total.indices()[0], total.values()
    rows, cols = total.indices()
    ids, where = torch.unique(rows, sorted=True, return_inverse=True)
    dense = torch.zeros(len(ids), shape[1], dtype=total.dtype).index_put_((where, cols), total.values(), accumulate=True)
    return ids, dense


@dataclass
class _RowKeyInfo:
    num_rows: int
    dim: int
    dtype: torch.dtype
    ranges: list[KeySlice]
    unacked: list[Request] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_rows, self.dim


class RowSparseKeys:
    """Row-sparse keys of a :class:`~paratrain.kvstore.dist.DistKVStore` (a mixin)."""

    _row_keys: dict

    def _init_rows(self, key: Key, value: torch.Tensor, initializer: Any = None, lr_mult: float = 1.0) -> None:
        rows, dim, dtype = check_table(key, value)
        spec = RowInitializer.from_spec(initializer)
        if isinstance(lr_mult, bool) or not isinstance(lr_mult, (int, float)) or not 0 <= lr_mult < float("inf"):
            raise ConfigError(f"lr_mult={lr_mult!r} must be a finite number >= 0")
        info = _RowKeyInfo(rows, dim, dtype, plan_rows(rows, self.num_servers))
        payload = protocol.encode_json({"initializer": spec.to_spec(), "lr_mult": float(lr_mult)})
        requests = [self._connection.send(part.server, protocol.encode(
            Op.ROW_INIT, key=key_name(key), request_id=self._connection.next_id(), dtype=dtype, shape=info.shape,
            offset=part.start, length=part.length, payload=payload)) for part in info.ranges]
        self._collect(requests, f"init of row-sparse key {key!r}")
        self._row_keys[key] = info

    def _push_rows(self, key: Key, value: TensorOrList, defer_scale: bool) -> Handle:
        info = self._row_keys[key]
        if not defer_scale:
            self._check_committed(f"push of key {key!r}")
        if self._optimizer is None and self.type != "dist_sync":
            raise ConfigError(f"{self.type} applies pushes on the servers as they arrive and needs a server "
                              f"optimizer: call kv.set_optimizer(...) before pushing")
        ids, rows = coalesced_rows(key, value, info.shape)
        rows = self._wire_rows(key, rows.to(info.dtype))
        flags = protocol.STATUS_DEFERRED if defer_scale else 0
        with self._connection.lock:
            requests = []
            for part in info.ranges:
                low, high = torch.searchsorted(ids, torch.tensor([part.start, part.stop])).tolist()
                requests.append(self._send_rows(Op.ROW_PUSH, key, info, part, ids[low:high], rows[low:high],
                                                scale=self.push_scale, status=flags))
                if defer_scale:
                    self._deferred[part.server] = self._deferred.get(part.server, 0) + 1
            info.unacked.extend(requests)
        return Handle(lambda timeout: self._collect_acks(info, requests, timeout), f"push of key {key!r}")

    def _wire_rows(self, key: Key, rows: torch.Tensor) -> torch.Tensor:
        """The rows as they travel: cast under fp16/bf16 compression; the error-feedback
        codecs (2bit, topk, 1bit) would need a residual per table row on every worker."""
        config = self._compression
        if not config.enabled:
            return rows.contiguous()
        if config.type in codecs.CAST_DTYPES:
            return rows.to(codecs.CAST_DTYPES[config.type]).contiguous()
        raise ConfigError(f"push to row-sparse key {key!r} under {config.type} compression: its error feedback "
                          f"would keep a residual of the whole table on every worker; row-sparse pushes travel "
                          f"plain or cast (fp16, bf16)")

    def _send_rows(self, op: Op, key: Key, info: _RowKeyInfo, part: KeySlice, ids: torch.Tensor,
                   rows: torch.Tensor | None = None, *, scale: float = 1.0, status: int = 0) -> Request:
        ids = ids.contiguous()
        values = None if rows is None else tensor_bytes(rows)
        frames = protocol.encode(op, key=key_name(key), request_id=self._connection.next_id(),
                                 dtype=info.dtype if rows is None else rows.dtype, shape=info.shape,
                                 offset=part.start, length=len(ids), scale=scale, status=status,
                                 payload=tensor_bytes(ids), values=values)
        self._bytes_sent += ids.numel() * 8 + (0 if values is None else values.nbytes)
        return self._connection.send(part.server, frames)

    @per_key("out", "row_ids")
    def row_sparse_pull(self, key: Key, out: TensorOrList, row_ids: Any, priority: int = 0,
                        block: bool = True) -> Handle:
        """Fill ``out`` (shape ``(len(row_ids), dim)``, or a list, one per entry of a
        list of ``row_ids``) with the rows ``row_ids`` names, in their order
        (duplicates allowed); sees every push this worker made to the key before."""
        info = self._row_info(key)
        self._check_committed(f"row_sparse_pull of key {key!r}")
        outs, id_lists = _pair_outputs(key, out, row_ids, info.dim)
        flat = torch.cat([torch.as_tensor(ids).reshape(-1) for ids in id_lists]).to("cpu", torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= info.num_rows):
            raise ConfigError(f"row_sparse_pull of key {key!r}: row ids must be in [0, {info.num_rows})")
        unique, where = torch.unique(flat, sorted=True, return_inverse=True)
        with self._connection.lock:
            asks = []
            for part in info.ranges:
                low, high = torch.searchsorted(unique, torch.tensor([part.start, part.stop])).tolist()
                if high > low:
                    asks.append((low, high, self._send_rows(Op.ROW_PULL, key, info, part, unique[low:high])))

        def finish(timeout: float | None) -> None:
            rows = torch.empty(len(unique), info.dim, dtype=info.dtype)
            with self._connection.lock:
                acks, info.unacked = info.unacked, []
                self._collect(acks, f"push of key {key!r}", timeout)
                replies = self._collect([request for _, _, request in asks], f"row_sparse_pull of key {key!r}",
                                        timeout)
            for low, high, (server, request_id) in asks:
                message = replies[request_id]
                if message.op != Op.ROWS or message.length != high - low or message.dtype != info.dtype:
                    raise PeerError(f"worker {self._rank}: server {server} answered the row pull of key {key!r} "
                                    f"with {message.op.name} of {message.length} rows of {message.dtype}")
                rows[low:high] = message.rows()
            if asks:   # the slowest worker's clock on the ranges asked (dist_ssp's bound)
                self.last_min_clock[key] = min(replies[request_id].clock for _, _, (_, request_id) in asks)
            gathered = rows[where]
            start = 0
            for target, ids in zip(outs, id_lists):
                count = torch.as_tensor(ids).numel()
                target.copy_(gathered[start:start + count].view(target.shape))
                start += count

        handle = Handle(finish, f"row_sparse_pull of key {key!r}")
        if block:
            handle.wait(self._timeout_s + 10.0)
        return handle

    def _row_info(self, key: Key) -> _RowKeyInfo:
        if key not in self._row_keys:
            raise ConfigError(f"key {key!r} is not a row-sparse key of this worker; initialise it with "
                              f"kv.init({key!r}, torch.zeros((rows, dim), layout=torch.sparse_coo))")
        return self._row_keys[key]


def _pair_outputs(key: Key, out: TensorOrList, row_ids: Any, dim: int) -> tuple[list[torch.Tensor], list]:
    """``out`` and ``row_ids`` as equal-length lists, each output of shape ``(ids, dim)``."""
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    id_lists = [row_ids] if isinstance(out, torch.Tensor) else list(row_ids) if isinstance(row_ids, Sequence) \
        and not isinstance(row_ids, torch.Tensor) else [row_ids] * len(outs)
    if len(id_lists) != len(outs):
        raise ConfigError(f"row_sparse_pull of key {key!r}: {len(outs)} outputs but {len(id_lists)} lists of row ids")
    for target, ids in zip(outs, id_lists):
        if not isinstance(target, torch.Tensor) or is_sparse(target) or target.dim() != 2 \
                or tuple(target.shape) != (torch.as_tensor(ids).numel(), dim):
            raise ConfigError(f"row_sparse_pull of key {key!r}: out must be a dense (len(row_ids), {dim}) tensor, "
                              f"got {tuple(target.shape) if isinstance(target, torch.Tensor) else type(target)} for "
                              f"{torch.as_tensor(ids).numel()} row ids")
    return outs, id_lists
