"""The parameter server's wire format.

A message is a list of frames: a fixed 116-byte header packed with :mod:`struct`,
the key's name (UTF-8), and an optional payload. Tensor payloads are the raw bytes
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

    def tensor(self) -> torch.Tensor:
        """The payload as a flat tensor of ``length`` elements (a view, not a copy)."""
        if self.payload is None:
            raise ProtocolError(f"{self.op.name} message carries no tensor")
        return view_tensor(self.payload, self.dtype)

    def control(self) -> dict:
        """The payload as a JSON object (control messages)."""
        return decode_json(self.payload)


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
           scale: float = 1.0, status: int = 0, payload: Any = None) -> list:
    """Frames for one message; ``payload`` (bytes or memoryview) is not copied."""
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensors of {len(shape)} dimensions cannot be sent; at most {MAX_NDIM}")
    dims = list(shape) + [0] * (MAX_NDIM - len(shape))
    header = HEADER.pack(MAGIC, VERSION, int(op), dtype_code(dtype), len(shape), request_id,
                         offset, length, clock, scale, status, *dims)
    frames = [header, key.encode("utf-8")]
    if payload is not None:
        frames.append(payload)
    return frames


def request_id_of(frames: Sequence[Any]) -> int:
    """The request id of a message made by :func:`encode` (its header's own field)."""
    return HEADER.unpack(frames[0])[_REQUEST_ID_FIELD]


def decode(frames: Sequence[Any], *, max_payload_bytes: int) -> Message:
    """Check and decode one message. Raises :class:`ProtocolError` on anything odd."""
    if not 2 <= len(frames) <= 3:
        raise ProtocolError(f"a message has 2 or 3 frames, got {len(frames)}")
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
    payload = memoryview(frames[2]) if len(frames) == 3 else None
    message = Message(op, key, request_id, CODE_DTYPES[dtype_code_], tuple(dims[:ndim]),
                      offset, length, clock, scale, status, payload)
    _check_payload(message, max_payload_bytes)
    return message


def _check_payload(message: Message, max_payload_bytes: int) -> None:
    nbytes = 0 if message.payload is None else message.payload.nbytes
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
