"""Parallelism: how gradients are aggregated (GradientSync objects) and how a model is
placed across processes (data parallel, pipeline, hybrid, local SGD)."""
from __future__ import annotations

from paratrain.errors import ConfigError
from paratrain.kvstore.base import KVStore
from paratrain.parallel.base import GradientSync


def build_gradient_sync(kv: KVStore, *, optimizer: str, optimizer_params: dict, compression=None,
                        sync_every: int | None = None, update_on_kvstore: bool | None = None,
                        buffers=(), timeout_s: float = 60.0) -> GradientSync:
    """The one place a KVStore type (plus options) turns into a GradientSync.

    ``sync_every`` selects local SGD (average the models, and ``buffers``, every H steps);
    ``compression`` (a spec for :func:`paratrain.comm.codecs.parse_compression`)
    compresses allreduce buckets.
    """
    if sync_every is not None:
        if kv.type != "allreduce":
            raise ConfigError(f"local SGD (sync_every={sync_every}) runs over kvstore 'allreduce', not {kv.type!r}")
        from paratrain.parallel.local_sgd import LocalSGDSync
        return LocalSGDSync(sync_every=sync_every, buffers=buffers)
    if kv.type == "local" or (kv.type == "allreduce" and kv.num_workers == 1 and compression is None):
        from paratrain.parallel.data_parallel import LocalSync
        return LocalSync()
    if kv.type == "allreduce":
        from paratrain.parallel.data_parallel import AllreduceBucketReducer, BucketedAllreduceSync
        reducer = AllreduceBucketReducer()
        if compression is not None:
            from paratrain.comm.codecs import parse_compression
            from paratrain.parallel.compressed import build_bucket_reducer
            config = parse_compression(compression)
            if config.type != "none":
                reducer = build_bucket_reducer(config)
        return BucketedAllreduceSync(reducer, num_workers=kv.num_workers, timeout_s=timeout_s)
    from paratrain.parallel.ps_sync import ParameterServerSync
    if compression is not None:
        kv.set_gradient_compression(compression)
    return ParameterServerSync(kv, optimizer, optimizer_params, update_on_kvstore=update_on_kvstore)


__all__ = ["GradientSync", "build_gradient_sync"]
