"""Gradient aggregation through the parameter server (``dist_sync``,
``dist_async``, ``dist_ssp``), as a :class:`GradientSync` the Trainer drives.

Each trainable parameter is one key (its index in model order, inside the key namespace
this Trainer claimed, so several Trainers can share one job's servers). Its gradient is
pushed from a backward hook (``post_accumulate_grad``) as soon as it is ready, so
the transfer and the server's work overlap the rest of the backward pass. With
``update_on_kvstore`` (the default, and the only choice for async kinds) the servers
run the optimizer and ``after_step`` pulls the new weights (one pushpull per key).
Without it (``dist_sync`` only) ``reduce`` pulls the summed gradient into ``p.grad``
and the Trainer's local optimizer steps.

The rescale (1 / global batch) is only known in ``trainer.step``, after backward:
hook pushes go out with ``defer_scale=True`` and ``reduce`` sends one ``commit(scale,
lr)`` per server, with which the servers apply them; the learning rate of the step
travels with it, so an LR scheduler or a callback that changes the rate reaches the
servers without a barrier. So a step with a different batch size
(the last, short batch of an epoch) is still exact. Under ``dist_sync``
the servers sum the round, which gives the global mean gradient. Under
``dist_async``/``dist_ssp`` each push is applied alone and moves the weights by
1 / num_workers of a mean step, so the workers' pushes of one "step" add up to what
a sync step does, and the same learning rate stays stable.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from paratrain.comm.process_group import destroy_process_group, init_process_group
from paratrain.env import read_env
from paratrain.errors import ConfigError
from paratrain.kvstore.base import Handle, ServerKVStore, claim_key_namespace, namespaced
from paratrain.optimizers import server_optimizer_spec
from paratrain.parallel.base import GradientSync, start_from_store
from paratrain.parallel.server_tables import ServerTable, TableClient
from paratrain.strategies import SERVER_KVSTORE_TYPES, kvstore_spec

class ParameterServerSync(GradientSync):
    """Pushes gradients to the servers and pulls weights (or summed gradients) back.
    A model's tables (:class:`~paratrain.parallel.server_tables.ServerTable`) live on
    the servers as row-sparse keys: one sparse push per table per step, in ``reduce``,
    covered by the step's commit."""

    holds_tables = True

    def __init__(self, kv: ServerKVStore, optimizer: str | None, optimizer_params: dict,
                 update_on_kvstore: bool | None = None, buffers: Sequence[torch.Tensor] = ()):
        super().__init__()
        if kv.type not in SERVER_KVSTORE_TYPES:
            raise ConfigError(f"ParameterServerSync needs a kvstore of type {', '.join(SERVER_KVSTORE_TYPES)}, "
                              f"got {kv.type!r}")
        if update_on_kvstore is None:
            update_on_kvstore = True
        if not update_on_kvstore and kvstore_spec(kv.type).asynchronous:
            raise ConfigError(f"update_on_kvstore=False is for dist_sync only; {kv.type} applies each push on "
                              f"arrival and needs the optimizer on the servers")
        self.kv = kv
        self.updates_on_server = bool(update_on_kvstore)
        self.reduced_grads_visible = not self.updates_on_server
        self._lockstep = kvstore_spec(kv.type).lockstep
        # Under dist_sync, BatchNorm statistics follow rank 0 after every step over a
        # process group (as allreduce does); async workers share no group, so theirs
        # only start equal and, in pull_weights, end equal.
        self.buffers_follow_rank0 = self._lockstep
        self._buffers = list(buffers)
        self._owns_group = False
        self._lr: float | None = None
        self._state_generation = 0
        if self.updates_on_server and optimizer is None:
            raise ConfigError("this optimizer class has no registered name, so no server rule runs it; register it "
                              "(paratrain.optimizers.register_optimizer) or pass update_on_kvstore=False (dist_sync)")
        self._spec = server_optimizer_spec(optimizer, optimizer_params) if self.updates_on_server else None
        if self._spec is not None:
            kv.set_optimizer(self._spec)
        self.params: list[torch.nn.Parameter] = []
        self._pending: list[Handle] = []
        self._in_flight: dict[int, Handle] = {}   # key -> pushpull sent from a hook this step
        self._index: dict[int, int] = {}
        self._namespace = claim_key_namespace()
        self._keys: list = []
        self._versions: dict[int, int] = {}       # key -> the pushed gradient's version counter
        self._tables: list[TableClient] = []
        if not self.updates_on_server:
            kv.push_scale = 1.0   # summed gradients come back; reduce scales them here

    def attach(self, params: Sequence[torch.nn.Parameter]) -> None:
        """One key per parameter; every worker starts from rank 0's values."""
        self.params = list(params)
        self._keys = [namespaced(self._namespace, index) for index in range(len(self.params))]
        start_from_store(self.kv, self._keys, self.params)
        self._index = {id(param): index for index, param in enumerate(self.params)}
        self._hook_gradients(self.params, self._on_grad_ready)

    def attach_tables(self, tables: Sequence[ServerTable]) -> None:
        """Each table becomes a row-sparse key ``table/<i>`` (in this Trainer's
        namespace) whose rows the servers make from its initializer; the table is bound
        to it. Needs the optimizer on the servers, which update the rows lazily."""
        if not self.updates_on_server:
            raise ConfigError("a model with ServerEmbedding tables needs the optimizer on the servers (their rows "
                              "never reach the workers); update_on_kvstore=False (max_grad_norm or --max-restarts "
                              "under dist_sync) is not supported with them")
        for index, table in enumerate(tables):
            spec = table.table_spec()
            key = namespaced(self._namespace, f"table/{index}")
            self.kv.init(key, torch.zeros((spec.num_rows, spec.dim), dtype=spec.dtype, layout=torch.sparse_coo),
                         initializer=spec.initializer, lr_mult=spec.lr_mult)
            client = TableClient(self.kv, key, spec, push_empty=self._lockstep)
            table.bind(client)
            self._tables.append(client)

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        if not self._sync_enabled:
            return
        index = self._index[id(param)]
        if index in self._in_flight:
            raise RuntimeError("backward ran twice before trainer.step(); accumulate gradients "
                               "inside `with trainer.no_sync():` (or use --accumulate)")
        self._in_flight[index] = self._launch(index, param)

    def attach_state(self, tensors: Sequence[torch.Tensor]) -> None:
        """Frozen weights and buffers start as rank 0's: over a process group under
        dist_sync (created here if the job has none), through the servers otherwise."""
        if self._lockstep:
            self._owns_group = init_process_group(read_env())
            super().attach_state(tensors)
        else:
            self._adopt_rank0(tensors)

    def _adopt_rank0(self, tensors: Sequence[torch.Tensor]) -> None:
        """Every worker inits fresh keys with its values; the servers keep rank 0's
        (``init``'s rule), and the pull brings them to everyone. Integer tensors
        (BatchNorm's step counter) cannot travel to a server and advance alike anyway."""
        self._state_generation += 1
        floats = [t for t in tensors if t.is_floating_point()]
        keys = [f"state/{self._namespace}/{self._state_generation}/{i}" for i in range(len(floats))]
        for key, tensor in zip(keys, floats):
            self.kv.init(key, tensor.detach().cpu())
        for key, tensor in zip(keys, floats):
            self.kv.pull(key, out=tensor)

    def pull_weights(self) -> None:
        """This worker's parameters become the servers' values; under async modes its
        buffers become rank 0's too. Call it on every worker at the same point (once
        every worker has finished pushing, for the final weights)."""
        handles = [self.kv.pull(key, out=param.data, block=False) for key, param in zip(self._keys, self.params)]
        for handle in handles:
            handle.wait(None)
        if not self._lockstep and self._buffers:
            self._adopt_rank0(self._buffers)

    def _launch(self, index: int, param: torch.nn.Parameter) -> Handle:
        if self.updates_on_server:   # the new weights come back; the scale follows in reduce
            self._versions[index] = param.grad._version
            return self.kv.pushpull(self._keys[index], param.grad.detach(), out=param.data, block=False,
                                    defer_scale=True)
        return self.kv.pushpull(self._keys[index], param.grad.detach(), out=param.grad, block=False)

    def _check_unchanged(self) -> None:
        """Gradients changed after their push (clipped in place between backward and
        step) would be ignored by the servers, which already have them: refuse."""
        changed = [index for index, version in self._versions.items()
                   if self.params[index].grad is not None and self.params[index].grad._version != version]
        self._versions = {}
        if changed:
            raise ConfigError(f"gradients of parameter(s) {changed[:5]} changed after backward(), but with kvstore "
                              f"{self.kv.type!r} they already went to the servers, which run the optimizer; to clip, "
                              f"pass max_grad_norm to trainer.step() or fit, or use update_on_kvstore=False "
                              f"(dist_sync) with trainer.allreduce_grads()/update()")

    def reduce(self, scale: float) -> None:
        """Push what no hook pushed (zeros for a parameter without a gradient: a sync
        round needs every key from every worker); then, with server updates, commit the
        scale of this step's deferred pushes, or without them, wait for the sums."""
        if not self._sync_enabled:
            return
        start = time.perf_counter()
        in_flight, self._in_flight = self._in_flight, {}
        handles = []
        for index, param in enumerate(self.params):
            if index not in in_flight:   # no hook fired: an unused parameter pushes zeros
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                in_flight[index] = self._launch(index, param)
            handles.append(in_flight[index])
        if self.updates_on_server:
            self._check_unchanged()
            handles += [handle for handle in (table.push() for table in self._tables) if handle is not None]
            # The servers apply the held pushes with this scale and learning rate;
            # after_step waits for the new weights (no local optimizer in between).
            self._pending = handles + [self.kv.commit(scale, lr=self._lr)]
        else:
            for handle, param in zip(handles, self.params):
                handle.wait(None)
                param.grad.mul_(scale)
        self._record("push/pull", start)

    def after_step(self) -> None:
        """With server updates: wait for the new weights pulled in ``reduce``."""
        start = time.perf_counter()
        pending, self._pending = self._pending, []
        for handle in pending:
            handle.wait(None)
        if pending:
            self._record("pull weights", start)

    def set_learning_rate(self, lr: float) -> None:
        """The next commit carries ``lr``: the servers' rule uses it for this step."""
        self._lr = float(lr)

    def _record(self, name: str, start: float) -> None:
        self.timeline.complete(name, "comm", start, time.perf_counter())

    @property
    def bytes_sent(self) -> int:
        return self.kv.bytes_sent

    def close(self) -> None:
        super().close()
        self._pending = []
        self._in_flight = {}
        for table in self._tables:
            table.discard()
        if self._owns_group:
            destroy_process_group()
            self._owns_group = False
