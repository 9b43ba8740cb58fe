"""``Trainer``: Gluon's ``trainer.step(batch_size)`` on torch.optim, over any KVStore.

    trainer = paratrain.Trainer(model, "sgd", {"lr": 0.1, "momentum": 0.9}, kvstore="allreduce")
    loss = loss_fn(model(x), y)          # a *sum* over the batch, as in Gluon
    loss.backward()
    trainer.step(batch_size)             # aggregate, divide by the global batch, update

How gradients are aggregated is the job of one :class:`GradientSync` object chosen from
the kvstore type in one place (:func:`paratrain.parallel.build_gradient_sync`); the
Trainer itself never branches on strategy names.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from paratrain import kvstore as kvstore_module
from paratrain.errors import ConfigError, check_choice
from paratrain.kvstore.base import KVStore
from paratrain.optimizers import build_worker_optimizer, optimizer_name
from paratrain.parallel import build_gradient_sync
from paratrain.parallel.base import nearest_power_of_two
from paratrain.parallel.server_tables import server_tables
from paratrain.comm.process_group import broadcast_tensors
from paratrain.strategies import SERVER_KVSTORE_TYPES, kvstore_spec
from paratrain.timeline import NULL_TIMELINE

def unique_trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Trainable parameters, each once (tied weights appear once), in order."""
    seen: set[int] = set()
    result = []
    for param in params:
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            result.append(param)
    return result


def param_checksum(params: Iterable[torch.Tensor]) -> str:
    """sha256 over the parameters' bytes, in order: equal iff the runs are bitwise equal."""
    digest = hashlib.sha256()
    for tensor in params:
        # hashlib reads the array's buffer directly: no bytes copy of the model
        digest.update(tensor.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


class Trainer:
    """Applies an optimizer to parameters, aggregating gradients through a KVStore.

    ``params``: an ``nn.Module`` (its buffers are kept identical across workers too)
    or an iterable of parameters. ``optimizer``: a name, a ``torch.optim`` class or
    instance. ``kvstore``: a type name (``local``, ``allreduce``, ``dist_sync``,
    ``dist_async``, ``dist_ssp``) or a KVStore. Frozen parameters are skipped.
    ``sync_every`` runs local SGD, ``diloco`` (a
    :class:`~paratrain.parallel.diloco.DiLoCoConfig`) DiLoCo, both over ``allreduce``.

    Tables of the module (:class:`paratrain.nn.ServerEmbedding`) live on the parameter
    servers where the gradient sync keeps them (``dist_*``: ``server_tables`` lists
    them, their weights are not among the dense parameters); elsewhere they become
    plain local parameters.
    """

    def __init__(self, params, optimizer: Any = "sgd", optimizer_params: dict | None = None,
                 kvstore: str | KVStore = "local", *, compression=None, sync_every: int | None = None,
                 update_on_kvstore: bool | None = None, loss_scaler=None, kvstore_options: dict | None = None,
                 timeline=NULL_TIMELINE, diloco=None):
        module = params if isinstance(params, nn.Module) else None
        param_list = list(module.parameters() if module is not None else params)
        if isinstance(optimizer, torch.optim.Optimizer) and not param_list:
            param_list = [p for group in optimizer.param_groups for p in group["params"]]
        self._params = unique_trainable(param_list)
        if not self._params:
            raise ConfigError("Trainer got no trainable parameters (all frozen or empty)")
        self._buffers = list(module.buffers()) if module is not None else []
        frozen = [p for p in param_list if not p.requires_grad]
        self.kvstore = kvstore if isinstance(kvstore, KVStore) else kvstore_module.create(kvstore, **(kvstore_options or {}))
        self.sync = build_gradient_sync(
            self.kvstore, optimizer=optimizer_name(optimizer),
            optimizer_params=dict(optimizer.defaults if isinstance(optimizer, torch.optim.Optimizer)
                                  else optimizer_params or {}), compression=compression,
            sync_every=sync_every, update_on_kvstore=update_on_kvstore, buffers=self._buffers,
            timeline=timeline, diloco=diloco)
        tables = server_tables(module) if module is not None else []
        self.server_tables = tables if self.sync.holds_tables else []
        if self.server_tables:   # their rows live on the servers: not dense parameters
            remote = {id(table.weight) for table in tables}
            self._params = [p for p in self._params if id(p) not in remote]
            frozen = [p for p in frozen if id(p) not in remote]
        for table in tables if not self.server_tables else ():
            table.materialize()
        self.optimizer = build_worker_optimizer(self._params, optimizer, optimizer_params)
        self.loss_scaler = loss_scaler
        self.sync.attach(self._params)
        if self.server_tables:
            self.sync.attach_tables(self.server_tables)
        # Frozen weights too: every replica starts equal (rank 0's values).
        self.sync.attach_state(frozen + self._buffers)
        self.timeline = timeline
        self.num_update = 0
        self._reduced = False   # allreduce_grads ran, update is due

    @property
    def num_workers(self) -> int:
        return self.kvstore.num_workers

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_learning_rate(self, lr: float) -> None:
        """Set the learning rate (MXNet's ``trainer.set_learning_rate``); with a
        server-side optimizer the servers use it from the next step on."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes in this block accumulate locally without communicating."""
        with self.sync.no_sync():
            yield

    def loss_scale_for(self, global_batch_size: int) -> float:
        """The power of two nearest 1 / ``global_batch_size`` by which a summed loss
        may be multiplied before backward (pass it to ``step(loss_scale=...)``), or 1.0
        where the gradient sync needs the summed gradients themselves (``linear`` is
        False: 2bit compression, the parameter server) or a loss scaler is in use.

        Scaling by a power of two is exact in floating point (barring underflow), so
        the update is bitwise the one a summed loss gives; but the 1 / global-batch
        normalisation then costs one scalar multiply instead of a pass over every
        gradient after communication (none at all for a power-of-two batch).
        """
        if global_batch_size <= 0 or self.loss_scaler is not None or not self.sync.linear:
            return 1.0
        return nearest_power_of_two(1.0 / global_batch_size)

    def step(self, batch_size: int, *, global_batch_size: int | None = None, loss_scale: float = 1.0,
             max_grad_norm: float | None = None) -> None:
        """Aggregate gradients, normalise by the global batch and update.

        ``batch_size`` is the number of samples this worker's gradients sum over; the
        global batch is ``batch_size * num_workers`` unless ``global_batch_size`` says
        otherwise (an uneven last batch). ``loss_scale`` is what the summed loss was
        multiplied by before backward (from :meth:`loss_scale_for`; 1.0 for a plain
        sum). ``max_grad_norm`` clips by the global norm of the aggregated, normalised
        gradient, as one process would (under ``dist_async``/``dist_ssp``, whose
        updates run on the servers, each worker's gradient is clipped by its own norm
        before it leaves). Gradients are zeroed afterwards.
        """
        self.prepare_update(batch_size, global_batch_size=global_batch_size, loss_scale=loss_scale,
                            max_grad_norm=max_grad_norm)
        self._update()

    def prepare_update(self, batch_size: int, *, global_batch_size: int | None = None, loss_scale: float = 1.0,
                       max_grad_norm: float | None = None) -> None:
        """:meth:`step` up to the update: aggregate, normalise and clip (all of a
        step's communication between workers). Then :meth:`update`, or, if the step
        must be given up (a peer died), :meth:`abandon_step`."""
        scale = self._scale(batch_size, global_batch_size, loss_scale)
        if self.sync.reduced_grads_visible:
            self._reduce(scale)
            if max_grad_norm is not None:
                if self.loss_scaler is not None:   # fp16: clip the true gradients
                    self.loss_scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self._params, max_grad_norm)
        else:
            if max_grad_norm is not None:
                scale *= self._own_clip_coefficient(scale, max_grad_norm)
            self._reduce(scale)

    def abandon_step(self) -> None:
        """Give up the step in progress before its update: its pending communication,
        the gradients and the sync's per-worker changes are dropped, so the step can be
        computed again (an elastic group re-formed)."""
        self.sync.abandon_step()
        self.sync.zero_grad(self._params)
        self._reduced = False

    def allreduce_grads(self, batch_size: int | None = None, *, global_batch_size: int | None = None,
                        loss_scale: float = 1.0) -> None:
        """Gluon's first half of :meth:`step`: aggregate the gradients across workers and
        normalise them by the global batch, so that ``p.grad`` holds on every worker
        what one process would hold for the whole global batch (clip them here, for
        instance). Then call :meth:`update`.

        Unlike Gluon, the batch size is given here, not to ``update``: the gradients
        are already normalised when you see them. With the optimizer on the servers the
        aggregated gradient never comes back to the workers, so this is refused there
        (Gluon refuses it too); use ``update_on_kvstore=False`` under ``dist_sync``."""
        if not self.sync.reduced_grads_visible:
            raise ConfigError(f"allreduce_grads: with kvstore {self.kvstore.type!r} the optimizer runs on the servers "
                              f"and the aggregated gradient never reaches the workers; use trainer.step(), or "
                              f"update_on_kvstore=False (dist_sync)")
        if batch_size is None and global_batch_size is None:
            raise ConfigError("allreduce_grads needs batch_size (this worker's samples) or global_batch_size")
        self._reduce(self._scale(batch_size or 0, global_batch_size, loss_scale))

    def update(self, batch_size: int | None = None) -> None:
        """Gluon's second half of :meth:`step`: apply the optimizer to the gradients
        :meth:`allreduce_grads` left, then zero them. ``batch_size`` is accepted for
        Gluon's signature and ignored (the gradients are normalised already)."""
        if not self._reduced:
            raise ConfigError("update() without allreduce_grads() first; or call step(batch_size) for both")
        self._update()

    def pull_weights(self) -> None:
        """Make this worker's parameters the servers' current values (``dist_*``; the
        final weights of an async job once every worker has finished); a no-op where
        every worker holds the agreed model already."""
        self.sync.pull_weights()

    def _scale(self, batch_size: int, global_batch_size: int | None, loss_scale: float) -> float:
        total = global_batch_size if global_batch_size is not None else batch_size * self.num_workers
        if total <= 0:
            raise ConfigError(f"batch_size={batch_size} (global {total}) must be > 0")
        if loss_scale != 1.0 and not self.sync.linear:
            raise ConfigError(f"loss_scale={loss_scale}: this gradient sync needs summed gradients; "
                              "back-propagate the summed loss (see Trainer.loss_scale_for)")
        return 1.0 / total / loss_scale

    def _reduce(self, scale: float) -> None:
        self.sync.set_learning_rate(self.learning_rate)   # the servers' update uses this step's rate
        with self.timeline.span("gradient wait", "wait"):
            self.sync.reduce(scale)
        self._reduced = True

    def _own_clip_coefficient(self, scale: float, max_grad_norm: float) -> float:
        """``min(1, max_norm / ||scale * g||)`` of this worker's own gradient, as
        ``torch.nn.utils.clip_grad_norm_`` computes it."""
        if self.kvstore.type not in SERVER_KVSTORE_TYPES or kvstore_spec(self.kvstore.type).lockstep:
            raise ConfigError(f"max_grad_norm with kvstore {self.kvstore.type!r} and the optimizer on the servers: the "
                              f"global norm of the aggregated gradient is never on one worker; pass "
                              f"update_on_kvstore=False (the servers sum, the workers clip and step)")
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) * scale
        return min(1.0, max_grad_norm / (norm + 1e-6))

    def _update(self) -> None:
        with self.timeline.span("optimizer", "compute"):
            # With a server-side optimizer the servers already updated; after_step
            # pulls the new weights.
            if not self.sync.updates_on_server:
                self._local_update()
            self.sync.after_step()
            if self._buffers and self.sync.buffers_follow_rank0:
                # BatchNorm statistics follow rank 0 after every step (DDP copies them
                # before every forward), so replicas stay identical.
                broadcast_tensors(self._buffers)
        self.sync.zero_grad(self._params)
        self._reduced = False
        self.num_update += 1

    def _local_update(self) -> None:
        if self.loss_scaler is not None:   # fp16: unscale, skip the step on inf/nan, adapt the scale
            self.loss_scaler.step(self.optimizer)
            self.loss_scaler.update()
        else:
            self.optimizer.step()

    def param_checksum(self) -> str:
        return param_checksum(self._params)

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "num_update": self.num_update}
        sync_state = self.sync.state_dict()
        if sync_state:   # DiLoCo's outer optimizer; other syncs keep nothing of their own
            state["sync"] = sync_state
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_update = int(state["num_update"])
        if "sync" in state:
            self.sync.load_state_dict(state["sync"])

    def close(self) -> None:
        self.sync.close()
        self.kvstore.close()
