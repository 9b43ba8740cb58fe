"""The KVStore interface (MXNet's push/pull on PyTorch tensors) and its wait handles."""
from __future__ import annotations

import abc
import functools
import inspect
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


def _refuse_sparse(what: str, values: Sequence) -> None:
    if any(isinstance(v, torch.Tensor) and v.layout != torch.strided for v in values):
        raise ConfigError(f"{what}: got a torch sparse tensor where a dense one is expected; row-sparse values go "
                          f"to keys initialised with torch.zeros((rows, dim), layout=torch.sparse_coo) "
                          f"(dist_* and local kvstores), read with kv.row_sparse_pull")


def sum_values(value: TensorOrList) -> torch.Tensor:
    """Values pushed as a list (one per device) are summed first, as in MXNet."""
    _refuse_sparse("push", [value] if isinstance(value, torch.Tensor) else list(value))
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
    _refuse_sparse("pull", outs)
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


def init_value(key: Key, value: Any) -> torch.Tensor:
    """MXNet's ``init(key, [value])``: a list holds one copy of the value per device;
    the first one is used."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"init of key {key!r} got an empty list of values")
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"init value for key {key!r} must be a tensor, got {type(value).__name__}")
    return value


def per_key(*arguments: str):
    """MXNet's list form of a KVStore method: ``kv.init([k1, k2], [v1, v2])``,
    ``kv.push(keys, values)``, ``kv.pull(keys, out=outs)``. With a list (or tuple) of
    keys, each argument named in ``arguments`` must be a list of the same length; the
    method runs once per key, and the result is a handle that waits for all of them
    (None for methods that return nothing). A single key passes straight through."""
    def decorate(method):
        signature = inspect.signature(method)

        @functools.wraps(method)
        def each(self, key, *args, **kwargs):
            if not isinstance(key, (list, tuple)):
                return method(self, key, *args, **kwargs)
            bound = signature.bind(self, key, *args, **kwargs).arguments
            keys = list(key)
            split = {}
            for name in arguments:
                given = bound.get(name)
                if given is None:
                    continue
                if not isinstance(given, (list, tuple)) or len(given) != len(keys):
                    raise ConfigError(f"{method.__name__} got {len(keys)} keys, so {name} must be a list of "
                                      f"{len(keys)} (one per key), got {type(given).__name__}"
                                      + (f" of {len(given)}" if isinstance(given, (list, tuple)) else ""))
                split[name] = list(given)
            results = []
            for index, one in enumerate(keys):
                call = {name: value for name, value in bound.items() if name != "self"}
                call.update({"key": one, **{name: values[index] for name, values in split.items()}})
                results.append(method(self, **call))
            handles = [r for r in results if isinstance(r, Handle)]
            if not handles:
                return None
            return Handle(lambda timeout: [h.wait(timeout) for h in handles], f"{method.__name__} of {len(keys)} keys")
        return each
    return decorate


#: What :meth:`KVStore.is_capable` can be asked (MXNet's ``KVStoreBase.OPTIMIZER`` is "optimizer").
CAPABILITIES = ("optimizer", "row_sparse", "gradient_compression", "broadcast", "pushpull", "optimizer_states")


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

    #: what this type can do (:meth:`is_capable`)
    capabilities: frozenset = frozenset({"broadcast", "pushpull"})

    def is_capable(self, capability: str) -> bool:
        """MXNet's ``kv.is_capable(name)``: whether this kvstore type can ``optimizer``
        (run updates where the values live), hold ``row_sparse`` keys, compress pushes
        (``gradient_compression``), save ``optimizer_states``, ``broadcast``, ``pushpull``."""
        if capability not in CAPABILITIES:
            raise ConfigError(f"capability={capability!r} is not known; ask one of: {', '.join(CAPABILITIES)}")
        return capability in self.capabilities

    def broadcast(self, key: Key, value: TensorOrList, out: TensorOrList, priority: int = 0) -> Handle:
        """MXNet's ``kv.broadcast``: initialise ``key`` with rank 0's ``value`` and pull it
        into ``out`` on every worker (lists of keys: lists of values and outs)."""
        self.init(key, value)
        return self.pull(key, out=out, priority=priority)

    def row_sparse_pull(self, key: Key, out: TensorOrList, row_ids: Any, priority: int = 0,
                        block: bool = True) -> Handle:
        """Fill ``out`` (``(len(row_ids), dim)``) with rows ``row_ids`` of a row-sparse key."""
        raise ConfigError(f"kvstore type {self.type!r} holds dense keys only; row-sparse keys (row_sparse_pull) "
                          f"live on local and dist_* kvstores")

    def save_optimizer_states(self, fname: str, dump_optimizer: bool = False) -> None:
        """Save the optimizer state that runs where the values live (dist_*)."""
        raise ConfigError(f"kvstore type {self.type!r} runs no optimizer (the Trainer's runs on the workers); "
                          f"save it with trainer.state_dict() / fit's checkpoint_dir")

    def load_optimizer_states(self, fname: str) -> None:
        """Load what :meth:`save_optimizer_states` wrote."""
        raise ConfigError(f"kvstore type {self.type!r} runs no optimizer (the Trainer's runs on the workers); "
                          f"load it with trainer.load_state_dict()")

    def _set_updater(self, updater: Any) -> None:
        """MXNet's ``kv._set_updater(updater)``: how a push changes the stored value."""
        raise ConfigError(f"kvstore type {self.type!r} keeps no values to update (it sums gradients); "
                          f"use local (an updater function) or dist_* (a registered server rule)")

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

    def depart(self) -> None:
        """This worker pushes no more but keeps reading (pulls, row pulls) until
        :meth:`close`: the servers stop waiting for its pushes. Default: nothing waits."""

