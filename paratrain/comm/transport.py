"""A small message transport interface, chosen by name (as ps-lite's ``Van``).

Everything paratrain sends outside torch.distributed is a message (a list of frames)
on a channel made by a :class:`Transport`:

* the parameter server: a server listens on one :class:`ServerChannel` and replies to
  whichever peer asked; a worker holds one :class:`ClientChannel` to every server;
* pipeline stages: two neighbours share one :class:`Link`, an ordered two-way channel
  (one side binds and publishes its address, the other connects).

Two implementations register themselves: ``zmq`` (ZeroMQ over TCP, zero-copy frames)
and ``inproc`` (queues inside one process, for unit tests that need no sockets).
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, Sequence

from paratrain.errors import ConfigError

if TYPE_CHECKING:
    from paratrain.comm.security import ClientKeys, ServerKeys

Frames = Sequence[Any]  # bytes, memoryview or anything with the buffer protocol


class SendTracker(abc.ABC):
    """Tells when the transport no longer reads a zero-copy frame (its memory may
    then be changed)."""

    @property
    @abc.abstractmethod
    def done(self) -> bool: ...

    @abc.abstractmethod
    def wait(self, timeout_s: float) -> None: ...


class DoneTracker(SendTracker):
    """For transports that copy on send."""

    @property
    def done(self) -> bool:
        return True

    def wait(self, timeout_s: float) -> None:
        return None


class ServerChannel(abc.ABC):
    """The listening side. Peers are opaque ids (bytes) given by :meth:`recv`."""

    #: The address clients connect to (announced through the rendezvous store).
    address: str

    @abc.abstractmethod
    def recv(self, timeout_s: float) -> tuple[bytes, list] | None:
        """The next ``(peer, frames)``, or None when nothing came within ``timeout_s``."""

    @abc.abstractmethod
    def send(self, peer: bytes, frames: Frames) -> SendTracker:
        """Queue ``frames`` for ``peer`` without blocking."""

    @abc.abstractmethod
    def drop(self, peer: bytes) -> None:
        """Forget a misbehaving peer (no more replies go to it)."""

    def peer_role(self, peer: bytes) -> str | None:
        """The role ``peer`` proved at the handshake (``"worker/3"``), or None where
        this channel does not authenticate its peers."""
        return None

    @abc.abstractmethod
    def close(self) -> None: ...


class ClientChannel(abc.ABC):
    """One worker's connections to servers ``0..len(addresses)-1``."""

    @abc.abstractmethod
    def send(self, server: int, frames: Frames) -> SendTracker:
        """Queue ``frames`` for ``server`` without blocking."""

    @abc.abstractmethod
    def recv(self, timeout_s: float) -> tuple[int, list] | None:
        """The next ``(server, frames)`` reply, or None after ``timeout_s``."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Link(abc.ABC):
    """An ordered two-way channel between two processes. The binding side's
    :attr:`address` is what the other side connects to."""

    address: str = ""

    @abc.abstractmethod
    def send(self, frames: Frames) -> None:
        """Queue one message for the peer without waiting for it to be read; raises
        :class:`paratrain.errors.CommTimeout` if it cannot be queued in time."""

    @abc.abstractmethod
    def recv(self, timeout_s: float) -> list | None:
        """The next message from the peer, or None when nothing came within ``timeout_s``."""

    @abc.abstractmethod
    def close(self, linger_s: float = 0.0) -> None:
        """Release the link, letting queued messages leave for up to ``linger_s``."""


class Transport(abc.ABC):
    """Makes channels. ``max_message_bytes`` bounds what a server accepts;
    ``send_timeout_s`` bounds how long a link's send may wait for queue space. With
    ``keys`` (see :mod:`paratrain.comm.security`) both ends prove their keys to each
    other before any message is delivered: a client or a link's connecting side
    raises :class:`paratrain.errors.PeerError` when the other end cannot."""

    name: str = "base"

    @abc.abstractmethod
    def listen(self, bind_addr: str, *, max_message_bytes: int,
               keys: "ServerKeys | None" = None) -> ServerChannel: ...

    @abc.abstractmethod
    def connect(self, addresses: Sequence[str], *, keys: "ClientKeys | None" = None) -> ClientChannel: ...

    @abc.abstractmethod
    def bind_link(self, bind_addr: str, *, send_timeout_s: float, keys: "ServerKeys | None" = None) -> Link:
        """A link waiting for its peer at a free port of ``bind_addr``; with ``keys``
        only the peer they admit gets through."""

    @abc.abstractmethod
    def connect_link(self, address: str, *, send_timeout_s: float, keys: "ClientKeys | None" = None) -> Link:
        """A link to the peer that bound ``address``; with ``keys`` it returns once that
        peer proved it holds the one server key in them."""


_REGISTRY: dict[str, Callable[[], Transport]] = {}


def register_transport(name: str, factory: Callable[[], Transport]) -> None:
    """Make ``get_transport(name)`` build transports with ``factory``."""
    _REGISTRY[name] = factory


def get_transport(name: str) -> Transport:
    """The transport registered as ``name`` (``zmq`` or ``inproc``)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"transport={name!r} is not known; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def _load_builtin() -> None:
    # Imported lazily so that `import paratrain.comm` does not pull in pyzmq.
    from paratrain.comm import inproc_transport, zmq_transport  # noqa: F401
