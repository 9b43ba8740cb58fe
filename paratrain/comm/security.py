"""Who may talk to whom: the job secret, every process's CURVE key pair, and ZeroMQ
sockets that authenticate at the handshake.

A job has one secret (at least 32 bytes). Every key pair is derived from it with
HKDF-SHA256 and a role name (``server/0``, ``worker/3``), so a process that holds
the secret computes any public key it needs and no key is ever exchanged: nothing
secret goes through the TCP store or over the network.

CURVE (ZeroMQ RFC 26) authenticates both ends and encrypts every frame. A client
names the server's public key: a server that does not hold the matching secret key
cannot complete the handshake, so an address rewritten in the store is worthless.
The server's ZAP handler (RFC 27) admits exactly the client keys it was given and
names each connection's role in the ZAP ``User-Id``, which every frame received on
that connection carries (``frame.get("User-Id")``): the role of a message's sender
comes from its key, never from what the message says. A peer that fails the
handshake is disconnected before any of its messages is queued.

Threat model (``docs/security.md`` says more): other users of the machine and
anyone on the network. A process of the job's own user can read the job's files
and memory, so it is trusted.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Sequence

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from paratrain.errors import ConfigError, PeerError

log = logging.getLogger("paratrain.comm.security")

MIN_SECRET_BYTES = 32
#: HKDF salt: a new version of the derivation gets a new salt, so keys never repeat.
KDF_SALT = b"paratrain/curve/v1"
#: The ZAP domain of parameter-server sockets (p2p links use ``p2p/<link>``).
PS_DOMAIN = "paratrain/ps"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"   # fixed by RFC 27: one handler per context
#: A peer that has not completed its handshake by then is disconnected: until then
#: libzmq may hold one incomplete handshake frame of it (up to MAXMSGSIZE).
SERVER_HANDSHAKE_S = 5.0
#: Denials logged at WARNING before the log is thinned to one in ``LOG_EVERY``.
LOUD_DENIALS = 10
LOG_EVERY = 1000

_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail", zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error",
           zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused", zmq.EVENT_DISCONNECTED: "disconnected"}
_WATCHED = zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(_FAILED)   # a client's view of its handshake
# A server's failed handshakes that ZAP never saw (the refusals it saw are logged there).
_FAILED_BEFORE_ZAP = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


# -- the secret ---------------------------------------------------------------------------

def new_secret() -> str:
    """A fresh job secret: 32 random bytes as 64 hex characters."""
    return secrets.token_hex(32)


def secret_bytes(secret: str | bytes, source: str = "the job secret") -> bytes:
    """``secret`` as bytes, or ConfigError when it is too short to be a key."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(f"{source} holds {len(raw)} bytes; a job secret needs at least {MIN_SECRET_BYTES} "
                          f"(make one with: python -c 'import secrets; print(secrets.token_hex(32))')")
    return raw


def read_secret_file(path: str) -> str:
    """The secret in ``path``: text (hex, as :func:`new_secret` makes), surrounding
    whitespace stripped. The file must be a regular file of this user that no one
    else may read or write (mode 0600 or stricter); anything else is a ConfigError
    naming the path and the problem."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"--secret-file {path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"--secret-file {path}: not a regular file")
    if info.st_uid != os.getuid():
        raise ConfigError(f"--secret-file {path}: owned by uid {info.st_uid}, not by this user ({os.getuid()})")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigError(f"--secret-file {path}: mode {mode:04o} lets other users read or write it; "
                          f"run chmod 600 {path}")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(1 << 16)
    except OSError as exc:
        raise ConfigError(f"--secret-file {path}: cannot be read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"--secret-file {path}: not text; write the secret as hex "
                          f"(python -c 'import secrets; print(secrets.token_hex(32))')") from None
    secret_bytes(text, f"--secret-file {path}")
    return text


def resolve_job_secret(*, secret_file: str | None, env_secret: str, nnodes: int) -> str:
    """The job secret a launcher hands out: from ``secret_file``, else the user's
    ``PARATRAIN_SECRET`` (``env_secret``), else a fresh one for a one-machine job.
    A job across machines needs one of the first two: its nodes share nothing
    secret through the store."""
    if secret_file:
        return read_secret_file(secret_file)
    if env_secret:
        secret_bytes(env_secret, "PARATRAIN_SECRET")
        return env_secret
    if nnodes > 1:
        raise ConfigError(f"nnodes={nnodes}: every node needs the same job secret, given out of band: "
                          f"--secret-file PATH (mode 0600) or PARATRAIN_SECRET on every node")
    return new_secret()


# -- key derivation (pure) -----------------------------------------------------------------

def hkdf_sha256(key_material: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF with SHA-256 (RFC 5869): extract with ``salt``, expand to ``length`` bytes."""
    if not 0 < length <= 255 * 32:
        raise ValueError(f"length={length} must be in [1, {255 * 32}]")
    prk = hmac.new(salt, key_material, hashlib.sha256).digest()
    block, out = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
    return out[:length]


def server_role(server: int) -> str:
    return f"server/{server}"


def worker_role(rank: int) -> str:
    return f"worker/{rank}"


def worker_rank(role: str | None) -> int | None:
    """The rank in a ``worker/<rank>`` role, else None."""
    if not role or not role.startswith("worker/"):
        return None
    digits = role[len("worker/"):]
    return int(digits) if digits.isdigit() and digits == str(int(digits)) else None


@dataclass(frozen=True)
class KeyPair:
    """One role's CURVE keys, Z85-encoded (40 bytes each)."""

    role: str
    public_key: bytes
    secret_key: bytes = field(repr=False)


def derive_keypair(secret: bytes, role: str) -> KeyPair:
    """The key pair of ``role``: its secret key is HKDF(secret, role) (any 32 bytes
    are a Curve25519 secret key), its public key follows from that."""
    secret_key = z85.encode(hkdf_sha256(secret, salt=KDF_SALT, info=role.encode("utf-8")))
    return KeyPair(role, zmq.curve_public(secret_key), secret_key)


@dataclass(frozen=True)
class ServerKeys:
    """What a CURVE server socket needs: its own key pair and the clients it admits
    (role -> public key)."""

    identity: KeyPair
    allowed: Mapping[str, bytes]


@dataclass(frozen=True)
class ClientKeys:
    """What CURVE client sockets need: their key pair and the public key of each
    server they connect to, in order (``server_roles`` names them, for errors)."""

    identity: KeyPair
    server_public_keys: tuple[bytes, ...]
    server_roles: tuple[str, ...] = ()


class Keyring:
    """The keys a process builds its sockets' keys from: :meth:`keypair` (the
    roles it may act as) and :meth:`public_key` (the roles it may talk to)."""

    def keypair(self, role: str) -> KeyPair:
        raise NotImplementedError

    def public_key(self, role: str) -> bytes:
        raise NotImplementedError

    def server(self, role: str, client_roles: Sequence[str]) -> ServerKeys:
        """Keys of a server socket held by ``role`` that admits ``client_roles``."""
        return ServerKeys(self.keypair(role), {client: self.public_key(client) for client in client_roles})

    def client(self, role: str, server_roles: Sequence[str]) -> ClientKeys:
        """Keys of client sockets held by ``role`` that connect to ``server_roles``."""
        return ClientKeys(self.keypair(role), tuple(self.public_key(server) for server in server_roles),
                          tuple(server_roles))

    def ps_server(self, server: int, num_workers: int) -> ServerKeys:
        """Parameter server ``server``: admits workers ``0..num_workers-1``."""
        return self.server(server_role(server), [worker_role(rank) for rank in range(num_workers)])

    def ps_client(self, rank: int, num_servers: int) -> ClientKeys:
        """Worker ``rank``'s connections to servers ``0..num_servers-1``."""
        return self.client(worker_role(rank), [server_role(s) for s in range(num_servers)])

    def link_server(self, rank: int, peer: int) -> ServerKeys:
        """The binding side (``rank``) of a link that admits ``peer`` only."""
        return self.server(worker_role(rank), [worker_role(peer)])

    def link_client(self, rank: int, peer: int) -> ClientKeys:
        """The connecting side (``rank``) of a link bound by ``peer``."""
        return self.client(worker_role(rank), [worker_role(peer)])


class JobKeys(Keyring):
    """Every key pair of one job, derived on demand from its secret."""

    def __init__(self, secret: str | bytes):
        self._secret = secret_bytes(secret)
        self._derive = lru_cache(maxsize=None)(lambda role: derive_keypair(self._secret, role))

    def __repr__(self) -> str:
        return "JobKeys(<secret hidden>)"

    def keypair(self, role: str) -> KeyPair:
        return self._derive(role)

    def public_key(self, role: str) -> bytes:
        return self._derive(role).public_key

    def share(self, role: str, *, num_workers: int, num_servers: int) -> "ProcessKeys":
        """What the process of ``role`` needs and no more: its own key pair and the
        public keys of every worker and server of the job."""
        roles = [worker_role(r) for r in range(num_workers)] + [server_role(s) for s in range(num_servers)]
        return ProcessKeys(self.keypair(role), {other: self.public_key(other) for other in roles})


class ProcessKeys(Keyring):
    """One process's share of the job's keys (:meth:`JobKeys.share`): it can act
    only as its own role, and its text form (:meth:`to_text`) can be handed to the
    process instead of the job secret."""

    def __init__(self, identity: KeyPair, public_keys: Mapping[str, bytes]):
        self.identity = identity
        self._public_keys = {**public_keys, identity.role: identity.public_key}

    def __repr__(self) -> str:
        return f"ProcessKeys({self.identity.role!r}, {len(self._public_keys)} public keys)"

    def keypair(self, role: str) -> KeyPair:
        if role != self.identity.role:
            raise ConfigError(f"this process holds the secret key of {self.identity.role!r} only, not of {role!r}")
        return self.identity

    def public_key(self, role: str) -> bytes:
        if role not in self._public_keys:
            raise ConfigError(f"no public key for role {role!r} in this process's keys")
        return self._public_keys[role]

    def to_text(self) -> str:
        return json.dumps({"role": self.identity.role, "secret_key": self.identity.secret_key.decode(),
                           "public_keys": {r: k.decode() for r, k in sorted(self._public_keys.items())}})

    @classmethod
    def from_text(cls, text: str) -> "ProcessKeys":
        """Inverse of :meth:`to_text`; ConfigError when the text is not one or its
        key pair does not match."""
        try:
            data = json.loads(text)
            secret_key = data["secret_key"].encode()
            identity = KeyPair(data["role"], zmq.curve_public(secret_key), secret_key)
            public_keys = {role: key.encode() for role, key in data["public_keys"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, zmq.ZMQError) as exc:
            raise ConfigError(f"process keys are not valid ({type(exc).__name__}: {exc})") from None
        if public_keys.get(identity.role, identity.public_key) != identity.public_key:
            raise ConfigError(f"process keys of {identity.role!r}: the public key does not match the secret key")
        return cls(identity, public_keys)


# -- the ZAP handler ----------------------------------------------------------------------

class ZapHandler:
    """Answers libzmq's authentication requests (ZAP) for every CURVE server socket
    of one context: a client key in the socket's domain's allow-list is admitted
    with its role as User-Id; any other is refused, counted and logged. It also
    watches those sockets for handshakes that fail before ZAP is asked (a plain
    ZeroMQ peer, a client that does not know the server's key), and counts and
    logs them too.

    It binds the ZAP endpoint at construction, so a CURVE server socket configured
    after it is never without a handler (libzmq would then admit any key)."""

    def __init__(self, context: zmq.Context):
        self._allowed: dict[bytes, dict[bytes, str]] = {}   # domain -> binary public key -> role
        self.accepted = 0
        self.denied = 0              # keys refused by this handler
        self.failed_handshakes = 0   # peers that failed before ZAP was asked
        self._context = context
        self._socket = context.socket(zmq.REP)
        self._socket.linger = 0
        self._socket.bind(ZAP_ENDPOINT)
        control = f"inproc://paratrain-zap-control-{id(self):x}"
        self._control_in = context.socket(zmq.PAIR)
        self._control_in.bind(control)
        self._control = context.socket(zmq.PAIR)
        self._control.linger = 0
        self._control.connect(control)
        self._control_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="paratrain-zap", daemon=True)
        self._thread.start()

    def allow(self, domain: str, allowed: Mapping[str, bytes]) -> None:
        """Admit the keys of ``allowed`` (role -> Z85 public key) on ``domain``."""
        table = {z85.decode(public_key): role for role, public_key in allowed.items()}
        self._allowed = {**self._allowed, domain.encode("utf-8"): table}   # one atomic swap

    def watch(self, sock: zmq.Socket) -> None:
        """Count and log the failed handshakes of ``sock`` (called from its thread)."""
        endpoint = f"inproc://paratrain-zap-monitor-{id(sock):x}"
        sock.monitor(endpoint, _FAILED_BEFORE_ZAP)
        self._tell(b"watch " + endpoint.encode())

    def stop(self) -> None:
        """End the thread and close its sockets (before the context is terminated)."""
        if self._thread.is_alive():
            self._tell(b"stop")
            self._thread.join(timeout=5.0)
        self._control.close()

    def _tell(self, command: bytes) -> None:
        with self._control_lock:
            self._control.send(command)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._control_in, zmq.POLLIN)
        monitors: list[zmq.Socket] = []
        try:
            while True:
                for sock, _ in poller.poll():
                    if sock is self._socket:
                        self._socket.send_multipart(self._answer_safely(self._socket.recv_multipart()))
                    elif sock is self._control_in:
                        command = self._control_in.recv()
                        if command == b"stop":
                            return
                        monitor = self._context.socket(zmq.PAIR)
                        monitor.connect(command.split(b" ", 1)[1].decode())
                        poller.register(monitor, zmq.POLLIN)
                        monitors.append(monitor)
                    elif self._on_event(parse_monitor_message(sock.recv_multipart())):
                        poller.unregister(sock)
                        monitors.remove(sock)
                        sock.close(linger=0)
        finally:
            for sock in [self._socket, self._control_in, *monitors]:
                sock.close(linger=0)

    def _answer_safely(self, request: list[bytes]) -> list[bytes]:
        # The thread must outlive any bug: without it libzmq would admit every key.
        try:
            return self._answer(request)
        except Exception:   # noqa: BLE001 - refused and logged, never fatal
            log.exception("ZAP request refused after an internal error")
            return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"internal error", b"", b""]

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:   # not even a request id to answer to: only libzmq writes here
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _routing_id, mechanism, *credentials = request
        role = None
        if version == b"1.0" and mechanism == b"CURVE" and len(credentials) == 1:
            role = self._allowed.get(domain, {}).get(credentials[0])
        if role is None:
            self.denied += 1
            key = z85.encode(credentials[0]).decode() if len(credentials) == 1 and len(credentials[0]) == 32 else "-"
            self._log(self.denied, "refused a %s client from %s on %s: key %s is not one of this job's "
                      "(%d refused so far)", mechanism.decode(errors="replace"), address.decode(errors="replace"),
                      domain.decode(errors="replace"), key, self.denied)
            return [b"1.0", request_id, b"400", b"key not admitted", b"", b""]
        self.accepted += 1
        return [b"1.0", request_id, b"200", b"OK", role.encode("utf-8"), b""]

    def _on_event(self, event: dict) -> bool:
        """Count a failed handshake; True when the monitor stopped (its socket closed)."""
        if event["event"] == zmq.EVENT_MONITOR_STOPPED:
            return True
        self.failed_handshakes += 1
        self._log(self.failed_handshakes, "a peer failed the CURVE handshake on %s (%s, code %#x): not a "
                  "client of this job (%d so far)", event["endpoint"].decode(errors="replace"),
                  _FAILED.get(event["event"], "?"), event["value"], self.failed_handshakes)
        return False

    @staticmethod
    def _log(count: int, text: str, *args) -> None:
        if count <= LOUD_DENIALS or count % LOG_EVERY == 0:   # a flood must not flood the log
            log.warning(text, *args)


_HANDLERS: dict[zmq.Context, ZapHandler] = {}
_HANDLERS_LOCK = threading.Lock()


def zap_handler(context: zmq.Context) -> ZapHandler:
    """The ZAP handler of ``context``, started on first use."""
    with _HANDLERS_LOCK:
        if context not in _HANDLERS:
            _HANDLERS[context] = ZapHandler(context)
        return _HANDLERS[context]


def stop_zap_handler(context: zmq.Context) -> None:
    """Stop ``context``'s ZAP handler, if it has one (call before ``context.term()``)."""
    with _HANDLERS_LOCK:
        handler = _HANDLERS.pop(context, None)
    if handler is not None:
        handler.stop()


# -- sockets ------------------------------------------------------------------------------

def configure_curve_server(sock: zmq.Socket, keys: ServerKeys, *, domain: str) -> ZapHandler:
    """Make ``sock`` (before it binds) a CURVE server holding ``keys.identity`` that
    admits exactly the clients in ``keys.allowed``."""
    handler = zap_handler(sock.context)
    handler.allow(domain, keys.allowed)
    handler.watch(sock)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.identity.secret_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.identity.public_key)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode("utf-8"))
    sock.setsockopt(zmq.HANDSHAKE_IVL, int(SERVER_HANDSHAKE_S * 1000))
    return handler


def configure_curve_client(sock: zmq.Socket, identity: KeyPair, server_public_key: bytes) -> None:
    """Make ``sock`` (before it connects) a CURVE client holding ``identity`` that
    only talks to the holder of ``server_public_key``."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, identity.public_key)
    sock.setsockopt(zmq.CURVE_SECRETKEY, identity.secret_key)


def sender_role(frame: zmq.Frame) -> str | None:
    """The role (ZAP User-Id) of the connection ``frame`` came in on; None when the
    connection was not authenticated by a ZAP handler."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


class HandshakeError(PeerError):
    """A handshake did not complete. ``refused``: the peer refused this process's key
    (it runs with another job secret; trying again cannot help). Otherwise the peer did
    not prove it holds the key expected of it: an address rewritten in the store,
    another job's process, or nothing listening there (an announced address may be
    read again)."""

    def __init__(self, text: str, *, refused: bool = False) -> None:
        super().__init__(text)
        self.refused = refused


def key_refused(what: str) -> HandshakeError:
    """The error for a peer (``what``) that refused this process's key."""
    return HandshakeError(f"{what} refused this process's key: it runs with another job secret "
                          f"(check --secret-file / PARATRAIN_SECRET on every node)", refused=True)


def key_unproven(what: str, detail: str) -> HandshakeError:
    """The error for a peer (``what``) that did not prove its key (``detail``: how)."""
    return HandshakeError(f"{what} could not prove it holds this job's key ({detail}): the address may have "
                          f"been rewritten, it is another job's process, or this process runs with another job "
                          f"secret (check --secret-file / PARATRAIN_SECRET)")


class HandshakeCheck:
    """Waits for the first CURVE handshake of client sockets, so that a server
    without the right key is named at once instead of leaving requests unanswered.
    Call :meth:`watch` before ``connect``, then :meth:`wait`."""

    def __init__(self) -> None:
        self._monitors: dict[zmq.Socket, tuple[zmq.Socket, str]] = {}

    def watch(self, sock: zmq.Socket, what: str) -> None:
        """Watch ``sock``; ``what`` names its peer in errors ("server 0 at tcp://...")."""
        self._monitors[sock.get_monitor_socket(_WATCHED)] = (sock, what)

    def wait(self, timeout_s: float) -> None:
        """Return when every watched socket completed its handshake; raise PeerError
        naming the first peer that failed it, or that none came within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        for monitor in self._monitors:
            poller.register(monitor, zmq.POLLIN)
        pending = dict(self._monitors)
        try:
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = ", ".join(what for _, what in pending.values())
                    raise HandshakeError(f"no CURVE handshake with {names} within {timeout_s:.1f}s: unreachable, "
                                         f"or not this job's process")
                for monitor, _ in poller.poll(int(remaining * 1000) + 1):
                    event = parse_monitor_message(monitor.recv_multipart())["event"]
                    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        poller.unregister(monitor)
                        del pending[monitor]
                    elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                        raise key_refused(pending[monitor][1])
                    elif event in _FAILED:
                        raise key_unproven(pending[monitor][1], f"CURVE handshake failed: {_FAILED[event]}")
        finally:
            for monitor, (sock, _) in self._monitors.items():
                sock.disable_monitor()
                monitor.close(linger=0)
            self._monitors = {}
