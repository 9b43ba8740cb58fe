"""The KVStore interface (MXNet's push/pull on PyTorch tensors) and its wait handles."""
from __future__ import annotations

import abc
import itertools
from typing import Any, Callable, Sequence, Union

import torch

from paratrain.errors import CommTimeout, ConfigError

Key = Union[int, str]
TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


class Handle:
    """A pending operation. ``wait(timeout)`` blocks until it is done or raises
    :class:`CommTimeout` naming what it waited for."""

    def __init__(self, wait_fn: Callable[[float | None], Any] | None = None, what: str = "operation"):
        self._wait_fn = wait_fn
        self._what = what
        self._done = wait_fn is None
        self._result: Any = None

    @classmethod
    def completed(cls, result: Any = None) -> "Handle":
        handle = cls(None)
        handle._result = result
        return handle

    def is_completed(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> Any:
        if not self._done:
            try:
                self._result = self._wait_fn(timeout)
            except CommTimeout:
                raise   # it names who was waited for, and for how long
            except TimeoutError as exc:
                limit = "the default limit" if timeout is None else f"{timeout}s"
                raise CommTimeout(f"timed out after {limit} waiting for {self._what}: {exc}") from exc
            self._done = True
        return self._result


def sum_values(value: TensorOrList) -> torch.Tensor:
    """Values pushed as a list (one per device) are summed first, as in MXNet."""
    if isinstance(value, torch.Tensor):
        return value
    values = list(value)
    if not values:
        raise ConfigError("push/pushpull got an empty list of values; give at least one tensor")
    total = values[0].detach().clone()
    for extra in values[1:]:
        total += extra.to(total.device)
    return total


def copy_out(result: torch.Tensor, out: TensorOrList) -> None:
    """Write ``result`` into ``out`` (one tensor or one per device)."""
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    for target in outs:
        if target.shape != result.shape:
            raise ConfigError(f"out has shape {tuple(target.shape)}, the key holds {tuple(result.shape)}")
        target.copy_(result)


_NAMESPACES = itertools.count()


def claim_key_namespace() -> int:
    """A fresh key namespace in this process, for one Trainer's parameters. Workers
    create their Trainers in the same order, so they agree on it; the first one
    (namespace 0) keeps plain integer keys."""
    return next(_NAMESPACES)


def namespaced(namespace: int, key: Key) -> Key:
    """``key`` inside ``namespace``: itself in namespace 0, ``"<namespace>/<key>"`` after."""
    return key if namespace == 0 else f"{namespace}/{key}"


def check_key(key: Any) -> Key:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise ConfigError(f"key={key!r} must be an int or a str")
    return key


class KVStore(abc.ABC):
    """Keys map to tensors. Every worker calls ``init`` for every key; ``push`` sends
    a value (gradients), ``pull`` reads the stored value, and a pull sees every push
    this worker made before it.

    ``push`` never blocks (its handle may be waited on); ``pull``/``pushpull`` block
    unless ``block=False``, in which case ``out`` is written when the handle is waited.
    """

    type: str = "base"
    #: set by each implementation: this worker's rank and the job's number of workers
    _rank: int = 0
    _num_workers: int = 1

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def num_workers(self) -> int:
        return self._num_workers

    @abc.abstractmethod
    def init(self, key: Key, value: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def push(self, key: Key, value: TensorOrList, priority: int = 0) -> Handle: ...

    @abc.abstractmethod
    def pull(self, key: Key, out: TensorOrList, priority: int = 0, block: bool = True) -> Handle: ...

    def pushpull(self, key: Key, value: TensorOrList, out: TensorOrList | None = None,
                 priority: int = 0, block: bool = True) -> Handle:
        """Push ``value`` then pull into ``out`` (``value`` itself when ``out`` is None)."""
        self.push(key, value, priority)
        if out is None:
            out = value
        return self.pull(key, out, priority, block=block)

    def set_optimizer(self, optimizer: Any) -> None:
        raise ConfigError(f"kvstore type {self.type!r} has no servers; set_optimizer is for dist_* types")

    def set_gradient_compression(self, compression: dict | None) -> None:
        raise ConfigError(f"kvstore type {self.type!r} does not support gradient compression")

    def barrier(self) -> None:
        """Block until every worker reached this call."""

    def close(self) -> None:
        """Release sockets and groups. Safe to call twice."""

    @property
    def bytes_sent(self) -> int:
        """Bytes this worker put on the wire so far (payload only)."""
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ServerKVStore(KVStore):
    """A KVStore whose values live on parameter servers (``dist_*``).

    Besides the KVStore API it offers what a gradient sync needs to push each gradient
    from a backward hook, before the step's normalisation is known:

    * ``push_scale``: every pushed value is multiplied by it on the server before it
      is summed or applied (1 / global batch);
    * ``push``/``pushpull`` with ``defer_scale=True``: the server holds the push,
      checked but unapplied, until this worker's :meth:`commit` brings the scale.
    """

    push_scale: float = 1.0

    @abc.abstractmethod
    def push(self, key: Key, value: TensorOrList, priority: int = 0, *, defer_scale: bool = False) -> Handle: ...

    @abc.abstractmethod
    def pushpull(self, key: Key, value: TensorOrList, out: TensorOrList | None = None, priority: int = 0,
                 block: bool = True, *, defer_scale: bool = False) -> Handle: ...

    @abc.abstractmethod
    def commit(self, scale: float, *, lr: float | None = None) -> Handle:
        """Apply this worker's deferred pushes since the last commit, scaled by
        ``scale``, with learning rate ``lr`` (None: the server rule's own)."""

