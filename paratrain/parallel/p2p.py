"""Point-to-point tensor links between neighbouring pipeline stages.

A :class:`Channel` joins two processes and carries tensors both ways, in order: a
small fixed header (tag, dtype code, shape; codes from the one wire format,
:mod:`paratrain.comm.wire`) and the tensor's raw bytes, never pickle. Two kinds, chosen
by name with :func:`open_channel`:

* a message transport from :mod:`paratrain.comm.transport` (``zmq``, default, or
  ``inproc``): a :class:`~paratrain.comm.transport.Link` carries each tensor as a
  header frame and a payload frame. Over ZeroMQ sends are queued by ZeroMQ's I/O
  thread and return at once; a message costs tens of microseconds on loopback.
* ``gloo``: ``torch.distributed`` send/recv on the default group, two messages per
  tensor (header, then payload), each with gloo's per-message overhead (docs/pipeline.md
  has the comparison); for hosts where only the process group's ports are open.

Every receive has a timeout and raises :class:`paratrain.errors.CommTimeout` naming the peer.

With the job's keys (:class:`paratrain.comm.security.Keyring`) a link is authenticated
both ways with the two ranks' own key pairs (over ZeroMQ, CURVE: encrypted too): the
binder admits only its peer's key, and the connector only completes the handshake with
the holder of the binder's key, so an address rewritten in the store leads nowhere.
"""
from __future__ import annotations

import abc
import struct
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from paratrain.comm.transport import Link, get_transport
from paratrain.comm.wire import CODE_DTYPES, copy_tensor, dtype_code, tensor_bytes
from paratrain.errors import CommTimeout, ConfigError, PeerError, check_choice

if TYPE_CHECKING:
    from paratrain.comm.security import Keyring

TRANSPORTS = ("zmq", "inproc", "gloo")
MAX_DIMS = 8

# tag, dtype code, ndim, then MAX_DIMS dims: all int64, so gloo can carry it too.
_HEADER = struct.Struct(f"<{3 + MAX_DIMS}q")


def encode_header(tag: int, tensor: torch.Tensor) -> tuple[int, ...]:
    """Header fields for ``tensor``: tag, dtype code, ndim, dims padded to MAX_DIMS."""
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"p2p carries tensors of at most {MAX_DIMS} dims, got shape {tuple(tensor.shape)}")
    dims = list(tensor.shape) + [0] * (MAX_DIMS - tensor.dim())
    return (tag, dtype_code(tensor.dtype), tensor.dim(), *dims)


def decode_header(fields) -> tuple[int, torch.dtype, tuple[int, ...]]:
    """Inverse of :func:`encode_header`: (tag, dtype, shape)."""
    tag, code, ndim, *dims = (int(f) for f in fields)
    if code not in CODE_DTYPES or not 0 <= ndim <= MAX_DIMS:
        raise PeerError(f"corrupt p2p header: dtype code {code}, ndim {ndim}")
    return tag, CODE_DTYPES[code], tuple(dims[:ndim])


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


class LinkChannel(Channel):
    """Tensors over a message-transport :class:`~paratrain.comm.transport.Link`: a
    header frame and a payload frame per tensor."""

    def __init__(self, link: Link, peer: int, timeout_s: float) -> None:
        super().__init__(peer, timeout_s)
        self._link = link

    @property
    def address(self) -> str:
        """Where the link was bound (the binding side publishes it)."""
        return self._link.address

    def send(self, tensor: torch.Tensor, tag: int = 0) -> None:
        payload = tensor_bytes(tensor)
        try:
            self._link.send([_HEADER.pack(*encode_header(tag, tensor)), payload])
        except CommTimeout as error:   # the link knows an address; the user knows ranks
            raise CommTimeout(f"rank {self.peer}: {error}") from None
        self.bytes_sent += payload.nbytes

    def recv(self, expected_tag: int | None = None) -> torch.Tensor:
        frames = self._link.recv(self.timeout_s)
        if frames is None:
            raise CommTimeout(f"no tensor from rank {self.peer} within {self.timeout_s}s")
        if len(frames) != 2:
            raise PeerError(f"rank {self.peer} sent a message of {len(frames)} frames; a tensor has 2")
        tag, dtype, shape = decode_header(_HEADER.unpack(frames[0]))
        self._check_tag(tag, expected_tag)
        return copy_tensor(frames[1], dtype, shape)   # received frames are read-only

    def close(self) -> None:
        # Linger (bounded): a message sent just before close must still reach the peer.
        self._link.close(linger_s=self.timeout_s)


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


def open_link_channel(transport: str, store: dist.Store, key: str, *, rank: int, peer: int,
                      bind_addr: str, timeout_s: float, keys: Keyring | None = None) -> LinkChannel:
    """Open the link ``key`` between ``rank`` and ``peer`` over a message transport.

    The lower rank binds a free port and publishes the link's address under ``key`` in
    the job's store; the higher rank reads it and connects. A hello message from the
    connecting side proves the link before any tensor goes over it. With ``keys`` the
    binder is the server of the handshake (see the module's docstring).
    """
    if rank == peer:
        raise ConfigError(f"a p2p channel needs two ranks, got rank={rank} and peer={peer}")
    links = get_transport(transport)
    if rank < peer:
        server_keys = None if keys is None else keys.link_server(rank, peer)
        channel = LinkChannel(links.bind_link(bind_addr, send_timeout_s=timeout_s, keys=server_keys), peer, timeout_s)
    else:
        try:
            store.wait([key], timedelta(seconds=timeout_s))
        except RuntimeError:
            raise CommTimeout(f"rank {peer} did not publish p2p address {key!r} within {timeout_s}s") from None
        client_keys = None if keys is None else keys.link_client(rank, peer)
        link = links.connect_link(store.get(key).decode(), send_timeout_s=timeout_s, keys=client_keys)
        channel = LinkChannel(link, peer, timeout_s)
    try:
        if rank < peer:
            store.set(key, channel.address)
            channel.recv(expected_tag=-1)
        else:
            channel.send(torch.zeros(0), tag=-1)
    except BaseException:
        channel.close()
        raise
    channel.bytes_sent = 0
    return channel


def open_channel(transport: str, store: dist.Store | None, key: str, *, rank: int, peer: int,
                 bind_addr: str = "127.0.0.1", timeout_s: float = 60.0, keys: Keyring | None = None) -> Channel:
    """A :class:`Channel` to ``peer`` over ``transport`` (``zmq``, ``inproc`` or ``gloo``).

    Both ranks call this with the same ``key``; ``gloo`` needs the default process
    group, the message transports need ``store`` to exchange the link's address.
    ``keys``: authenticate (and over ZeroMQ encrypt) the link with the job's keys;
    ``gloo`` has no such thing, so it refuses them.
    """
    check_choice("transport", transport, TRANSPORTS)
    if transport == "gloo":
        if keys is not None:
            raise ConfigError("transport='gloo' cannot authenticate a link; use 'zmq' for a keyed job")
        if not dist.is_initialized():
            raise ConfigError("transport='gloo' needs the default process group; call init_process_group first")
        return GlooChannel(peer, timeout_s)
    if store is None:
        raise ConfigError(f"transport={transport!r} needs the job's store to exchange addresses")
    return open_link_channel(transport, store, key, rank=rank, peer=peer, bind_addr=bind_addr, timeout_s=timeout_s,
                             keys=keys)
