"""The one optimizer registry: which names train on the workers (a ``torch.optim``
class) and which update rules run on the parameter servers
(:class:`paratrain.ps.optimizer.ServerOptimizer`), under one name each.

    from paratrain.optimizers import register_optimizer
    register_optimizer("lion", worker=Lion)                 # a torch.optim.Optimizer
    register_optimizer("mxnet_test", server=MyServerRule)   # runs on the servers

A name may have both (``sgd``, ``adam``): with ``dist_*`` the servers run the rule,
elsewhere the workers run the torch class, and a model trained either way matches.
Servers import the modules named in ``PARATRAIN_SERVER_IMPORTS`` at start-up (see
:mod:`paratrain.env`), so a rule registered there reaches them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from paratrain.errors import ConfigError
from paratrain.ps import optimizer as server_rules


@dataclass(frozen=True)
class OptimizerEntry:
    """One name: the torch class workers build, the rule servers run (either may be None)."""

    name: str
    worker: type | None = None
    server: type | None = None


_REGISTRY: dict[str, OptimizerEntry] = {}


def register_optimizer(name: str, *, worker: type | None = None, server: type | None = None) -> None:
    """Add (or replace) ``name``: ``worker`` a ``torch.optim.Optimizer`` subclass,
    ``server`` a :class:`~paratrain.ps.optimizer.ServerOptimizer` dataclass."""
    if not isinstance(name, str) or not name or name != name.lower():
        raise ConfigError(f"optimizer name={name!r} must be a non-empty lower-case string")
    if worker is None and server is None:
        raise ConfigError(f"register_optimizer({name!r}) needs worker=, server= or both")
    if worker is not None and not (isinstance(worker, type) and issubclass(worker, torch.optim.Optimizer)):
        raise TypeError(f"worker={worker!r} for optimizer {name!r} must be a torch.optim.Optimizer subclass")
    if server is not None and not (isinstance(server, type) and issubclass(server, server_rules.ServerOptimizer)):
        raise TypeError(f"server={server!r} for optimizer {name!r} must be a ServerOptimizer subclass")
    _REGISTRY[name] = OptimizerEntry(name, worker, server)


def worker_optimizer_names() -> tuple[str, ...]:
    """Names a worker can build (``torch.optim``)."""
    return tuple(name for name, entry in _REGISTRY.items() if entry.worker is not None)


def server_optimizer_names() -> tuple[str, ...]:
    """Names the parameter servers can run."""
    return tuple(name for name, entry in _REGISTRY.items() if entry.server is not None)


def build_worker_optimizer(params: Iterable[torch.nn.Parameter], optimizer: Any,
                           optimizer_params: dict | None) -> torch.optim.Optimizer:
    """A torch optimizer from a registered name, a ``torch.optim`` class, or an instance."""
    if isinstance(optimizer, torch.optim.Optimizer):
        if optimizer_params:
            raise ConfigError("optimizer_params must be empty when an optimizer instance is given")
        return optimizer
    if isinstance(optimizer, str):
        names = worker_optimizer_names()
        if optimizer.lower() not in names:
            raise ConfigError(f"optimizer={optimizer!r} is not allowed; choose one of: {', '.join(names)}")
        optimizer = _REGISTRY[optimizer.lower()].worker
    if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
        raise TypeError(f"optimizer={optimizer!r}: give a name ({', '.join(worker_optimizer_names())}), "
                        "a torch.optim.Optimizer subclass or an instance")
    try:
        return optimizer(list(params), **(optimizer_params or {}))
    except TypeError as exc:
        raise ConfigError(f"optimizer_params {optimizer_params!r} rejected by {optimizer.__name__}: {exc}") from None


def _server_entry(name: str) -> OptimizerEntry:
    entry = _REGISTRY.get(name)
    if entry is None or entry.server is None:
        raise ConfigError(f"optimizer type={name!r} is not supported on servers; choose one of: "
                          f"{', '.join(server_optimizer_names())}")
    return entry


def build_server_optimizer(spec: Any) -> server_rules.ServerOptimizer:
    """A server rule from a spec dict (``{"type": "sgd", "lr": 0.1}``), a
    :class:`~paratrain.ps.optimizer.ServerOptimizer`, or a name with default
    hyperparameters."""
    if isinstance(spec, server_rules.ServerOptimizer):
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"optimizer spec {spec!r} must be a dict like {{'type': 'sgd', 'lr': 0.1}}, "
                          f"a name ({', '.join(server_optimizer_names())}) or a ServerOptimizer")
    params = dict(spec)
    name = str(params.pop("type", "")).lower()
    return _server_entry(name).server.from_params(params)


def server_optimizer_spec(optimizer: str, optimizer_params: dict) -> dict:
    """The server spec for a worker's optimizer name and its ``torch.optim`` parameters;
    refuses names without a server rule and options the rule cannot honour."""
    name = optimizer.lower()
    entry = _REGISTRY.get(name)
    if entry is None or entry.server is None:
        raise ConfigError(f"optimizer={optimizer!r} cannot run on the parameter servers; choose one of "
                          f"{', '.join(server_optimizer_names())}, or pass update_on_kvstore=False (dist_sync only)")
    params = dict(optimizer_params)
    changed = sorted(option for option, default in entry.server.torch_defaults_only.items()
                     if params.pop(option, default) != default)
    if changed:
        raise ConfigError(f"optimizer params {optimizer_params} use options the server {name} lacks "
                          f"({', '.join(changed)})")
    return {"type": name, **params}


register_optimizer("sgd", worker=torch.optim.SGD, server=server_rules.SGD)
register_optimizer("adam", worker=torch.optim.Adam, server=server_rules.Adam)
register_optimizer("adamw", worker=torch.optim.AdamW, server=server_rules.AdamW)
register_optimizer("rmsprop", worker=torch.optim.RMSprop)
register_optimizer("adagrad", worker=torch.optim.Adagrad)


def import_optimizer_plugins(modules: Iterable[str]) -> None:
    """Import each module named in ``PARATRAIN_SERVER_IMPORTS`` (they register update
    rules with :func:`register_optimizer`). Servers do it at start-up and workers when
    they connect, so both know the rule a spec names. A module that cannot be imported
    is a ConfigError naming it."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"PARATRAIN_SERVER_IMPORTS names module {name!r}, which cannot be imported: {exc}") from None


def optimizer_name(optimizer: Any) -> str | None:
    """The registered name of an optimizer given as a name, a ``torch.optim`` class or
    an instance; None for a class nobody registered."""
    if isinstance(optimizer, str):
        return optimizer.lower()
    cls = type(optimizer) if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    return next((name for name, entry in _REGISTRY.items() if entry.worker is cls), None)
