"""The parameter server's wire format.

A message is a list of frames: a fixed 116-byte header packed with :mod:`struct`,
the key's name (UTF-8), an optional payload and, for the ops of :data:`VALUE_OPS`
(row-sparse pushes, optimizer state), a fourth frame of tensor values. Tensor payloads are the raw bytes
of a contiguous slice in the one tensor wire format (:mod:`paratrain.comm.wire`: dtype
codes, bytes), sent and received without copies; control payloads are
small UTF-8 JSON objects. Nothing on the wire is ever unpickled, and every field is
checked before it is used, so a malformed message is rejected with
:class:`ProtocolError` instead of crashing or corrupting a server.

Authentication is the transport's: each connection's CURVE handshake proves the
peer's key (:mod:`paratrain.comm.security`) before any message arrives. A worker's
first message is ``HELLO`` (JSON: its rank, which its key must match, and the job's
terms); the server's ``OK`` to it carries, in ``length``, the largest message that
server accepts.
"""
from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from paratrain.comm.wire import CODE_DTYPES, ITEMSIZES, dtype_code, view_tensor

MAGIC = b"PTPS"
VERSION = 3
MAX_NDIM = 8
MAX_KEY_BYTES = 256
MAX_CONTROL_BYTES = 64 * 1024

# magic, version, op, dtype, ndim, request_id, offset, length, clock, scale, status, shape[8]
HEADER = struct.Struct(f"<4sBBBBQQQQdI{MAX_NDIM}q")
_REQUEST_ID_FIELD = 5


class Op(enum.IntEnum):
    """Requests (worker to server) and replies (server to worker)."""

    HELLO = 1
    INIT = 3
    PUSH = 4
    PULL = 5
    SET_OPTIMIZER = 6
    BARRIER = 7
    GOODBYE = 8
    SET_COMPRESSION = 9
    COMMIT = 10
    # Row-sparse keys (paratrain.ps.row_sparse) and the optimizer state's transfer
    # (paratrain.ps.state_transfer); numbered apart so other ops can be added below.
    ROW_INIT = 40
    ROW_PUSH = 41
    ROW_PULL = 42
    STATE_PULL = 44
    STATE_SET = 45
    DEPART = 47
    ROWS = 48
    STATE = 49
    OK = 16
    DATA = 17
    ERROR = 18


TENSOR_OPS = (Op.INIT, Op.PUSH, Op.DATA)
CONTROL_OPS = (Op.HELLO, Op.SET_OPTIMIZER, Op.SET_COMPRESSION, Op.ERROR, Op.COMMIT)
#: ``status`` bits of a PUSH: the payload is compressed with the job's codec; the
#: push also asks for the value (pushpull: one round trip, answered as a pull); the
#: push's scale is not known yet (sent from a backward hook): the server holds it,
#: unapplied and unanswered, until this worker's ``COMMIT`` brings the scale
#: (``scale`` field), the number of held pushes it covers (``clock`` field) and,
#: optionally, the step's learning rate (JSON payload ``{"lr": ...}``).
#: Row-sparse ops: the header's ``shape`` is the table's (rows, dim), ``offset`` the
#: first row of the server's range, ``length`` the number of rows in the message.
#: ROW_PULL carries their int64 row ids; ROW_PUSH the ids and, in its fourth frame,
#: the rows' values; the ROWS reply the values; ROW_INIT a JSON object
#: (``{"initializer": {...}, "lr_mult": x}``: the rows are made on the server).
ROW_OPS = (Op.ROW_INIT, Op.ROW_PUSH, Op.ROW_PULL, Op.ROWS)
#: Ops with a JSON payload and a fourth frame of tensor values (STATE_SET, STATE:
#: one key slice's optimizer state; ROW_PUSH: ids then values).
VALUE_OPS = (Op.ROW_PUSH, Op.STATE_SET, Op.STATE)
STATUS_COMPRESSED = 1
STATUS_PULL_AFTER = 2
STATUS_DEFERRED = 4

_OPS = {int(op): op for op in Op}


class ProtocolError(ValueError):
    """A message that does not follow this wire format."""


class RequestRejected(ValueError):
    """A well-formed request the server refuses (unknown key, wrong shape, ...)."""


@dataclass
class Message:
    """One decoded message. ``payload`` is a zero-copy view of the payload frame."""

    op: Op
    key: str = ""
    request_id: int = 0
    dtype: torch.dtype = torch.float32
    shape: tuple[int, ...] = ()
    offset: int = 0
    length: int = 0
    clock: int = 0
    scale: float = 1.0
    status: int = 0
    payload: memoryview | None = None
    values: memoryview | None = None    # the fourth frame of a VALUE_OPS message

    def tensor(self) -> torch.Tensor:
        """The payload as a flat tensor of ``length`` elements (a view, not a copy)."""
        if self.payload is None:
            raise ProtocolError(f"{self.op.name} message carries no tensor")
        return view_tensor(self.payload, self.dtype)

    def control(self) -> dict:
        """The payload as a JSON object (control messages)."""
        return decode_json(self.payload)

    def row_ids(self) -> torch.Tensor:
        """ROW_PULL, ROW_PUSH: the int64 row ids (a read-only view)."""
        return view_tensor(self.payload, torch.int64)

    def rows(self) -> torch.Tensor:
        """ROW_PUSH, ROWS: the ``(length, dim)`` values (a read-only view)."""
        frame = self.values if self.op == Op.ROW_PUSH else self.payload
        return view_tensor(frame, self.dtype).view(self.length, self.shape[1])


def encode_json(obj: dict) -> bytes:
    data = json.dumps(obj, sort_keys=True).encode("utf-8")
    if len(data) > MAX_CONTROL_BYTES:
        raise ValueError(f"control payload of {len(data)} bytes exceeds {MAX_CONTROL_BYTES}")
    return data


def decode_json(payload: Any) -> dict:
    if payload is None:
        return {}
    data = bytes(payload)
    if len(data) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control payload of {len(data)} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"control payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"control payload must be a JSON object, got {type(obj).__name__}")
    return obj


def encode(op: Op, *, key: str = "", request_id: int = 0, dtype: torch.dtype = torch.float32,
           shape: Sequence[int] = (), offset: int = 0, length: int = 0, clock: int = 0,
           scale: float = 1.0, status: int = 0, payload: Any = None, values: Any = None) -> list:
    """Frames for one message; ``payload`` and ``values`` (bytes or memoryviews) are
    not copied. ``values`` is the fourth frame of the :data:`VALUE_OPS`."""
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensors of {len(shape)} dimensions cannot be sent; at most {MAX_NDIM}")
    dims = list(shape) + [0] * (MAX_NDIM - len(shape))
    header = HEADER.pack(MAGIC, VERSION, int(op), dtype_code(dtype), len(shape), request_id,
                         offset, length, clock, scale, status, *dims)
    frames = [header, key.encode("utf-8")]
    if payload is not None or values is not None:
        frames.append(b"" if payload is None else payload)
    if values is not None:
        frames.append(values)
    return frames


def request_id_of(frames: Sequence[Any]) -> int:
    """The request id of a message made by :func:`encode` (its header's own field)."""
    return HEADER.unpack(frames[0])[_REQUEST_ID_FIELD]


def decode(frames: Sequence[Any], *, max_payload_bytes: int) -> Message:
    """Check and decode one message. Raises :class:`ProtocolError` on anything odd."""
    if not 2 <= len(frames) <= 4:
        raise ProtocolError(f"a message has 2 to 4 frames, got {len(frames)}")
    header = memoryview(frames[0])
    if header.nbytes != HEADER.size:
        raise ProtocolError(f"header is {header.nbytes} bytes, expected {HEADER.size}")
    (magic, version, op_code, dtype_code_, ndim, request_id, offset, length, clock, scale,
     status, *dims) = HEADER.unpack(header)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"bad magic {magic!r} or version {version}")
    op = _OPS.get(op_code)
    if op is None:
        raise ProtocolError(f"unknown op code {op_code}")
    if dtype_code_ not in CODE_DTYPES:
        raise ProtocolError(f"unknown dtype code {dtype_code_}")
    if ndim > MAX_NDIM or any(d < 0 for d in dims[:ndim]):
        raise ProtocolError(f"bad shape: ndim={ndim}, dims={dims[:ndim]}")
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ProtocolError(f"scale={scale} is not finite")
    key_frame = memoryview(frames[1])
    if key_frame.nbytes > MAX_KEY_BYTES:
        raise ProtocolError(f"key of {key_frame.nbytes} bytes exceeds {MAX_KEY_BYTES}")
    try:
        key = bytes(key_frame).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("key is not UTF-8") from None
    if len(frames) == 4 and op not in VALUE_OPS:
        raise ProtocolError(f"{op.name} has at most 3 frames, got 4")
    payload = memoryview(frames[2]) if len(frames) >= 3 else None
    values = memoryview(frames[3]) if len(frames) == 4 else None
    message = Message(op, key, request_id, CODE_DTYPES[dtype_code_], tuple(dims[:ndim]),
                      offset, length, clock, scale, status, payload, values)
    _check_payload(message, max_payload_bytes)
    return message


def _check_payload(message: Message, max_payload_bytes: int) -> None:
    nbytes = 0 if message.payload is None else message.payload.nbytes
    if message.op in _NEW_OP_CHECKS:
        _NEW_OP_CHECKS[message.op](message, nbytes, max_payload_bytes)
        return
    if message.op in TENSOR_OPS:
        itemsize = ITEMSIZES[message.dtype]
        if nbytes > max_payload_bytes:
            raise ProtocolError(f"payload of {nbytes} bytes exceeds the limit of {max_payload_bytes}")
        if nbytes != message.length * itemsize:
            raise ProtocolError(f"payload is {nbytes} bytes, but length={message.length} "
                                f"elements of {message.dtype} need {message.length * itemsize}")
    elif message.op in CONTROL_OPS:
        if nbytes > MAX_CONTROL_BYTES:
            raise ProtocolError(f"control payload of {nbytes} bytes exceeds {MAX_CONTROL_BYTES}")
    elif nbytes:
        raise ProtocolError(f"{message.op.name} carries no payload, got {nbytes} bytes")


def _value_bytes(message: Message) -> int:
    return 0 if message.values is None else message.values.nbytes


def _check_row_message(message: Message, nbytes: int, max_payload_bytes: int) -> None:
    """Row ops: a 2-D table shape, and frames of exactly the sizes ``length`` rows need."""
    if len(message.shape) != 2 or min(message.shape) < 1:
        raise ProtocolError(f"{message.op.name} needs a table shape (rows, dim), got {message.shape}")
    if nbytes + _value_bytes(message) > max_payload_bytes:
        raise ProtocolError(f"payload of {nbytes + _value_bytes(message)} bytes exceeds the limit of "
                            f"{max_payload_bytes}")
    row_bytes = message.shape[1] * ITEMSIZES[message.dtype]
    expected = {Op.ROW_PULL: (message.length * 8, 0), Op.ROW_PUSH: (message.length * 8, message.length * row_bytes),
                Op.ROWS: (message.length * row_bytes, 0)}
    if message.op == Op.ROW_INIT:
        if nbytes > MAX_CONTROL_BYTES or message.values is not None:
            raise ProtocolError(f"ROW_INIT carries one JSON object of at most {MAX_CONTROL_BYTES} bytes")
        return
    want_payload, want_values = expected[message.op]
    if nbytes != want_payload or _value_bytes(message) != want_values:
        raise ProtocolError(f"{message.op.name} of {message.length} rows of {message.shape[1]} x {message.dtype} "
                            f"needs frames of {want_payload} and {want_values} bytes, got {nbytes} and "
                            f"{_value_bytes(message)}")


def _check_state_message(message: Message, nbytes: int, max_payload_bytes: int) -> None:
    """STATE_SET, STATE: a JSON description (checked where it is decoded) and its tensors."""
    if nbytes > MAX_CONTROL_BYTES:
        raise ProtocolError(f"state description of {nbytes} bytes exceeds {MAX_CONTROL_BYTES}")
    if _value_bytes(message) > max_payload_bytes:
        raise ProtocolError(f"state values of {_value_bytes(message)} bytes exceed the limit of {max_payload_bytes}")


def _check_empty(message: Message, nbytes: int, max_payload_bytes: int) -> None:
    if nbytes or message.values is not None:
        raise ProtocolError(f"{message.op.name} carries no payload, got {nbytes} bytes")


_NEW_OP_CHECKS = {Op.ROW_INIT: _check_row_message, Op.ROW_PUSH: _check_row_message,
                  Op.ROW_PULL: _check_row_message, Op.ROWS: _check_row_message,
                  Op.STATE_SET: _check_state_message, Op.STATE: _check_state_message,
                  Op.STATE_PULL: _check_empty, Op.DEPART: _check_empty}

