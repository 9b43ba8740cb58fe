"""Point-to-point tensor transport between neighbouring pipeline stages.

A :class:`Channel` joins two processes and carries tensors both ways, in order, as
raw bytes behind a small fixed header (no pickle). Two implementations, chosen by
name with :func:`open_channel`:

* ``zmq`` (default): a ZeroMQ PAIR socket over TCP. Sends are queued by ZeroMQ's
  I/O thread and return at once; a message costs tens of microseconds on loopback.
* ``gloo``: ``torch.distributed`` send/recv on the default group. Each message here
  costs about 2 ms (gloo's per-message overhead), two messages per tensor (header,
  then payload), which dominates small activations; kept for comparison and for
  hosts where only the process group's ports are open.

``bench/bench_pipeline.py --transport`` measures both. Every receive has a timeout
and raises :class:`paratrain.errors.CommTimeout` naming the peer.

With the job's keys (:class:`paratrain.comm.security.Keyring`) a ZeroMQ link is
CURVE-authenticated both ways with the two ranks' own key pairs: the binder admits
only its peer's key, and the connector only completes the handshake with the holder
of the binder's key, so an address rewritten in the store leads nowhere.
"""
from __future__ import annotations

import abc
import struct
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from paratrain.errors import CommTimeout, ConfigError, PeerError, check_choice

if TYPE_CHECKING:
    from paratrain.comm.security import Keyring

TRANSPORTS = ("zmq", "gloo")
MAX_DIMS = 8

# Wire codes for dtypes; the order is the protocol, append only.
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16,
           torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
_DTYPE_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}
# tag, dtype code, ndim, then MAX_DIMS dims: all int64, so gloo can carry it too.
_HEADER = struct.Struct(f"<{3 + MAX_DIMS}q")


def encode_header(tag: int, tensor: torch.Tensor) -> tuple[int, ...]:
    """Header fields for ``tensor``: tag, dtype code, ndim, dims padded to MAX_DIMS."""
    if tensor.dtype not in _DTYPE_CODE:
        raise TypeError(f"p2p cannot carry dtype {tensor.dtype}; supported: {_DTYPES}")
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"p2p carries tensors of at most {MAX_DIMS} dims, got shape {tuple(tensor.shape)}")
    dims = list(tensor.shape) + [0] * (MAX_DIMS - tensor.dim())
    return (tag, _DTYPE_CODE[tensor.dtype], tensor.dim(), *dims)


def decode_header(fields) -> tuple[int, torch.dtype, tuple[int, ...]]:
    """Inverse of :func:`encode_header`: (tag, dtype, shape)."""
    tag, code, ndim, *dims = (int(f) for f in fields)
    if not 0 <= code < len(_DTYPES) or not 0 <= ndim <= MAX_DIMS:
        raise PeerError(f"corrupt p2p header: dtype code {code}, ndim {ndim}")
    return tag, _DTYPES[code], tuple(dims[:ndim])


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's contents as a byte view (no copy when already contiguous)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_from_bytes(buffer, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A writable tensor of ``dtype`` and ``shape`` holding ``buffer``'s bytes."""
    data = bytearray(buffer)  # one copy: received frames are read-only
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)


class Channel(abc.ABC):
    """An ordered, bidirectional tensor link to one peer process."""

    def __init__(self, peer: int, timeout_s: float) -> None:
        self.peer = peer
        self.timeout_s = timeout_s
        self.bytes_sent = 0

    @abc.abstractmethod
    def send(self, tensor: torch.Tensor, tag: int = 0) -> None:
        """Queue ``tensor`` for the peer; may return before it is delivered."""

    @abc.abstractmethod
    def recv(self, expected_tag: int | None = None) -> torch.Tensor:
        """The next tensor from the peer; raises CommTimeout after ``timeout_s``."""

    def flush(self) -> None:
        """Wait until every queued send has left (ZeroMQ: nothing to wait for)."""

    def close(self) -> None:
        """Release sockets (idempotent)."""

    def _check_tag(self, tag: int, expected_tag: int | None) -> None:
        # Both ends run the same schedule, so an out-of-order tag is a bug, not noise.
        if expected_tag is not None and tag != expected_tag:
            raise PeerError(f"rank {self.peer} sent tag {tag}, expected {expected_tag}")


class ZmqChannel(Channel):
    """A ZeroMQ PAIR socket: header frame + payload frame per tensor."""

    def __init__(self, socket, peer: int, timeout_s: float) -> None:
        super().__init__(peer, timeout_s)
        import zmq
        self._zmq = zmq
        self._socket = socket
        self._poller = zmq.Poller()
        self._poller.register(socket, zmq.POLLIN)

    def send(self, tensor: torch.Tensor, tag: int = 0) -> None:
        header = _HEADER.pack(*encode_header(tag, tensor))
        payload = tensor_bytes(tensor)
        try:
            # copy=False: ZeroMQ keeps a reference to the buffer until it is sent.
            self._socket.send_multipart([header, payload], copy=False)
        except self._zmq.Again:
            raise CommTimeout(f"send to rank {self.peer} blocked for {self.timeout_s}s") from None
        self.bytes_sent += payload.nbytes

    def recv(self, expected_tag: int | None = None) -> torch.Tensor:
        if not self._poller.poll(int(self.timeout_s * 1000)):
            raise CommTimeout(f"no tensor from rank {self.peer} within {self.timeout_s}s")
        header, payload = self._socket.recv_multipart(copy=False)
        tag, dtype, shape = decode_header(_HEADER.unpack(header.bytes))
        self._check_tag(tag, expected_tag)
        return tensor_from_bytes(payload.buffer, dtype, shape)

    def close(self) -> None:
        # Linger (bounded) rather than 0: a message sent just before close would
        # otherwise be dropped from ZeroMQ's queue before it reaches the peer.
        if not self._socket.closed:
            self._socket.close(linger=int(self.timeout_s * 1000))


class GlooChannel(Channel):
    """``torch.distributed`` send/recv on the default group: a header tensor, then
    the payload. Waits use the work handle's timeout."""

    def __init__(self, peer: int, timeout_s: float) -> None:
        super().__init__(peer, timeout_s)
        self._pending: list[tuple[object, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, tag: int = 0) -> None:
        header = torch.tensor(encode_header(tag, tensor), dtype=torch.int64)
        payload = tensor.detach().cpu().contiguous()
        # Not waited here: two neighbours may send to each other at the same time
        # under 1F1B, and gloo's send can wait for the matching recv. The buffers
        # stay referenced until flush().
        for part in (header, payload):
            self._pending.append((dist.isend(part, self.peer), part))
        self.bytes_sent += payload.numel() * payload.element_size()

    def flush(self) -> None:
        """Wait until every queued send has left."""
        pending, self._pending = self._pending, []
        for work, _ in pending:
            self._wait(work, "send to")

    def recv(self, expected_tag: int | None = None) -> torch.Tensor:
        header = torch.empty(3 + MAX_DIMS, dtype=torch.int64)
        self._wait(dist.irecv(header, self.peer), "recv from")
        tag, dtype, shape = decode_header(header.tolist())
        self._check_tag(tag, expected_tag)
        payload = torch.empty(shape, dtype=dtype)
        self._wait(dist.irecv(payload, self.peer), "recv from")
        return payload

    def close(self) -> None:
        self.flush()

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as error:  # gloo reports its timeout as RuntimeError
            raise CommTimeout(f"{what} rank {self.peer} did not finish within {self.timeout_s}s: {error}") from None


def _zmq_socket(timeout_s: float):
    import zmq
    socket = zmq.Context.instance().socket(zmq.PAIR)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    return socket


def open_zmq_channel(store: dist.Store, key: str, *, rank: int, peer: int, bind_addr: str,
                     timeout_s: float, keys: Keyring | None = None) -> ZmqChannel:
    """Open the PAIR link ``key`` between ``rank`` and ``peer``.

    The lower rank binds a free port and publishes ``tcp://addr:port`` under ``key``
    in the job's store; the higher rank reads it and connects. A hello message from
    the connecting side proves the link before any tensor goes over it (a PAIR
    socket with no peer would otherwise block the first send). With ``keys`` the
    binder is the CURVE server (see the module's docstring).
    """
    if rank == peer:
        raise ConfigError(f"a p2p channel needs two ranks, got rank={rank} and peer={peer}")
    socket = _zmq_socket(timeout_s)
    channel = ZmqChannel(socket, peer, timeout_s)
    try:
        if rank < peer:
            if keys is not None:
                _secure_binder(socket, keys, key, rank=rank, peer=peer)
            port = socket.bind_to_random_port(f"tcp://{bind_addr}")
            store.set(key, f"tcp://{bind_addr}:{port}")
            channel.recv(expected_tag=-1)
        else:
            try:
                store.wait([key], timedelta(seconds=timeout_s))
            except RuntimeError:
                raise CommTimeout(f"rank {peer} did not publish p2p address {key!r} within {timeout_s}s") from None
            address = store.get(key).decode()
            handshake = None if keys is None else _secure_connector(socket, keys, rank=rank, peer=peer,
                                                                     address=address)
            socket.connect(address)
            if handshake is not None:
                handshake.wait(min(timeout_s, 10.0))
            channel.send(torch.zeros(0), tag=-1)
    except BaseException:
        channel.close()
        raise
    channel.bytes_sent = 0
    return channel


def _secure_binder(socket, keys: Keyring, link: str, *, rank: int, peer: int) -> None:
    from paratrain.comm import security
    server_keys = keys.server(security.worker_role(rank), [security.worker_role(peer)])
    security.configure_curve_server(socket, server_keys, domain=f"p2p/{link}")


def _secure_connector(socket, keys: Keyring, *, rank: int, peer: int, address: str):
    from paratrain.comm import security
    client_keys = keys.client(security.worker_role(rank), [security.worker_role(peer)])
    security.configure_curve_client(socket, client_keys.identity, client_keys.server_public_keys[0])
    handshake = security.HandshakeCheck()
    handshake.watch(socket, f"rank {peer}'s p2p link at {address}")
    return handshake


def open_channel(transport: str, store: dist.Store | None, key: str, *, rank: int, peer: int,
                 bind_addr: str = "127.0.0.1", timeout_s: float = 60.0, keys: Keyring | None = None) -> Channel:
    """A :class:`Channel` to ``peer`` over ``transport`` (``zmq`` or ``gloo``).

    Both ranks call this with the same ``key``; ``gloo`` needs the default process
    group, ``zmq`` needs ``store`` to exchange its address. ``keys``: authenticate
    and encrypt the ``zmq`` link with the job's keys.
    """
    check_choice("transport", transport, TRANSPORTS)
    if transport == "gloo":
        if not dist.is_initialized():
            raise ConfigError("transport='gloo' needs the default process group; call init_process_group first")
        return GlooChannel(peer, timeout_s)
    if store is None:
        raise ConfigError("transport='zmq' needs the job's store to exchange addresses")
    return open_zmq_channel(store, key, rank=rank, peer=peer, bind_addr=bind_addr, timeout_s=timeout_s, keys=keys)
