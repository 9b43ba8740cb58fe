"""KVStore: MXNet's push/pull API on PyTorch tensors, one implementation per type.

>>> kv = paratrain.kvstore.create("dist_sync")
"""
from __future__ import annotations

from paratrain.kvstore.base import Handle, KVStore, ServerKVStore
from paratrain.strategies import KVSTORE_TYPES, kvstore_spec


def create(name: str = "local", **options) -> KVStore:
    """Create a KVStore by type name: local | allreduce | dist_sync | dist_async | dist_ssp.

    ``dist_*`` connect to the parameter servers the launcher started (``--servers M``);
    options such as ``staleness`` (dist_ssp) are passed through.
    """
    spec = kvstore_spec(name)
    if name == "local":
        from paratrain.kvstore.local import LocalKVStore
        return LocalKVStore(**options)
    if name == "allreduce":
        from paratrain.kvstore.allreduce import AllreduceKVStore
        return AllreduceKVStore(**options)
    assert spec.uses_servers, name
    from paratrain.kvstore.dist import create_dist_kvstore
    return create_dist_kvstore(name, **options)


__all__ = ["create", "KVStore", "ServerKVStore", "Handle", "KVSTORE_TYPES"]
