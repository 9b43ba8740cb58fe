"""Queues inside one process, behind the same interface as ZeroMQ.

Frames are copied on send, as a real wire would, so a unit test catches code that
changes a tensor it has already handed to the transport. Addresses look like
``inproc://ps-<n>`` and live in a process-wide table.

With keys it checks what a CURVE handshake proves, without the cryptography (every
end lives in this one process): a client is refused unless its public key is one the
server admits, a server unless its public key is the one the client expects, with the
errors the ZeroMQ transport raises; a server's peer ids then carry the client's role.
"""
from __future__ import annotations

import itertools
import queue
import threading
from typing import TYPE_CHECKING, Sequence

from paratrain.comm.transport import (ClientChannel, DoneTracker, Frames, Link, SendTracker, ServerChannel,
                                      Transport, register_transport)
from paratrain.errors import PeerError

if TYPE_CHECKING:
    from paratrain.comm.security import ClientKeys, ServerKeys

_LOCK = threading.Lock()
_SERVERS: dict[str, "InprocServerChannel"] = {}
_CLIENTS: dict[bytes, "queue.Queue"] = {}
#: address -> (queue to the connector, queue to the binder, the binding end)
_LINKS: dict[str, tuple["queue.Queue", "queue.Queue", "InprocLink"]] = {}
_COUNTER = itertools.count()
_DONE = DoneTracker()


def _copy(frames: Frames) -> list[bytes]:
    return [bytes(memoryview(f)) for f in frames]


def _get(q: "queue.Queue", timeout_s: float):
    try:
        return q.get(timeout=max(timeout_s, 0.0)) if timeout_s > 0 else q.get_nowait()
    except queue.Empty:
        return None


def _check_handshake(what: str, server_keys: "ServerKeys | None", client_keys: "ClientKeys | None",
                     index: int = 0) -> str | None:
    """What a CURVE handshake between these keys would end in: the client's role, None
    for two unkeyed ends, or the HandshakeError the client would raise."""
    if server_keys is None and client_keys is None:
        return None
    from paratrain.comm import security
    if server_keys is None or client_keys is None:
        raise security.key_unproven(what, "one end has no keys")
    if server_keys.identity.public_key != client_keys.server_public_keys[index]:
        raise security.key_unproven(what, "not the server key this process expects")
    role = next((r for r, key in server_keys.allowed.items() if key == client_keys.identity.public_key), None)
    if role is None:
        raise security.key_refused(what)
    return role


class InprocServerChannel(ServerChannel):
    def __init__(self, max_message_bytes: int, keys: "ServerKeys | None" = None):
        self.address = f"inproc://ps-{next(_COUNTER)}"
        self.keys = keys
        self._inbox: queue.Queue = queue.Queue()
        self._max = max_message_bytes
        self._dropped: set[bytes] = set()
        self._roles: dict[bytes, str] = {}   # client id -> the role it proved
        with _LOCK:
            _SERVERS[self.address] = self

    def admit(self, client_id: bytes, role: str | None) -> None:
        """Record the role a client proved when it connected."""
        if role is not None:
            self._roles[client_id] = role

    def peer_role(self, peer: bytes) -> str | None:
        return self._roles.get(peer[:8])

    def deliver(self, peer: bytes, frames: list[bytes]) -> None:
        # As libzmq's MAXMSGSIZE (per frame): an oversized message never reaches the server.
        if all(len(f) <= self._max for f in frames):
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
    def __init__(self, addresses: Sequence[str], keys: "ClientKeys | None" = None):
        self._id = next(_COUNTER).to_bytes(8, "little")
        self._inbox: queue.Queue = queue.Queue()
        self._addresses = list(addresses)
        for index, address in enumerate(self._addresses):
            with _LOCK:
                server = _SERVERS.get(address)
            if server is None:
                if keys is not None:   # as a CURVE client: nobody there proves a key
                    from paratrain.comm import security
                    raise security.key_unproven(f"parameter server {index} at {address}", "nothing listens there")
                continue
            server.admit(self._id, _check_handshake(f"parameter server {index} at {address}", server.keys, keys,
                                                    index))
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


class InprocLink(Link):
    """One end of a pair of queues; the other end is made by connecting to its address."""

    def __init__(self, inbox: "queue.Queue", outbox: "queue.Queue", address: str,
                 keys: "ServerKeys | None" = None) -> None:
        self._inbox, self._outbox, self.address = inbox, outbox, address
        self.keys = keys   # the binding side's, checked by the connecting side

    def send(self, frames: Frames) -> None:
        self._outbox.put(_copy(frames))

    def recv(self, timeout_s: float) -> list | None:
        return _get(self._inbox, timeout_s)

    def close(self, linger_s: float = 0.0) -> None:
        with _LOCK:
            _LINKS.pop(self.address, None)


class InprocTransport(Transport):
    """In-process queues (unit tests)."""

    name = "inproc"

    def listen(self, bind_addr: str, *, max_message_bytes: int, keys: "ServerKeys | None" = None) -> ServerChannel:
        return InprocServerChannel(max_message_bytes, keys)

    def connect(self, addresses: Sequence[str], *, keys: "ClientKeys | None" = None) -> ClientChannel:
        return InprocClientChannel(addresses, keys)

    def bind_link(self, bind_addr: str, *, send_timeout_s: float, keys: "ServerKeys | None" = None) -> Link:
        address = f"inproc://link-{next(_COUNTER)}"
        to_binder, to_connector = queue.Queue(), queue.Queue()
        binder = InprocLink(to_binder, to_connector, address, keys)
        with _LOCK:
            _LINKS[address] = (to_connector, to_binder, binder)
        return binder

    def connect_link(self, address: str, *, send_timeout_s: float, keys: "ClientKeys | None" = None) -> Link:
        with _LOCK:
            entry = _LINKS.get(address)
        if entry is None:
            raise PeerError(f"no in-process link is bound at {address}")
        inbox, outbox, binder = entry
        _check_handshake(f"the link at {address}", binder.keys, keys)
        return InprocLink(inbox, outbox, address)


register_transport("inproc", InprocTransport)
