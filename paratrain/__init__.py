"""paratrain: distributed training on PyTorch, with MXNet's classic strategies.

    import paratrain
    trainer = paratrain.Trainer(model, "sgd", {"lr": 0.1}, kvstore="allreduce")
    paratrain.fit(model, train, heldout=test, strategy="allreduce", epochs=5)
"""
from __future__ import annotations

import importlib
import typing

__version__ = "0.1.0"
__all__ = ["Trainer", "fit", "kvstore", "__version__"]

if typing.TYPE_CHECKING:
    from paratrain import kvstore
    from paratrain.train import Trainer, fit

# Resolved on first use (PEP 562), so that what never trains (`paratrain --help`,
# `paratrain report`) starts without importing torch. The launcher (it hosts the job's
# TCPStore) and `paratrain train --print-config` still import it.
_LAZY = {"Trainer": "paratrain.train", "fit": "paratrain.train", "kvstore": "paratrain.kvstore"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'paratrain' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if name == "kvstore" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
