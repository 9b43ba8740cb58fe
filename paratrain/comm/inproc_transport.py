"""Queues inside one process, behind the same interface as ZeroMQ.

Frames are copied on send, as a real wire would, so a unit test catches code that
changes a tensor it has already handed to the transport. Addresses look like
``inproc://ps-<n>`` and live in a process-wide table.
"""
from __future__ import annotations

import itertools
import queue
import threading
from typing import Sequence

from paratrain.comm.transport import (ClientChannel, DoneTracker, Frames, SendTracker, ServerChannel,
                                      Transport, register_transport)
from paratrain.errors import ConfigError, PeerError

_LOCK = threading.Lock()
_SERVERS: dict[str, "InprocServerChannel"] = {}
_CLIENTS: dict[bytes, "queue.Queue"] = {}
_COUNTER = itertools.count()
_DONE = DoneTracker()


def _copy(frames: Frames) -> list[bytes]:
    return [bytes(memoryview(f)) for f in frames]


def _get(q: "queue.Queue", timeout_s: float):
    try:
        return q.get(timeout=max(timeout_s, 0.0)) if timeout_s > 0 else q.get_nowait()
    except queue.Empty:
        return None


class InprocServerChannel(ServerChannel):
    def __init__(self, max_message_bytes: int):
        self.address = f"inproc://ps-{next(_COUNTER)}"
        self._inbox: queue.Queue = queue.Queue()
        self._max = max_message_bytes
        self._dropped: set[bytes] = set()
        with _LOCK:
            _SERVERS[self.address] = self

    def deliver(self, peer: bytes, frames: list[bytes]) -> None:
        # As libzmq's MAXMSGSIZE: an oversized message never reaches the server.
        if sum(len(f) for f in frames) <= self._max:
            self._inbox.put((peer, frames))

    def recv(self, timeout_s: float) -> tuple[bytes, list] | None:
        return _get(self._inbox, timeout_s)

    def send(self, peer: bytes, frames: Frames) -> SendTracker:
        with _LOCK:
            inbox = _CLIENTS.get(peer[:8])
        if inbox is not None and peer not in self._dropped:
            inbox.put((int.from_bytes(peer[8:], "little"), _copy(frames)))
        return _DONE

    def drop(self, peer: bytes) -> None:
        self._dropped.add(peer)

    def close(self) -> None:
        with _LOCK:
            _SERVERS.pop(self.address, None)


class InprocClientChannel(ClientChannel):
    def __init__(self, addresses: Sequence[str]):
        self._id = next(_COUNTER).to_bytes(8, "little")
        self._inbox: queue.Queue = queue.Queue()
        self._addresses = list(addresses)
        with _LOCK:
            _CLIENTS[self._id] = self._inbox

    def send(self, server: int, frames: Frames) -> SendTracker:
        with _LOCK:
            target = _SERVERS.get(self._addresses[server])
        if target is None:
            raise PeerError(f"no in-process server listens at {self._addresses[server]}")
        # The peer id carries the server index so that replies say who answered.
        target.deliver(self._id + server.to_bytes(4, "little"), _copy(frames))
        return _DONE

    def recv(self, timeout_s: float) -> tuple[int, list] | None:
        return _get(self._inbox, timeout_s)

    def close(self) -> None:
        with _LOCK:
            _CLIENTS.pop(self._id, None)


class InprocTransport(Transport):
    """In-process queues (unit tests)."""

    name = "inproc"

    def listen(self, bind_addr: str, *, max_message_bytes: int, keys=None) -> ServerChannel:
        _refuse_keys(keys)
        return InprocServerChannel(max_message_bytes)

    def connect(self, addresses: Sequence[str], *, keys=None) -> ClientChannel:
        _refuse_keys(keys)
        return InprocClientChannel(addresses)


def _refuse_keys(keys) -> None:
    if keys is not None:
        raise ConfigError("transport='inproc' does not authenticate its peers; use 'zmq' for a keyed job")


register_transport("inproc", InprocTransport)
