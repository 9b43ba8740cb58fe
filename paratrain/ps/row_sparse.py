"""Row-sparse keys on a server: a range of an embedding table's rows, made here from an
initializer, pushed and pulled a few rows at a time (MXNet's ``row_sparse`` storage).

A table of ``(rows, dim)`` is cut into contiguous row ranges, one per server
(:func:`paratrain.ps.sharding.plan_rows`). Each server holds its range as a 2-D tensor
(a :class:`RowSliceState`) and its optimizer state beside it, row for row. A push
carries sorted, unique row ids and their gradient rows (a :class:`RowGradient`); the
update policies treat it as any push (a sync round sums the workers' rows in rank
order, :func:`sum_row_gradients`), and the server's rule updates only those rows
(:class:`paratrain.ps.lazy_optimizer.RowUpdates`: MXNet's ``lazy_update``). A pull
carries row ids and gets their rows back, in the same order.

The handlers here are the server's for the row ops of :mod:`paratrain.ps.protocol`;
they check every field before any state changes, as the dense ones do.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from paratrain.comm.wire import tensor_bytes
from paratrain.optimizers import row_server_optimizer_names
from paratrain.ps import protocol
from paratrain.ps.lazy_optimizer import RowUpdates
from paratrain.ps.parking import Waiter
from paratrain.ps.policies import SliceState
from paratrain.ps.protocol import Message, Op, RequestRejected
from paratrain.ps.row_init import RowInitializer, fill_rows

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class RowGradient:
    """Gradient rows for one server's range: ``rows`` int64 indices into the range
    (sorted, unique), ``values`` float32 ``(len(rows), dim)`` (possibly a read-only
    view of the received frame)."""

    rows: torch.Tensor
    values: torch.Tensor


def sum_row_gradients(pushes: list[tuple[RowGradient, float]]) -> tuple[RowGradient, float]:
    """A sync round's row pushes ``(grad, scale)``, in rank order: the union of their
    rows, each row the sum of the pushes that carry it, added in rank order (as the
    dense sum), and the scale the update applies once."""
    if len(pushes) == 1:
        return pushes[0]
    scales = {scale for _, scale in pushes}
    common = len(scales) == 1
    rows = torch.cat([grad.rows for grad, _ in pushes])
    values = torch.cat([grad.values if common else grad.values * scale for grad, scale in pushes])
    union, where = torch.unique(rows, sorted=True, return_inverse=True)
    # index_add_ on the CPU adds source rows one by one in order: rank order per row.
    total = torch.zeros(len(union), values.shape[1], dtype=values.dtype).index_add_(0, where, values)
    return RowGradient(union, total), (scales.pop() if common else 1.0)


@dataclass
class RowSliceState(SliceState):
    """A server's range of a row-sparse key: ``value`` is ``(rows in range, dim)``,
    ``offset`` its first row, ``full_shape`` the table's ``(rows, dim)``; ``lr_mult``
    multiplies the learning rate of this key's updates (MXNet's ``lr_mult``)."""

    row_sparse: ClassVar[bool] = True
    lr_mult: float = 1.0

    @staticmethod
    def sum_round(pushes):
        return sum_row_gradients(pushes)


def apply_rows(state: RowSliceState, grad: RowGradient, scale: float, optimizer, lr: float | None) -> None:
    """Update the pushed rows only: with the server rule (lazily), or, under dist_sync
    without one, set them to the round's sum (MXNet's store without an updater)."""
    if optimizer is None:
        value = state.writable_value()
        value[grad.rows] = (grad.values * scale if scale != 1.0 else grad.values).to(value.dtype)
        return
    optimizer.update_rows(state.writable_value(), grad.rows, grad.values, state.optimizer_state, scale,
                          lr=lr, lr_mult=state.lr_mult)


# ----------------------------------------------------------------- checks


def _check_range(message: Message, state: SliceState | None = None) -> None:
    rows = message.shape[0]
    if message.offset < 0 or message.offset >= rows:
        raise RequestRejected(f"row range starting at {message.offset} does not fit a table of {rows} rows")
    if state is not None and (not state.row_sparse or state.full_shape != message.shape
                              or state.offset != message.offset):
        raise RequestRejected(f"key {message.key!r} on this server is "
                              + (f"rows [{state.offset}, {state.offset + len(state.value)}) of a table of shape "
                                 f"{state.full_shape}" if state.row_sparse else f"a dense key of shape {state.full_shape}")
                              + f"; got a {message.op.name} for rows from {message.offset} of shape {message.shape}")


def _state(server, message: Message) -> RowSliceState:
    state = server.keys.get(message.key)
    if state is None:
        raise RequestRejected(f"unknown key {message.key!r} on server {server.config.server_rank}; call kv.init first")
    _check_range(message, state)
    return state


def _ids_in_range(message: Message, state: RowSliceState, *, sorted_unique: bool) -> torch.Tensor:
    """The message's row ids as indices into the server's range, all checked."""
    ids = message.row_ids()
    if ids.numel():
        low, high = state.offset, state.offset + len(state.value)
        if int(ids.min()) < low or int(ids.max()) >= high:
            raise RequestRejected(f"{message.op.name} of key {message.key!r} names rows outside this server's "
                                  f"range [{low}, {high})")
        if sorted_unique and ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise RequestRejected(f"ROW_PUSH of key {message.key!r}: row ids must be sorted and unique "
                                  f"(duplicates are summed by the worker)")
    return ids - state.offset


# ----------------------------------------------------------------- handlers


def on_row_init(server, peer: bytes, rank: int, message: Message) -> None:
    """Make this server's rows from the initializer (rank 0's init; the others wait for it)."""
    _check_range(message)
    if message.offset + message.length > message.shape[0] or message.length < 1:
        raise RequestRejected(f"rows [{message.offset}, {message.offset + message.length}) do not fit a table "
                              f"of {message.shape[0]} rows")
    if message.dtype not in FLOAT_DTYPES:
        raise RequestRejected(f"key {message.key!r}: dtype {message.dtype} is not a float type")
    spec = message.control()
    try:
        initializer = RowInitializer.from_spec(spec.get("initializer"))
        lr_mult = float(spec.get("lr_mult", 1.0))
    except (ValueError, TypeError) as exc:
        raise RequestRejected(f"ROW_INIT of key {message.key!r}: {exc}") from None
    if not 0 <= lr_mult < float("inf"):
        raise RequestRejected(f"ROW_INIT of key {message.key!r}: lr_mult={lr_mult} must be a finite number >= 0")
    existing = server.keys.get(message.key)
    if existing is not None:
        check_same_rows(existing, message)
        if rank == 0 and peer not in server.rejoined:
            raise RequestRejected(f"key {message.key!r} is already initialized")
        server._ok(peer, message.request_id)
        return
    if rank != 0:
        message.payload = None
        server.parked.inits[message.key].append(Waiter(peer, message, rank, time.monotonic() + server.config.timeout_s))
        return
    value = fill_rows(initializer, torch.empty(message.length, message.shape[1], dtype=message.dtype), message.offset)
    server.keys[message.key] = RowSliceState(value=value, full_shape=message.shape, offset=message.offset,
                                             num_workers=server.num_workers, lr_mult=lr_mult)
    server.dtypes[message.key] = message.dtype
    server._ok(peer, message.request_id)
    server._release_inits(message.key)


def check_same_rows(state: SliceState, message: Message) -> None:
    """A second worker's init of the key: the same table, range and dtype, or an error."""
    _check_range(message, state)
    if message.op != Op.ROW_INIT or len(state.value) != message.length or state.value.dtype != message.dtype:
        raise RequestRejected(f"key {message.key!r} holds rows [{state.offset}, {state.offset + len(state.value)}) "
                              f"of {state.value.dtype}; got {message.op.name} of {message.length} rows of "
                              f"{message.dtype}")


def on_row_push(server, peer: bytes, rank: int, message: Message) -> None:
    """Take a worker's gradient rows (applied now, or at its COMMIT when deferred)."""
    state = _state(server, message)
    if message.status & (protocol.STATUS_COMPRESSED | protocol.STATUS_PULL_AFTER):
        raise RequestRejected(f"ROW_PUSH of key {message.key!r} cannot be compressed (only cast to fp16/bf16) "
                              f"nor answered as a pull; pull the rows with row_sparse_pull")
    if message.dtype not in FLOAT_DTYPES:
        raise RequestRejected(f"ROW_PUSH of key {message.key!r}: dtype {message.dtype} is not a float type")
    if server.optimizer is None and server.policy.needs_optimizer:
        raise RequestRejected(f"{server.policy.name} applies pushes on arrival and needs a server "
                              f"optimizer: call kv.set_optimizer(...) first")
    if server.optimizer is not None and not isinstance(server.optimizer, RowUpdates):
        raise RequestRejected(f"server optimizer {server.optimizer.type!r} has no lazy (row-sparse) update; "
                              f"row-sparse keys need one of the rules that have ({', '.join(row_server_optimizer_names())})")
    values = message.rows()
    grad = RowGradient(_ids_in_range(message, state, sorted_unique=True),
                       values if values.dtype == torch.float32 else values.float())
    server._hold_or_apply(peer, rank, message, state, grad)


def on_row_pull(server, peer: bytes, rank: int, message: Message) -> None:
    """Answer with the rows named (parked while the policy says this worker must wait)."""
    state = _state(server, message)
    _ids_in_range(message, state, sorted_unique=False)
    if server.policy.blocking_workers(state, rank):
        server.parked.pulls[message.key].append(Waiter(peer, message, rank, time.monotonic() + server.config.timeout_s))
        return
    send_rows(server, peer, message, state)


def send_rows(server, peer: bytes, message: Message, state: RowSliceState) -> None:
    """The ROWS reply: the named rows, gathered (a fresh tensor, so nothing is lent)."""
    rows = state.value.index_select(0, message.row_ids() - state.offset)
    server._reply(peer, protocol.encode(
        Op.ROWS, key=message.key, request_id=message.request_id, dtype=state.value.dtype, shape=state.full_shape,
        offset=state.offset, length=len(rows), clock=server.policy.min_clock(state), payload=tensor_bytes(rows)))


HANDLERS = {Op.ROW_INIT: on_row_init, Op.ROW_PUSH: on_row_push, Op.ROW_PULL: on_row_pull}


# ----------------------------------------------------------------- snapshots


def row_fields(state: RowSliceState) -> dict:
    """What a snapshot adds for a row range: its kind, ``lr_mult``, and queued pushes as tensors."""
    return {"row_sparse": True, "lr_mult": state.lr_mult,
            "pending": [[(grad.rows, grad.values.clone(), scale) for grad, scale in queue] for queue in state.pending]}


def row_slice_from_dict(saved: dict) -> RowSliceState:
    from collections import deque

    state = RowSliceState(value=saved["value"], full_shape=tuple(saved["full_shape"]), offset=saved["offset"],
                          num_workers=saved["num_workers"], optimizer_state=dict(saved["optimizer_state"]),
                          lr_mult=float(saved["lr_mult"]))
    state.pushes = list(saved["pushes"])
    state.applied_rounds = saved["applied_rounds"]
    state.late_dropped = saved.get("late_dropped", 0)
    state.pending = [deque((RowGradient(rows, values), float(scale)) for rows, values, scale in queue)
                     for queue in saved["pending"]]
    return state
