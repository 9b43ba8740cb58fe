"""Parallelism: how gradients are aggregated (GradientSync objects) and how a model is
placed across processes (data parallel, pipeline, hybrid, local SGD)."""
from __future__ import annotations

from paratrain.errors import ConfigError
from paratrain.kvstore.base import KVStore, ServerKVStore
from paratrain.parallel.base import GradientSync
from paratrain.timeline import NULL_TIMELINE


def build_gradient_sync(kv: KVStore, *, optimizer: str, optimizer_params: dict, compression=None,
                        sync_every: int | None = None, update_on_kvstore: bool | None = None,
                        buffers=(), timeout_s: float = 60.0, timeline=NULL_TIMELINE, diloco=None) -> GradientSync:
    """The one place a KVStore (plus options) turns into a GradientSync.

    ``sync_every`` selects local SGD (average the models, and ``buffers``, every H steps);
    ``diloco`` (a :class:`~paratrain.parallel.diloco.DiLoCoConfig`) selects DiLoCo, whose
    pseudo-gradients carry their own codec; ``compression`` (a spec for
    :func:`paratrain.comm.codecs.parse_compression`) compresses allreduce buckets or
    parameter-server pushes. Communication spans are recorded into ``timeline``.
    """
    if diloco is not None:
        sync = _diloco_sync(kv, diloco, compression=compression, sync_every=sync_every, buffers=buffers)
    else:
        sync = _choose_sync(kv, optimizer=optimizer, optimizer_params=optimizer_params, compression=compression,
                            sync_every=sync_every, update_on_kvstore=update_on_kvstore, buffers=buffers,
                            timeout_s=timeout_s)
    sync.timeline = timeline
    return sync


def _choose_sync(kv: KVStore, *, optimizer, optimizer_params, compression, sync_every, update_on_kvstore,
                 buffers, timeout_s) -> GradientSync:
    if sync_every is not None:
        if kv.type != "allreduce":
            raise ConfigError(f"local SGD (sync_every={sync_every}) runs over kvstore 'allreduce', not {kv.type!r}")
        from paratrain.parallel.local_sgd import LocalSGDSync
        return LocalSGDSync(sync_every=sync_every, buffers=buffers)
    if isinstance(kv, ServerKVStore):
        from paratrain.parallel.ps_sync import ParameterServerSync
        if compression is not None:
            kv.set_gradient_compression(compression)
        return ParameterServerSync(kv, optimizer, optimizer_params, update_on_kvstore=update_on_kvstore,
                                   buffers=buffers)
    if kv.type == "allreduce":
        return _allreduce_sync(kv, compression, timeout_s)
    if compression is not None:
        raise ConfigError(f"compression={compression!r} needs several workers (kvstore 'allreduce' or 'dist_*'); "
                          f"kvstore {kv.type!r} has nothing to compress")
    if kv.type == "local":
        from paratrain.parallel.data_parallel import LocalSync
        return LocalSync()
    from paratrain.parallel.kvstore_sync import KVStoreSync
    return KVStoreSync(kv)


def _diloco_sync(kv: KVStore, diloco, *, compression, sync_every, buffers) -> GradientSync:
    from paratrain.parallel.diloco import DiLoCoConfig, DiLoCoSync
    if kv.type != "allreduce":
        raise ConfigError(f"DiLoCo averages pseudo-gradients over kvstore 'allreduce', not {kv.type!r}")
    if compression is not None or sync_every is not None:
        raise ConfigError("with diloco=DiLoCoConfig(...), give sync_every and compression in that config")
    if not isinstance(diloco, DiLoCoConfig):
        raise TypeError(f"diloco={diloco!r} must be a DiLoCoConfig")
    return DiLoCoSync(diloco, buffers=buffers)


def _allreduce_sync(kv: KVStore, compression, timeout_s: float) -> GradientSync:
    from paratrain.comm.codecs import parse_compression
    config = parse_compression(compression)
    if kv.num_workers == 1 and not config.enabled:
        from paratrain.parallel.data_parallel import LocalSync
        return LocalSync()
    from paratrain.parallel.compressed import build_bucket_reducer
    from paratrain.parallel.data_parallel import BucketedAllreduceSync
    return BucketedAllreduceSync(build_bucket_reducer(config), num_workers=kv.num_workers, timeout_s=timeout_s)


__all__ = ["GradientSync", "build_gradient_sync"]
