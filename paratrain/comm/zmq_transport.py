"""ZeroMQ over TCP: ROUTER on the server, one DEALER per server on the worker, and a
PAIR socket per pipeline link.

Frames go out with ``copy=False`` (zmq reads the tensor's memory directly; a tracker
says when it is done) and come in as zero-copy :class:`zmq.Frame` buffers. The
server sets ``MAXMSGSIZE`` so that an oversized message drops the sender's
connection inside libzmq before any memory is spent on it.
"""
from __future__ import annotations

import os
import socket
from typing import Sequence

import zmq

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
    def __init__(self, context: zmq.Context, bind_addr: str, max_message_bytes: int):
        self._context = context   # this channel's own: closed with it
        self._sock = context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        host = "*" if bind_addr in ("0.0.0.0", "*") else bind_addr
        self._sock.bind(f"tcp://{host}:0")
        port = self._sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
        self.address = f"tcp://{_announce_host(bind_addr)}:{port}"
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    def recv(self, timeout_s: float) -> tuple[bytes, list] | None:
        if not self._poller.poll(max(0, int(timeout_s * 1000))):
            return None
        parts = self._sock.recv_multipart(copy=False)
        peer = parts[0].bytes
        return peer, [p.buffer for p in parts[1:]]

    def send(self, peer: bytes, frames: Frames) -> SendTracker:
        return _send(self._sock, frames, prefix=(peer,))

    def drop(self, peer: bytes) -> None:
        # A ROUTER cannot hang up one peer; the server stops answering it instead.
        return None

    def close(self) -> None:
        self._sock.close(linger=0)
        self._context.term()


class ZmqClientChannel(ClientChannel):
    def __init__(self, context: zmq.Context, addresses: Sequence[str]):
        self._socks = []
        self._poller = zmq.Poller()
        for address in addresses:
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)  # let a goodbye leave before close
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.connect(address)
            self._poller.register(sock, zmq.POLLIN)
            self._socks.append(sock)
        self._index = {sock: i for i, sock in enumerate(self._socks)}

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

    def bind(self, bind_addr: str) -> "ZmqLink":
        port = self._sock.bind_to_random_port(f"tcp://{bind_addr}")
        self.address = f"tcp://{bind_addr}:{port}"
        return self

    def connect(self, address: str) -> "ZmqLink":
        self._sock.connect(address)
        self.address = address
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

    def listen(self, bind_addr: str, *, max_message_bytes: int) -> ServerChannel:
        return ZmqServerChannel(zmq.Context(io_threads=SERVER_IO_THREADS), bind_addr, max_message_bytes)

    def connect(self, addresses: Sequence[str]) -> ClientChannel:
        return ZmqClientChannel(zmq.Context.instance(), addresses)

    def bind_link(self, bind_addr: str, *, send_timeout_s: float) -> Link:
        return ZmqLink(zmq.Context.instance(), send_timeout_s).bind(bind_addr)

    def connect_link(self, address: str, *, send_timeout_s: float) -> Link:
        return ZmqLink(zmq.Context.instance(), send_timeout_s).connect(address)


register_transport("zmq", ZmqTransport)
