"""The parameter server: server process, key sharding, update policies and the
server-side optimizer. Workers reach it through :mod:`paratrain.kvstore.dist`."""
from paratrain.ps.optimizer import SGD, Adam, ServerOptimizer
from paratrain.ps.sharding import DEFAULT_BIGARRAY_BOUND, KeySlice, plan_key, server_for_key

__all__ = ["SGD", "Adam", "ServerOptimizer", "DEFAULT_BIGARRAY_BOUND", "KeySlice",
           "plan_key", "server_for_key"]
