"""KVStore: MXNet's push/pull API on PyTorch tensors, one implementation per type.

>>> kv = paratrain.kvstore.create("dist_sync")
"""
from __future__ import annotations

from paratrain.errors import check_choice
from paratrain.kvstore.base import Handle, KVStore

KVSTORE_TYPES = ("local", "allreduce", "dist_sync", "dist_async", "dist_ssp")
DIST_TYPES = ("dist_sync", "dist_async", "dist_ssp")


def create(name: str = "local", **options) -> KVStore:
    """Create a KVStore by type name: local | allreduce | dist_sync | dist_async | dist_ssp.

    ``dist_*`` connect to the parameter servers the launcher started (``--servers M``);
    options such as ``staleness`` (dist_ssp) are passed through.
    """
    check_choice("kvstore", name, KVSTORE_TYPES)
    if name == "local":
        from paratrain.kvstore.local import LocalKVStore
        return LocalKVStore(**options)
    if name == "allreduce":
        from paratrain.kvstore.allreduce import AllreduceKVStore
        return AllreduceKVStore(**options)
    from paratrain.kvstore.dist import create_dist_kvstore
    return create_dist_kvstore(name, **options)


__all__ = ["create", "KVStore", "Handle", "KVSTORE_TYPES", "DIST_TYPES"]
