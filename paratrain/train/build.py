"""The one place a strategy becomes a :class:`Strategy` object.

Which options go with which strategy is decided by :mod:`paratrain.config` (its
``APPLIES`` table); this module only turns a resolved configuration into objects.
"""
from __future__ import annotations

from paratrain.config import RunConfig, diloco_config, parse_run_config, resolve_run_config
from paratrain.env import DistEnv, read_env
from paratrain.errors import ConfigError
from paratrain.strategies import STRATEGIES
from paratrain.train.strategy import Strategy

__all__ = ["STRATEGIES", "build_strategy"]


def build_strategy(strategy: str | RunConfig = "allreduce", *, env: DistEnv | None = None,
                   update_on_kvstore: bool | None = None, example_input=None, **options) -> Strategy:
    """A strategy from a resolved :class:`~paratrain.config.RunConfig`, or from a
    strategy name and its options (``sync_every=4``, ``stages=2``, ...), which are
    checked by the same rules as the CLI's flags. ``update_on_kvstore=False`` runs the
    optimizer on the workers under ``dist_sync``. ``example_input``: one input batch,
    which pipeline/hybrid trace a model that is not ``nn.Sequential`` with."""
    env = env or read_env()
    if isinstance(strategy, RunConfig):
        if options:
            raise ConfigError(f"build_strategy got a RunConfig and options {sorted(options)}; put them in the config")
        config = strategy
    else:
        config = resolve_run_config(parse_run_config({"strategy": strategy, **options}),
                                    launched_world=env.world_size)
    spec, parallel, min_workers = config.spec, config.parallel, config.resilience.min_workers
    if spec.pipelined:
        from paratrain.train.pipeline_strategy import PipelineStrategy
        return PipelineStrategy(stages=parallel.stages, micro_batches=parallel.micro_batches,
                                schedule=parallel.schedule, replicas=parallel.replicas,
                                split_points=parallel.split_points, example_input=example_input, env=env)
    if update_on_kvstore is False and spec.name != "dist_sync":
        raise ConfigError(f"update_on_kvstore=False (the optimizer on the workers) applies to strategy "
                          f"'dist_sync' only, not {spec.name!r}")
    kvstore_options = {}
    if spec.name == "dist_ssp":
        kvstore_options["staleness"] = parallel.staleness
    if parallel.backup_workers:
        kvstore_options["backup_workers"] = parallel.backup_workers
    from paratrain.train.data_parallel_strategy import DataParallelConfig, DataParallelStrategy
    if spec.name == "diloco":
        data_parallel = DataParallelConfig(kvstore=spec.kvstore, accumulate=config.optim.accumulate,
                                           diloco=diloco_config(config))
    else:
        data_parallel = DataParallelConfig(kvstore=spec.kvstore, accumulate=config.optim.accumulate,
                                           compression=config.comm.compression, sync_every=parallel.sync_every,
                                           kvstore_options=kvstore_options or None,
                                           update_on_kvstore=update_on_kvstore)
    if min_workers is None:
        return DataParallelStrategy(data_parallel, env=env)
    from paratrain.train.elastic_strategy import ElasticDataParallelStrategy, elastic_config
    return ElasticDataParallelStrategy(data_parallel, elastic_config(env, min_workers), env=env)
