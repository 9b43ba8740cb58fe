"""ZeroMQ over TCP: ROUTER on the server, one DEALER per server on the worker, and a
PAIR socket per pipeline link.

Frames go out with ``copy=False`` (zmq reads the tensor's memory directly; a tracker
says when it is done) and come in as zero-copy :class:`zmq.Frame` buffers. The
server sets ``MAXMSGSIZE`` so that an oversized message drops the sender's
connection inside libzmq before any memory is spent on it.

With keys (:mod:`paratrain.comm.security`) the server is a CURVE server whose ZAP
handler admits only the job's workers, and each client checks, before it returns,
that every server proved the server key it expects. A server's peer ids then carry
the role the peer proved (:meth:`ZmqServerChannel.peer_role`). A keyed link is the
same pair: its binding side admits the one peer key it was given, its connecting
side returns once the binder proved its key.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Sequence

import zmq

from paratrain.comm import security
from paratrain.comm.security import ClientKeys, ServerKeys
from paratrain.comm.transport import (ClientChannel, DoneTracker, Frames, Link, SendTracker, ServerChannel,
                                      Transport, register_transport)
from paratrain.errors import CommTimeout

# Below this size a copy is cheaper than the bookkeeping of a zero-copy frame.
ZERO_COPY_MIN_BYTES = 64 * 1024
# A server's socket moves every worker's bytes through libzmq's I/O threads (the
# kernel's copies in and out happen there). libzmq spreads connections over them, so
# with more than one the workers' gradients arrive and the new weights leave in
# parallel (figures: docs/parameter_server.md, "Where the time went").
SERVER_IO_THREADS = max(1, min(4, os.cpu_count() or 1))
#: Messages an authenticated peer may have queued on a server before libzmq stops
#: reading its connection (backpressure: nothing is dropped).
DEFAULT_QUEUED_MESSAGES = 1000
#: How long a client waits for the servers' CURVE handshakes.
HANDSHAKE_TIMEOUT_S = 10.0
_DONE = DoneTracker()


class _ZmqTracker(SendTracker):
    def __init__(self, tracker: zmq.MessageTracker):
        self._tracker = tracker

    @property
    def done(self) -> bool:
        return self._tracker.done

    def wait(self, timeout_s: float) -> None:
        self._tracker.wait(timeout_s)


_SNDMORE = int(zmq.SNDMORE)   # a plain int: pyzmq's flag enums cost more than the send


def _send(sock: zmq.Socket, frames: Frames, prefix: Sequence[bytes] = ()) -> SendTracker:
    """Send one message: small frames copied, a big last frame (a tensor payload) lent
    to zmq without a copy, with a tracker that says when zmq is done reading it."""
    parts = [*prefix, *frames]
    last = parts.pop()
    for part in parts:
        sock.send(part, _SNDMORE, copy=True)
    if memoryview(last).nbytes < ZERO_COPY_MIN_BYTES:
        sock.send(last, 0, copy=True)
        return _DONE
    return _ZmqTracker(sock.send(last, 0, copy=False, track=True))


def _announce_host(bind_addr: str) -> str:
    """The host clients dial: the bind address, or this host's address for a wildcard."""
    if bind_addr in ("0.0.0.0", "*", ""):
        return socket.gethostbyname(socket.gethostname())
    return bind_addr


class ZmqServerChannel(ServerChannel):
    def __init__(self, context: zmq.Context, bind_addr: str, max_message_bytes: int,
                 keys: ServerKeys | None = None, max_queued_messages: int = DEFAULT_QUEUED_MESSAGES):
        self._context = context   # this channel's own: closed with it
        self._sock = context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0 if keys is None else max_queued_messages)
        self._roles = None if keys is None else frozenset(keys.allowed)
        self.zap = None if keys is None else security.configure_curve_server(
            self._sock, keys, domain=security.PS_DOMAIN)
        self.unattributed = 0   # messages without an admitted role, dropped (none while ZAP runs)
        host = "*" if bind_addr in ("0.0.0.0", "*") else bind_addr
        self._sock.bind(f"tcp://{host}:0")
        port = self._sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
        self.address = f"tcp://{_announce_host(bind_addr)}:{port}"
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    def recv(self, timeout_s: float) -> tuple[bytes, list] | None:
        deadline = time.monotonic() + timeout_s
        while self._poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            parts = self._sock.recv_multipart(copy=False)
            if self._roles is None:
                return parts[0].bytes, [p.buffer for p in parts[1:]]
            role = security.sender_role(parts[-1])
            if role in self._roles:
                # The peer id binds the routing id to the proved role: a role is
                # never taken from a routing id another connection used before.
                return _peer_id(role, parts[0].bytes), [p.buffer for p in parts[1:]]
            self.unattributed += 1
        return None

    def send(self, peer: bytes, frames: Frames) -> SendTracker:
        routing_id = peer if self._roles is None else peer[1 + peer[0]:]
        return _send(self._sock, frames, prefix=(routing_id,))

    def peer_role(self, peer: bytes) -> str | None:
        return None if self._roles is None else peer[1:1 + peer[0]].decode("utf-8")

    def drop(self, peer: bytes) -> None:
        # A ROUTER cannot hang up one peer; the server stops answering it instead.
        return None

    def close(self) -> None:
        self._sock.close(linger=0)
        security.stop_zap_handler(self._context)
        self._context.term()


def _peer_id(role: str, routing_id: bytes) -> bytes:
    name = role.encode("utf-8")
    return bytes([len(name)]) + name + routing_id


class ZmqClientChannel(ClientChannel):
    def __init__(self, context: zmq.Context, addresses: Sequence[str], keys: ClientKeys | None = None,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S):
        if keys is not None and len(keys.server_public_keys) != len(addresses):
            raise ValueError(f"{len(addresses)} server addresses but {len(keys.server_public_keys)} server keys")
        self._socks = []
        self._poller = zmq.Poller()
        handshakes = security.HandshakeCheck()
        for server, address in enumerate(addresses):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)  # let a goodbye leave before close
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            if keys is not None:
                security.configure_curve_client(sock, keys.identity, keys.server_public_keys[server])
                handshakes.watch(sock, f"parameter server {server} at {address}")
            sock.connect(address)
            self._poller.register(sock, zmq.POLLIN)
            self._socks.append(sock)
        self._index = {sock: i for i, sock in enumerate(self._socks)}
        try:
            handshakes.wait(handshake_timeout_s)
        except BaseException:
            self.close()
            raise

    def send(self, server: int, frames: Frames) -> SendTracker:
        return _send(self._socks[server], frames)

    def recv(self, timeout_s: float) -> tuple[int, list] | None:
        events = self._poller.poll(max(0, int(timeout_s * 1000)))
        if not events:
            return None
        sock = events[0][0]
        parts = sock.recv_multipart(copy=False)
        return self._index[sock], [p.buffer for p in parts]

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []


class ZmqLink(Link):
    """A PAIR socket. Every frame is lent to ZeroMQ without a copy: the sender must
    not change a tensor it sent (pipeline activations and gradients are fresh)."""

    def __init__(self, context: zmq.Context, send_timeout_s: float) -> None:
        self._sock = context.socket(zmq.PAIR)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
        self._send_timeout_s = send_timeout_s
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    def bind(self, bind_addr: str, keys: ServerKeys | None = None) -> "ZmqLink":
        if keys is not None:   # each link its own ZAP domain: it admits its one peer only
            security.configure_curve_server(self._sock, keys, domain=f"p2p/{id(self):x}")
        port = self._sock.bind_to_random_port(f"tcp://{bind_addr}")
        self.address = f"tcp://{bind_addr}:{port}"
        return self

    def connect(self, address: str, keys: ClientKeys | None = None,
                handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> "ZmqLink":
        handshake = security.HandshakeCheck()
        if keys is not None:
            security.configure_curve_client(self._sock, keys.identity, keys.server_public_keys[0])
            handshake.watch(self._sock, f"{keys.server_roles[0]}'s link at {address}")
        self._sock.connect(address)
        self.address = address
        try:
            handshake.wait(handshake_timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def send(self, frames: Frames) -> None:
        try:
            self._sock.send_multipart(list(frames), copy=False)
        except zmq.Again:
            raise CommTimeout(f"send to {self.address} blocked for {self._send_timeout_s}s") from None

    def recv(self, timeout_s: float) -> list | None:
        if not self._poller.poll(max(0, int(timeout_s * 1000))):
            return None
        return [part.buffer for part in self._sock.recv_multipart(copy=False)]

    def close(self, linger_s: float = 0.0) -> None:
        if not self._sock.closed:
            self._sock.close(linger=int(linger_s * 1000))


class ZmqTransport(Transport):
    """ZeroMQ over TCP: clients and links share the process's context; a server
    channel has its own, with ``SERVER_IO_THREADS`` I/O threads."""

    name = "zmq"

    def listen(self, bind_addr: str, *, max_message_bytes: int, keys: ServerKeys | None = None,
               max_queued_messages: int = DEFAULT_QUEUED_MESSAGES) -> ServerChannel:
        return ZmqServerChannel(zmq.Context(io_threads=SERVER_IO_THREADS), bind_addr, max_message_bytes,
                                keys, max_queued_messages)

    def connect(self, addresses: Sequence[str], *, keys: ClientKeys | None = None,
                handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> ClientChannel:
        return ZmqClientChannel(zmq.Context.instance(), addresses, keys, handshake_timeout_s)

    def bind_link(self, bind_addr: str, *, send_timeout_s: float, keys: ServerKeys | None = None) -> Link:
        return ZmqLink(zmq.Context.instance(), send_timeout_s).bind(bind_addr, keys)

    def connect_link(self, address: str, *, send_timeout_s: float, keys: ClientKeys | None = None,
                     handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Link:
        return ZmqLink(zmq.Context.instance(), send_timeout_s).connect(address, keys, handshake_timeout_s)


register_transport("zmq", ZmqTransport)
