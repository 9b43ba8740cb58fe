"""The one strategy descriptor: what each strategy (and each KVStore type) is.

Every question of the form "does this strategy use parameter servers?", "do its
workers move in lockstep?", "is the model split into stages?" is answered here and
nowhere else. KVStore types are the strategies of the same name (``local``,
``allreduce``, ``dist_sync``, ``dist_async``, ``dist_ssp``). Pure data, below every
layer, so that the kvstore, the servers, the gradient syncs, the trainer, the config
and the CLI read the same table.
"""
from __future__ import annotations

from dataclasses import dataclass

from paratrain.errors import check_choice


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy is, as every layer needs to know it."""

    name: str
    #: the KVStore type that aggregates its gradients (None: pipeline stages sum their
    #: replicas' gradients themselves)
    kvstore: str | None
    #: runs parameter-server processes (``--servers``)
    uses_servers: bool = False
    #: every worker takes part in every step (collectives each step); False for the
    #: asynchronous parameter-server modes, whose workers run at their own pace
    lockstep: bool = True
    #: the model is cut into pipeline stages
    pipelined: bool = False
    #: a KVStore type (``paratrain.kvstore.create`` accepts the name)
    is_kvstore_type: bool = False

    @property
    def asynchronous(self) -> bool:
        """Workers do not wait for each other (``dist_async``, ``dist_ssp``)."""
        return not self.lockstep


_SPECS = (
    StrategySpec("local", kvstore="local", is_kvstore_type=True),
    StrategySpec("allreduce", kvstore="allreduce", is_kvstore_type=True),
    StrategySpec("dist_sync", kvstore="dist_sync", uses_servers=True, is_kvstore_type=True),
    StrategySpec("dist_async", kvstore="dist_async", uses_servers=True, lockstep=False, is_kvstore_type=True),
    StrategySpec("dist_ssp", kvstore="dist_ssp", uses_servers=True, lockstep=False, is_kvstore_type=True),
    StrategySpec("local_sgd", kvstore="allreduce"),
    StrategySpec("diloco", kvstore="allreduce"),
    StrategySpec("pipeline", kvstore=None, pipelined=True),
    StrategySpec("hybrid", kvstore=None, pipelined=True),
)
STRATEGY_SPECS: dict[str, StrategySpec] = {spec.name: spec for spec in _SPECS}

#: Strategy names, in the order the CLI lists them.
STRATEGIES: tuple[str, ...] = tuple(STRATEGY_SPECS)
#: Names ``paratrain.kvstore.create`` accepts.
KVSTORE_TYPES: tuple[str, ...] = tuple(spec.name for spec in _SPECS if spec.is_kvstore_type)
#: KVStore types whose values live on parameter servers.
SERVER_KVSTORE_TYPES: tuple[str, ...] = tuple(spec.name for spec in _SPECS if spec.is_kvstore_type
                                              and spec.uses_servers)


def strategy_spec(name: str) -> StrategySpec:
    """The descriptor of strategy ``name``; ConfigError naming the allowed ones."""
    check_choice("strategy", name, STRATEGIES)
    return STRATEGY_SPECS[name]


def kvstore_spec(type_name: str) -> StrategySpec:
    """The descriptor of KVStore type ``type_name``; ConfigError naming the allowed ones."""
    check_choice("kvstore", type_name, KVSTORE_TYPES)
    return STRATEGY_SPECS[type_name]
