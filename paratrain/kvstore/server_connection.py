"""A worker's requests to the parameter servers: the layer under the ``dist_*`` KVStores.

As in ps-lite, the KVStore API sits on request tracking: every request gets an id,
replies are matched to it when someone waits, an ``ERROR`` reply raises naming the
server, and every wait has a deadline. A server that restarts (from its snapshot)
counts its epoch up in the job's store; a worker that has waited a while for a reply
looks there, reconnects to the new address, says hello again and resends every
request still unanswered (the server drops a push it already applied).

Connections are CURVE-authenticated both ways (:mod:`paratrain.comm.security`): this
worker proves its own key, and each server must prove it holds its server key. An
address in the store that leads to anything else (someone rewrote it) is refused: at
start-up the worker reads the addresses again until its timeout (the real server puts
its own back), and after a "restart" it keeps talking to the servers it has.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Sequence

import torch.distributed as dist

from paratrain.comm.security import HandshakeError, JobKeys
from paratrain.comm.transport import ClientChannel, get_transport
from paratrain.errors import CommTimeout, ConfigError, PeerError
from paratrain.ps import protocol
from paratrain.ps.protocol import Message, Op

log = logging.getLogger("paratrain.kvstore.dist")

#: A worker waiting this long for a reply asks the store whether a server restarted;
#: it asks again after twice as long each time, up to PROBE_MAX_S (backoff).
PROBE_FIRST_S = 1.0
PROBE_MAX_S = 4.0
#: Pause before a worker reads the servers' addresses again after one failed to prove its key.
REREAD_AFTER_S = 0.5
# The worker's receive path trusts nothing more than the server's does.
_MAX_REPLY_BYTES = 1 << 34

Request = tuple[int, int]   # (server, request id)


class ServerConnection:
    """One worker's channel to every server, with request ids, reply matching and
    restart recovery. ``secret``: the job's, from which this worker's key and the
    servers' public keys are derived. ``hello`` is what the worker tells each server
    when it connects (rank, job terms, its session name); ``store`` (the job's TCP
    store, or None in unit tests) is where servers announce their addresses and
    restarts. :attr:`max_message_bytes` is each server's limit (its HELLO reply)."""

    def __init__(self, *, rank: int, addresses: Sequence[str], transport: str, secret: str, hello: dict,
                 timeout_s: float, store=None) -> None:
        self.rank = rank
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        #: held by the KVStore across operations that must not interleave with others
        self.lock = threading.RLock()
        self.reconnects = 0
        self.max_message_bytes: list[int] = []
        try:
            self._keys = JobKeys(secret).ps_client(rank, len(self.addresses))
        except ConfigError as exc:
            raise ConfigError(f"worker {rank}: {exc} (PARATRAIN_SECRET)") from None
        self._transport, self._hello, self._store = transport, hello, store
        self._ids = itertools.count(1)
        self._replies: dict[int, tuple[int, Message]] = {}
        self._unanswered: dict[int, tuple[int, list]] = {}   # kept to be resent after a restart
        self._handshaking = False
        self._epochs = self._server_epochs()
        self.channel: ClientChannel = self._connect_verified()
        self._handshake()

    @property
    def num_servers(self) -> int:
        return len(self.addresses)

    def next_id(self) -> int:
        return next(self._ids)

    def send(self, server: int, frames: list) -> Request:
        """Send one encoded message; returns the request to wait for."""
        request_id = protocol.request_id_of(frames)
        with self.lock:
            if self._store is not None and not self._handshaking:
                self._unanswered[request_id] = (server, frames)
            self.channel.send(server, frames)
        return server, request_id

    def request(self, server: int, op: Op, **fields) -> Request:
        """Encode a message of ``op`` with a fresh request id and send it."""
        return self.send(server, protocol.encode(op, request_id=self.next_id(), **fields))

    def request_all(self, op: Op, **fields) -> list[Request]:
        """Send ``op`` to every server."""
        return [self.request(server, op, **fields) for server in range(self.num_servers)]

    def collect(self, requests: list[Request], what: str, timeout_s: float) -> dict[int, Message]:
        """Wait for the replies to ``requests`` (request id -> reply); raise
        :class:`PeerError` on an error reply, :class:`CommTimeout` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        wanted = {request_id: server for server, request_id in requests}
        found: dict[int, Message] = {}
        probe_after = PROBE_FIRST_S
        next_probe = time.monotonic() + probe_after
        with self.lock:
            while True:
                self._take_replies(wanted, found, what)
                if not wanted:
                    return found
                probing = self._store is not None and not self._handshaking
                if probing and time.monotonic() >= next_probe:
                    if self._reconnect_if_restarted():
                        deadline = time.monotonic() + timeout_s   # a fresh wait on the new server
                    probe_after = min(2 * probe_after, PROBE_MAX_S)
                    next_probe = time.monotonic() + probe_after
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommTimeout(f"worker {self.rank}: {what} got no reply from server(s) "
                                      f"{sorted(set(wanted.values()))} within {timeout_s:.1f}s")
                self._receive_one(min(remaining, max(0.01, next_probe - time.monotonic())) if probing else remaining)

    def close(self) -> None:
        self.channel.close()

    # -- internals ------------------------------------------------------------------

    def _take_replies(self, wanted: dict[int, int], found: dict[int, Message], what: str) -> None:
        """Move the replies that arrived for ``wanted`` into ``found``; raise on an error reply."""
        for request_id in [r for r in wanted if r in self._replies]:
            server, message = self._replies.pop(request_id)
            self._unanswered.pop(request_id, None)
            found[request_id] = message
            del wanted[request_id]
            if message.op == Op.ERROR:
                error = message.control().get("error", "unknown error")
                raise PeerError(f"worker {self.rank}: {what} failed on server {server} at "
                                f"{self.addresses[server]}: {error}")

    def _receive_one(self, timeout_s: float) -> None:
        item = self.channel.recv(min(timeout_s, 1.0))
        if item is None:
            return
        server, frames = item
        message = protocol.decode(frames, max_payload_bytes=_MAX_REPLY_BYTES)
        if message.op == Op.ERROR and message.request_id == 0:
            raise PeerError(f"worker {self.rank}: server {server} rejected a message: "
                            f"{message.control().get('error')}")
        self._replies[message.request_id] = (server, message)

    def _server_epochs(self) -> list[int] | None:
        """How often each server has started (it counts itself up in the store)."""
        if self._store is None:
            return None
        try:
            return [self._store.add(f"ps/server/{s}/epoch", 0) for s in range(self.num_servers)]
        except Exception as exc:   # torch raises DistNetworkError, DistStoreError or RuntimeError
            raise PeerError(f"worker {self.rank}: lost the job's store at {store_address(self._store)} "
                            f"(hosted on node 0) while waiting for parameter server(s) at {self.addresses}: "
                            f"node 0 is down or unreachable ({exc})") from None

    def _connect(self) -> ClientChannel:
        return get_transport(self._transport).connect(self.addresses, keys=self._keys)

    def _read_addresses(self) -> list[str]:
        return [self._store.get(f"ps/server/{s}").decode("utf-8") for s in range(self.num_servers)]

    def _connect_verified(self) -> ClientChannel:
        """Connect to every server; while one does not prove its key and the timeout
        allows, read the addresses from the store again and retry."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return self._connect()
            except HandshakeError as exc:
                if exc.refused or self._store is None or time.monotonic() + REREAD_AFTER_S > deadline:
                    raise PeerError(f"worker {self.rank}: {exc}") from None
                log.warning("worker %d: %s; reading the servers' addresses again", self.rank, exc)
            time.sleep(REREAD_AFTER_S)
            self.addresses = self._read_addresses()

    def _reconnect_if_restarted(self) -> bool:
        """If a server restarted, connect to its new address, say hello again, and
        resend every request still unanswered. An announced address whose server does
        not prove its key is ignored: this worker keeps its connections."""
        epochs = self._server_epochs()
        if epochs == self._epochs:
            return False
        restarted = [s for s, (old, new) in enumerate(zip(self._epochs, epochs)) if old != new]
        addresses = self._read_addresses()
        try:
            channel = get_transport(self._transport).connect(addresses, keys=self._keys)
        except HandshakeError as exc:
            if exc.refused:
                raise PeerError(f"worker {self.rank}: {exc}") from None
            log.warning("worker %d: server(s) %s announced a restart, but %s; keeping the current connections",
                        self.rank, restarted, exc)
            return False
        self._epochs, self.addresses = epochs, addresses
        self.channel.close()
        self.channel = channel
        self._handshake()
        for request_id in sorted(self._unanswered):
            if request_id not in self._replies:
                server, frames = self._unanswered[request_id]
                self.channel.send(server, frames)
        self.reconnects += 1
        log.warning("worker %d: server(s) %s restarted; reconnected and resent %d unanswered request(s)",
                    self.rank, restarted, len(self._unanswered))
        return True

    def _handshake(self) -> None:
        """HELLO to every server: the keys are proved already, it says how this worker
        joins the job; each OK carries that server's message limit."""
        self._handshaking = True
        try:
            requests = self.request_all(Op.HELLO, payload=protocol.encode_json(self._hello))
            replies = self.collect(requests, "hello", self.timeout_s)
            self.max_message_bytes = [replies[request_id].length for _, request_id in requests]
        finally:
            self._handshaking = False


def store_address(store) -> str:
    """``host:port`` of a (prefixed) TCP store, for error messages."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return f"{store.host}:{store.port}" if isinstance(store, dist.TCPStore) else type(store).__name__
