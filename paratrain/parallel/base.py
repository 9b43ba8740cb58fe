"""The contract between a Trainer and a way of aggregating gradients.

A :class:`GradientSync` is one object per strategy (local, bucketed allreduce,
parameter server, local SGD, ...). The Trainer calls the same four methods whatever
the strategy, so it never branches on strategy names.
"""
from __future__ import annotations

import abc
import math
import contextlib
from typing import Iterator, Sequence

import torch

from paratrain.comm.process_group import broadcast_tensors
from paratrain.errors import ConfigError
from paratrain.timeline import NULL_TIMELINE


def nearest_power_of_two(value: float) -> float:
    """The power of two nearest ``value`` (> 0) on a log scale. Multiplying by it is
    exact in floating point (barring underflow), so gradients scaled by one before a
    linear reduce (``GradientSync.linear``) sum to bitwise the scaled sum: what
    ``Trainer.loss_scale_for`` and the allreduce buckets' pre-scaling rely on."""
    return 2.0 ** round(math.log2(value))


def scale_to_local_batch(params: Sequence[torch.nn.Parameter], scale: float, num_workers: int) -> None:
    """``reduce`` of syncs whose workers step alone (local SGD, DiLoCo): the Trainer's
    ``scale`` is 1 / global batch, a worker stepping alone divides by its own batch,
    so each gradient is multiplied by ``scale * num_workers``."""
    local_scale = scale * num_workers
    if local_scale == 1.0:
        return
    for param in params:
        if param.grad is not None:
            param.grad.mul_(local_scale)


def start_from_store(kv, keys: Sequence, params: Sequence[torch.nn.Parameter]) -> None:
    """One KVStore key per parameter: initialise every key, then pull every value
    back, so every worker starts from the store's (rank 0's)."""
    for key, param in zip(keys, params):
        kv.init(key, param.detach().cpu().clone())
    for key, param in zip(keys, params):
        kv.pull(key, out=param.data)


class GradientSync(abc.ABC):
    """Turns this worker's gradients into the update every worker applies.

    Life cycle, driven by :class:`paratrain.Trainer`:

    1. ``attach(params)`` once: register backward hooks, broadcast initial state.
    2. during ``loss.backward()``: hooks may start communication (overlap).
    3. ``reduce(scale)`` in ``trainer.step``: wait for communication; afterwards every
       ``p.grad`` holds the global gradient times ``scale`` (1 / global batch size).
    4. the Trainer runs ``optimizer.step()`` unless ``updates_on_server`` is True.
    5. ``after_step()``: pull new weights, average models, sync buffers, ...
    """

    #: True when the parameter servers run the optimizer; the Trainer then skips
    #: its local ``optimizer.step()`` and ``after_step`` pulls the new weights.
    updates_on_server: bool = False
    #: True when the Trainer should copy rank 0's buffers (BatchNorm statistics) to
    #: every worker after each step; False for syncs that keep workers apart on
    #: purpose (local SGD averages buffers itself at its sync points).
    buffers_follow_rank0: bool = True
    #: True when ``reduce`` is linear in the gradients and sums them in their own
    #: dtype, so gradients that arrive multiplied by a power of two (a loss scaled
    #: before backward, see :meth:`paratrain.Trainer.loss_scale_for`) come out of it
    #: multiplied by exactly that power. False where a codec's meaning depends on the
    #: gradients' size (MXNet's 2bit threshold is defined on summed gradients; fp16
    #: casts underflow), or where the gradients leave for servers.
    linear: bool = False
    #: True when ``p.grad`` holds the aggregated, normalised gradient after ``reduce``
    #: (so it may be clipped there); False where the servers run the optimizer and the
    #: aggregate never comes back to the workers.
    reduced_grads_visible: bool = True
    #: Where communication spans are recorded; :func:`paratrain.parallel.build_gradient_sync`
    #: sets the caller's timeline once.
    timeline = NULL_TIMELINE
    #: True when the sync keeps a model's tables (:class:`~paratrain.parallel.server_tables.
    #: ServerTable`) on its parameter servers: the Trainer then leaves their weights out
    #: of ``attach`` and hands the tables to :meth:`attach_tables`; False elsewhere,
    #: where the Trainer materializes them as plain local parameters.
    holds_tables: bool = False

    def __init__(self) -> None:
        self._sync_enabled = True
        self._hooks: list = []

    def _hook_gradients(self, params: Sequence[torch.nn.Parameter], on_ready) -> None:
        """Call ``on_ready(param)`` whenever backward finished accumulating a gradient;
        :meth:`close` removes the hooks."""
        self._hooks += [param.register_post_accumulate_grad_hook(on_ready) for param in params]

    @abc.abstractmethod
    def attach(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Take the trainable parameters (deduplicated, in model order)."""

    @abc.abstractmethod
    def reduce(self, scale: float) -> None:
        """Finish aggregation; leave ``global_grad * scale`` in every ``p.grad``."""

    def attach_tables(self, tables: Sequence) -> None:
        """Keep ``tables`` on the servers (only where :attr:`holds_tables` is True)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no tables on servers (holds_tables is False)")

    def attach_state(self, tensors: Sequence[torch.Tensor]) -> None:
        """Make ``tensors`` (frozen weights, buffers) start equal on every worker, with
        rank 0's values. Default: a broadcast over the process group, if there is one."""
        broadcast_tensors(tensors)

    def pull_weights(self) -> None:
        """Bring this worker's parameters to the agreed values (where they live
        elsewhere: the parameter servers). Default: they already are."""

    def after_step(self) -> None:
        """Hook run after the optimizer update (default: nothing)."""

    def consolidate(self) -> None:
        """Make every worker hold the agreed model now (collective; called on every
        rank at the end of an epoch). Default: they already do."""

    def set_learning_rate(self, lr: float) -> None:
        """The learning rate of the coming step, for syncs whose optimizer runs
        elsewhere (the parameter servers); called before every ``reduce``."""

    def state_dict(self) -> dict:
        """State a checkpoint must keep beyond the model and the optimizer (DiLoCo's
        outer optimizer); default: none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    # -- elastic groups (paratrain.comm.elastic): the workers summed over may change --

    def set_group(self, group) -> None:
        """Run collectives on ``group`` from now on (None: hold no reference to any
        group, so a retired one can close its sockets). Syncs that cannot change their
        group refuse."""
        raise ConfigError(f"{type(self).__name__} runs on one fixed group; per-step fault tolerance "
                          f"(--min-workers) needs a gradient sync that can change it")

    def begin_step(self) -> None:
        """A step's communication starts: remember what :meth:`abandon_step` restores."""

    def abandon_step(self) -> None:
        """The step in progress failed before its update (a peer died): drop its
        pending communication and restore per-worker state, so it can be recomputed."""

    def zero_grad(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Clear gradients after the update (default: set them to None)."""
        for param in params:
            param.grad = None

    @property
    def sync_enabled(self) -> bool:
        return self._sync_enabled

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside this block only accumulate locally (gradient
        accumulation): hooks must not start communication."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this worker has put on the wire so far."""
        return 0

    def close(self) -> None:
        """Release hooks, sockets and groups."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
