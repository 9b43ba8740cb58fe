"""DiLoCo and Streaming DiLoCo: many local steps, then an outer optimizer step on the
averaged pseudo-gradient.

DiLoCo (Douillard et al. 2023): every worker runs ``sync_every`` (H) steps of its own
(inner) optimizer; then the *pseudo-gradient* ``global - local`` is averaged across
workers and applied to the global parameters by an outer optimizer (Nesterov SGD,
lr 0.7, momentum 0.9 in the paper), and every worker continues from the result. The
inner optimizer's state stays on each worker.

Streaming DiLoCo (Douillard et al. 2025) cuts the parameters into ``fragments`` (F)
and syncs one fragment every H/F steps, so each fragment is still synced every H
steps but only 1/F of the model is on the wire at once. A fragment's sync may overlap
``overlap_steps`` (tau) further inner steps: its average is launched, training goes on,
and when the result is taken (tau steps later) the outer step runs and the local
fragment becomes ``alpha * local + (1 - alpha) * global`` (``merge_alpha``), keeping
part of what the workers learned meanwhile.

Pseudo-gradients go through the bucket reducers of :mod:`paratrain.parallel.compressed`
(plain allreduce, fp16/bf16, or ``quant:4|8`` with error feedback kept per fragment),
on a process group of their own so that an overlapped sync never queues behind the
training step's own collectives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from paratrain.comm.accounting import ring_allreduce_bytes, tensor_nbytes
from paratrain.comm.codecs import CompressionConfig, parse_compression
from paratrain.comm.process_group import group_size, wait_work
from paratrain.errors import ConfigError, check_choice
from paratrain.parallel.base import GradientSync, scale_to_local_batch
from paratrain.parallel.compressed import build_bucket_reducer
from paratrain.parallel.reducers import PendingReduce

OUTER_OPTIMIZERS = ("nesterov", "sgd")
#: Codecs for pseudo-gradients. 2bit, topk and PowerSGD are built for per-step
#: gradients whose error feedback is replayed at the next step; a pseudo-gradient's
#: next step is H inner steps away.
DILOCO_CODECS = ("none", "fp16", "bf16", "quant")


@dataclass(frozen=True, kw_only=True)
class DiLoCoConfig:
    """What :class:`DiLoCoSync` does. ``overlap_steps`` None: H/F - 1 when streaming
    (F > 1; the longest overlap that keeps one sync in flight), 0 otherwise."""

    sync_every: int = 16
    fragments: int = 1
    outer_optimizer: str = "nesterov"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    compression: CompressionConfig | str | dict | None = None
    overlap_steps: int | None = None
    merge_alpha: float = 0.5
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("sync_every", "fragments"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if self.sync_every % self.fragments:
            raise ConfigError(f"fragments={self.fragments} must divide sync_every={self.sync_every} "
                              f"(one fragment is synced every sync_every / fragments steps)")
        check_choice("outer_optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        if not _finite(self.outer_lr) or self.outer_lr <= 0:
            raise ConfigError(f"outer_lr={self.outer_lr!r} must be a number > 0")
        if not _finite(self.outer_momentum) or not 0 <= self.outer_momentum < 1:
            raise ConfigError(f"outer_momentum={self.outer_momentum!r} must be in [0, 1)")
        if self.outer_optimizer == "nesterov" and self.outer_momentum == 0:
            raise ConfigError(f"outer_momentum={self.outer_momentum!r} must be > 0 with outer_optimizer 'nesterov' "
                              f"(use 'sgd' for no momentum)")
        codec = parse_compression(self.compression)
        if codec.type not in DILOCO_CODECS:
            raise ConfigError(f"compression={self.compression!r} for DiLoCo's pseudo-gradients: choose one of "
                              f"{', '.join(DILOCO_CODECS)} ({codec.type} is for per-step gradients)")
        object.__setattr__(self, "compression", codec)
        period = self.sync_every // self.fragments
        if self.overlap_steps is None:
            object.__setattr__(self, "overlap_steps", period - 1 if self.fragments > 1 else 0)
        if isinstance(self.overlap_steps, bool) or not isinstance(self.overlap_steps, int) \
                or not 0 <= self.overlap_steps < period:
            raise ConfigError(f"overlap_steps={self.overlap_steps!r} must be an integer in [0, {period}): "
                              f"a fragment's sync must finish before the next one starts")
        if not _finite(self.merge_alpha) or not 0 <= self.merge_alpha <= 1:
            raise ConfigError(f"merge_alpha={self.merge_alpha!r} must be in [0, 1]")
        if not _finite(self.timeout_s) or self.timeout_s <= 0:
            raise ConfigError(f"timeout_s={self.timeout_s!r} must be > 0")

    @property
    def period(self) -> int:
        """Inner steps between two sync points (of different fragments)."""
        return self.sync_every // self.fragments


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- pure plans

def fragment_ranges(numel: int, fragments: int) -> list[tuple[int, int]]:
    """Cut ``numel`` flat entries (the parameters in model order) into ``fragments``
    contiguous ranges of nearly equal size. Tensor boundaries are ignored: one large
    layer would otherwise be a fragment of its own, and the outer optimizer is
    elementwise anyway."""
    if fragments > numel:
        raise ConfigError(f"fragments={fragments}: the model has only {numel} parameters")
    bounds = [numel * index // fragments for index in range(fragments + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def pieces_of(sizes: Sequence[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """The parameters a flat range ``[start, stop)`` covers, as ``(parameter index,
    offset in it, length)`` in order."""
    pieces, offset = [], 0
    for index, size in enumerate(sizes):
        low, high = max(start, offset), min(stop, offset + size)
        if low < high:
            pieces.append((index, low - offset, high - low))
        offset += size
    return pieces


def sync_points(step: int, config: DiLoCoConfig) -> tuple[int | None, int | None]:
    """``(fragment to launch, fragment to apply)`` after inner step ``step`` (counted
    from the last full sync, 1-based); None where there is nothing to do. Fragment f
    is launched at steps ``(f + 1) P + k H`` (P = H/F) and applied ``overlap_steps``
    later, so each fragment syncs every H steps, staggered by P."""
    period, delay = config.period, config.overlap_steps

    def due(at: int) -> int | None:
        return (at // period - 1) % config.fragments if at > 0 and at % period == 0 else None
    return due(step), due(step - delay)


# --------------------------------------------------------------------------- the sync

@dataclass
class _InFlight:
    fragment: int
    pending: PendingReduce


class DiLoCoSync(GradientSync):
    """Inner steps on local gradients; every H/F steps one fragment's pseudo-gradient
    is averaged and an outer optimizer step applied (see the module docstring).

    ``reduce(scale)`` only rescales the local gradient (``scale * num_workers``: this
    worker steps on its own share of the global batch, as in local SGD). Floating
    buffers given (BatchNorm statistics) are averaged whenever the last fragment syncs.
    """

    linear = True

    def __init__(self, config: DiLoCoConfig, *, buffers: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        if not isinstance(config, DiLoCoConfig):
            raise TypeError(f"DiLoCoSync needs a DiLoCoConfig, got {type(config).__name__}")
        self.config = config
        self._buffers = [b for b in buffers if b.is_floating_point()]
        self.buffers_follow_rank0 = not list(buffers)
        self._params: list[torch.nn.Parameter] = []
        self._pieces: list[list[tuple[int, int, int]]] = []
        self.global_fragments: list[torch.Tensor] = []
        self.outer_optimizers: list[torch.optim.Optimizer] = []
        self._in_flight: _InFlight | None = None
        self.group = None
        self.reducer = None
        self.steps = 0           # inner steps since the last full sync
        self.outer_steps = 0     # fragment syncs applied, over the run
        self._buffer_bytes = 0

    @property
    def num_workers(self) -> int:
        return group_size(self.group)

    def attach(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Start every worker from rank 0's parameters; those are the first global ones."""
        self._params = list(params)
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group()   # every rank creates it, in the same order
            for param in self._params:
                work = dist.broadcast(param.data, src=dist.get_global_rank(self.group, 0), group=self.group,
                                      async_op=True)
                wait_work(work, self.config.timeout_s, "broadcast of the initial parameters from rank 0")
        sizes = [param.numel() for param in self._params]
        ranges = fragment_ranges(sum(sizes), self.config.fragments)
        self._pieces = [pieces_of(sizes, start, stop) for start, stop in ranges]
        self.global_fragments = [self._read(index) for index in range(len(ranges))]
        self.outer_optimizers = [self._outer_optimizer(tensor) for tensor in self.global_fragments]
        self.reducer = build_bucket_reducer(self.config.compression, self.group)

    def _outer_optimizer(self, tensor: torch.Tensor) -> torch.optim.Optimizer:
        config = self.config
        return torch.optim.SGD([tensor], lr=config.outer_lr, momentum=config.outer_momentum,
                               nesterov=config.outer_optimizer == "nesterov")

    def reduce(self, scale: float) -> None:
        scale_to_local_batch(self._params, scale, self.num_workers)

    def after_step(self) -> None:
        """Count the inner step; launch and apply fragment syncs when they are due."""
        self.steps += 1
        launch, apply = sync_points(self.steps, self.config)
        if apply is not None and self._in_flight is not None and self.config.overlap_steps:
            self._apply(self._in_flight, merge=True)
        if launch is not None:
            in_flight = _InFlight(launch, self._launch(launch))
            if self.config.overlap_steps:
                self._in_flight = in_flight
            else:
                self._apply(in_flight, merge=False)

    def consolidate(self) -> None:
        """Sync every fragment now (collective) unless nothing changed since the last
        sync, so evaluation and checkpoints see one model on every worker."""
        just_synced = self.config.fragments == 1 and self.steps % self.config.sync_every == 0
        if self.steps == 0 or (just_synced and self._in_flight is None):
            return
        if self._in_flight is not None:
            self._apply(self._in_flight, merge=False)
        launched = [_InFlight(index, self._launch(index)) for index in range(len(self._pieces))]
        for in_flight in launched:
            self._apply(in_flight, merge=False)
        self.steps = 0

    # -- one fragment -----------------------------------------------------------------

    def _launch(self, fragment: int) -> PendingReduce:
        """Start averaging this worker's pseudo-gradient ``global - local`` of ``fragment``."""
        pseudo_gradient = self.global_fragments[fragment] - self._read(fragment)
        with self.timeline.span(f"diloco launch fragment {fragment}", "comm"):
            return self.reducer.launch(fragment, pseudo_gradient)

    def _apply(self, in_flight: _InFlight, *, merge: bool) -> None:
        """Wait for the average, run the outer step, and move the local fragment to the
        new global values (``merge``: only ``1 - merge_alpha`` of the way)."""
        self._in_flight = None
        fragment = in_flight.fragment
        with self.timeline.span(f"diloco wait fragment {fragment}", "wait"):
            summed = in_flight.pending.wait(self.config.timeout_s)
        tensor, optimizer = self.global_fragments[fragment], self.outer_optimizers[fragment]
        tensor.grad = summed.div_(self.num_workers)
        optimizer.step()
        tensor.grad = None
        local = self._read(fragment)
        self._write(fragment, torch.lerp(tensor, local, self.config.merge_alpha) if merge else tensor)
        self.outer_steps += 1
        if fragment == len(self._pieces) - 1:
            self._average_buffers()

    def _average_buffers(self) -> None:
        if not self._buffers or self.num_workers == 1:
            return
        flat = torch.cat([b.detach().reshape(-1).float() for b in self._buffers])
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._buffer_bytes += ring_allreduce_bytes(tensor_nbytes(flat), self.num_workers)
        wait_work(work, self.config.timeout_s, "all_reduce of the buffers (DiLoCo sync)")
        flat.div_(self.num_workers)
        offset = 0
        for buffer in self._buffers:
            buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()

    def _read(self, fragment: int) -> torch.Tensor:
        """This worker's values of ``fragment``, as one fresh fp32 vector."""
        return torch.cat([self._params[index].detach().reshape(-1)[offset:offset + length].float()
                          for index, offset, length in self._pieces[fragment]])

    @torch.no_grad()
    def _write(self, fragment: int, values: torch.Tensor) -> None:
        start = 0
        for index, offset, length in self._pieces[fragment]:
            target = self._params[index].data.view(-1)[offset:offset + length]
            target.copy_(values[start:start + length])
            start += length

    # -- state --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The outer state: global fragments, outer optimizers, where the schedule is.
        A fragment sync still in flight is not part of it (a resumed run skips it)."""
        return {"global_fragments": [tensor.detach().clone() for tensor in self.global_fragments],
                "outer_optimizers": [optimizer.state_dict() for optimizer in self.outer_optimizers],
                "steps": self.steps, "outer_steps": self.outer_steps}

    def load_state_dict(self, state: dict) -> None:
        saved = state["global_fragments"]
        if [t.numel() for t in saved] != [t.numel() for t in self.global_fragments]:
            raise ConfigError(f"the checkpoint's DiLoCo fragments hold {[t.numel() for t in saved]} parameters, "
                              f"this run's {[t.numel() for t in self.global_fragments]}: same model and --fragments?")
        for tensor, values, optimizer, optimizer_state in zip(self.global_fragments, saved, self.outer_optimizers,
                                                              state["outer_optimizers"]):
            tensor.data.copy_(values)
            optimizer.load_state_dict(optimizer_state)
        self.steps, self.outer_steps = int(state["steps"]), int(state["outer_steps"])
        self._in_flight = None

    @property
    def bytes_sent(self) -> int:
        return (self.reducer.bytes_sent if self.reducer is not None else 0) + self._buffer_bytes

    @property
    def payload_bytes(self) -> int:
        return self.reducer.payload_bytes if self.reducer is not None else 0

    def close(self) -> None:
        super().close()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
