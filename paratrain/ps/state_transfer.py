"""One key slice's optimizer state on the wire: MXNet's ``save_optimizer_states`` and
``load_optimizer_states`` for state that lives on the servers.

A state is a flat dict of tensors (momentum, moments, sums) and numbers (step counts).
It travels as a JSON description, ``{"numbers": {name: value}, "tensors": [[name,
dtype code, shape], ...]}``, plus one frame holding the tensors' bytes back to back in
the one tensor wire format (:mod:`paratrain.comm.wire`); :func:`decode_state` checks
every name, code, shape and size before it builds anything, and never unpickles.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from paratrain.comm.wire import CODE_DTYPES, ITEMSIZES, dtype_code, tensor_bytes, view_tensor
from paratrain.ps import protocol
from paratrain.ps.protocol import Message, Op, ProtocolError, RequestRejected

MAX_STATE_ENTRIES = 64


def encode_state(state: dict) -> tuple[bytes, bytes]:
    """``(description JSON, tensor bytes)`` of one slice's optimizer state."""
    numbers, tensors, chunks = {}, [], []
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            tensors.append([name, dtype_code(value.dtype), list(value.shape)])
            chunks.append(bytes(tensor_bytes(value)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            numbers[name] = value
        else:
            raise TypeError(f"optimizer state entry {name!r} is a {type(value).__name__}; only tensors and "
                            f"finite numbers can travel")
    return protocol.encode_json({"numbers": numbers, "tensors": tensors}), b"".join(chunks)


def decode_state(description: dict, values: Any) -> dict:
    """Inverse of :func:`encode_state`: writable tensors; ProtocolError on anything odd."""
    numbers, tensors = description.get("numbers", {}), description.get("tensors", [])
    if not isinstance(numbers, dict) or not isinstance(tensors, list) or len(numbers) + len(tensors) > MAX_STATE_ENTRIES:
        raise ProtocolError(f"optimizer state needs 'numbers' (an object) and 'tensors' (a list), at most "
                            f"{MAX_STATE_ENTRIES} entries")
    state: dict = {}
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProtocolError(f"optimizer state number {name!r}={value!r} is not a finite number")
        state[name] = value
    buffer = memoryview(b"" if values is None else values)
    position = 0
    for entry in tensors:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[1] in CODE_DTYPES
                and isinstance(entry[2], list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in entry[2])):
            raise ProtocolError(f"optimizer state tensor entry {entry!r} must be [name, dtype code, shape]")
        name, dtype, shape = entry[0], CODE_DTYPES[entry[1]], tuple(entry[2])
        if name in state:
            raise ProtocolError(f"optimizer state names {name!r} twice")
        nbytes = math.prod(shape) * ITEMSIZES[dtype]
        if position + nbytes > buffer.nbytes:
            raise ProtocolError(f"optimizer state tensor {name!r} of shape {shape} runs past the values frame")
        state[name] = view_tensor(buffer[position:position + nbytes], dtype).clone().view(shape)
        position += nbytes
    if position != buffer.nbytes:
        raise ProtocolError(f"optimizer state values frame has {buffer.nbytes - position} bytes left over")
    return state


def _slice(server, message: Message):
    state = server.keys.get(message.key)
    if state is None or state.offset != message.offset:
        raise RequestRejected(f"server {server.config.server_rank} holds no slice of key {message.key!r} at "
                              f"offset {message.offset}")
    return state


def on_state_pull(server, peer: bytes, rank: int, message: Message) -> None:
    """Answer with the slice's optimizer state (a STATE reply)."""
    state = _slice(server, message)
    description, values = encode_state(state.optimizer_state)
    server._reply(peer, protocol.encode(Op.STATE, key=message.key, request_id=message.request_id,
                                        offset=state.offset, payload=description, values=values))


def on_state_set(server, peer: bytes, rank: int, message: Message) -> None:
    """Replace the slice's optimizer state; every tensor must have the slice's shape."""
    state = _slice(server, message)
    try:
        loaded = decode_state(message.control(), message.values)
    except ProtocolError as exc:
        raise RequestRejected(f"optimizer state for key {message.key!r}: {exc}") from None
    wrong = sorted(name for name, value in loaded.items()
                   if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(state.value.shape))
    if wrong:
        raise RequestRejected(f"optimizer state for key {message.key!r} has tensors {wrong} not of the slice's "
                              f"shape {tuple(state.value.shape)}")
    state.optimizer_state = loaded
    server._ok(peer, message.request_id)


HANDLERS = {Op.STATE_PULL: on_state_pull, Op.STATE_SET: on_state_set}
