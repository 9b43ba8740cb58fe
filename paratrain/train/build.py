"""The one place a strategy name becomes a :class:`Strategy` object."""
from __future__ import annotations

from paratrain.errors import ConfigError
from paratrain.strategies import STRATEGIES, strategy_spec
from paratrain.train.strategy import Strategy


def build_strategy(name: str, *, compression=None, accumulate: int = 1, amp: str = "none",
                   sync_every: int | None = None, staleness: int | None = None,
                   stages: int | None = None, micro_batches: int | None = None,
                   schedule: str = "1f1b", replicas: int = 1, backup_workers: int = 0,
                   update_on_kvstore: bool | None = None, env=None) -> Strategy:
    """Build a strategy by name with its options; options that do not apply to the
    chosen strategy are rejected, naming the option."""
    spec = strategy_spec(name)
    if spec.pipelined:
        for option, value, default in (("compression", compression, None), ("accumulate", accumulate, 1),
                                       ("sync_every", sync_every, None), ("staleness", staleness, None),
                                       ("backup_workers", backup_workers, 0)):
            if value != default:
                raise ConfigError(f"{option}={value!r} does not apply to strategy {name!r}")
        from paratrain.train.pipeline_strategy import PipelineStrategy
        return PipelineStrategy(stages=stages or 2, micro_batches=micro_batches or 4, schedule=schedule,
                                replicas=replicas if name == "hybrid" else 1, env=env)
    for option, value in (("stages", stages), ("micro_batches", micro_batches)):
        if value is not None:
            raise ConfigError(f"{option}={value!r} applies to strategies 'pipeline' and 'hybrid', not {name!r}")
    if name == "local_sgd" and sync_every is None:
        sync_every = 8
    if name != "local_sgd" and sync_every is not None:
        raise ConfigError(f"sync_every={sync_every} applies to strategy 'local_sgd' only, not {name!r}")
    if staleness is not None and name != "dist_ssp":
        raise ConfigError(f"staleness={staleness} applies to strategy 'dist_ssp' only, not {name!r}")
    if backup_workers and name != "dist_sync":
        raise ConfigError(f"backup_workers={backup_workers} applies to strategy 'dist_sync' only, not {name!r}")
    if update_on_kvstore is False and name != "dist_sync":
        raise ConfigError(f"update_on_kvstore=False (the optimizer on the workers) applies to strategy "
                          f"'dist_sync' only, not {name!r}")
    from paratrain.train.data_parallel_strategy import DataParallelStrategy
    kvstore = spec.kvstore
    options = {}
    if staleness is not None:          # 0 is a real bound (lockstep), keep it
        options["staleness"] = staleness
    if backup_workers:
        options["backup_workers"] = backup_workers
    return DataParallelStrategy(kvstore=kvstore, accumulate=accumulate, amp=amp, compression=compression,
                                sync_every=sync_every, kvstore_options=options or None,
                                update_on_kvstore=update_on_kvstore, env=env)
