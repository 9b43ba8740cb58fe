"""One pipeline stage's runtime: runs the stage's action list (receive, compute, send,
stash for backward) and measures where its time and activation memory go.

The action lists come from :mod:`paratrain.parallel.pipeline` (pure schedules); the
links to the neighbouring stages are :class:`paratrain.parallel.p2p.Channel` objects.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from paratrain.parallel.pipeline import FORWARD, gpipe_schedule
from paratrain.timeline import NULL_TIMELINE


@dataclass(frozen=True)
class StepTiming:
    """Where one stage's time went during the last schedule run."""

    schedule_s: float   # running the action list (forwards, backwards, transfers)
    wait_s: float       # blocked in a receive: the bubble plus transfer time
    peak_activation_bytes: int

    @property
    def idle_fraction(self) -> float:
        return self.wait_s / self.schedule_s if self.schedule_s > 0 else 0.0


class ActivationMeter:
    """Measures activation bytes alive on this stage: tensors autograd saves for the
    backward pass (through ``saved_tensors_hooks``) and the stage's own stashed
    inputs/outputs, counted once per storage, parameters excluded. ``peak`` is the
    high-water mark since :meth:`reset`."""

    def __init__(self, params) -> None:
        self._param_storages = {p.untyped_storage().data_ptr() for p in params}
        self._refs: dict[int, int] = {}
        self._excluded: set[int] = set()
        self.live = self.peak = 0

    def reset(self, exclude=()) -> None:
        """Start a new high-water mark; storages of ``exclude`` (the stage's input
        batch, which is data rather than activations) are not counted."""
        self.peak = self.live
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}

    def hold(self, tensor: torch.Tensor):
        """Wrap ``tensor`` so its storage counts as alive until the wrapper dies."""
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._param_storages or key in self._excluded or storage.nbytes() == 0:
            return tensor
        return _Held(self, tensor, key, storage.nbytes())

    def hooks(self):
        """Context manager that routes autograd's saved tensors through :meth:`hold`."""
        return torch.autograd.graph.saved_tensors_hooks(self.hold, _unwrap)

    def _acquire(self, key: int, nbytes: int) -> None:
        self._refs[key] = self._refs.get(key, 0) + 1
        if self._refs[key] == 1:
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes


class _Held:
    __slots__ = ("meter", "tensor", "key", "nbytes")

    def __init__(self, meter: ActivationMeter, tensor, key: int, nbytes: int) -> None:
        self.meter, self.tensor, self.key, self.nbytes = meter, tensor, key, nbytes
        meter._acquire(key, nbytes)

    def __del__(self) -> None:
        self.meter._release(self.key, self.nbytes)


def _unwrap(packed):
    return packed.tensor if isinstance(packed, _Held) else packed


class StageRunner:
    """Runs one stage's action list: receive, compute, send, stash for backward.

    On the last stage, ``loss_fn(outputs, micro_batch) -> (loss, report)`` gives the
    loss to back-propagate and a report of it (whatever the caller wants to add up);
    the runner returns the reports, one per micro-batch, in order."""

    def __init__(self, module, stage: int, num_stages: int, previous, following, loss_fn, *,
                 timeline=NULL_TIMELINE, device: torch.device | str = "cpu") -> None:
        self.module, self.stage, self.num_stages = module, stage, num_stages
        self.previous, self.following, self.loss_fn = previous, following, loss_fn
        self.meter = ActivationMeter(list(module.parameters()))
        self.timeline = timeline   # spans per forward, backward and wait
        self.device = torch.device(device)   # where received tensors go (the module's device)
        self._wait_s = 0.0

    def span(self, name: str, category: str):
        """A timeline span of category ``category``."""
        return self.timeline.span(name, category)

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def run(self, actions, micro_inputs, micro_batches) -> tuple[list, StepTiming]:
        """Execute ``actions``; returns the last stage's loss reports (none elsewhere)
        and the timing."""
        self._wait_s, reports = 0.0, []
        stash: dict[int, tuple] = {}
        self.meter.reset(exclude=micro_inputs[:1] if self.previous is None else ())
        start = time.perf_counter()
        for action in actions:
            m = action.micro_batch
            if action.kind == FORWARD:
                x, y = self._forward(m, micro_inputs[m], grad_enabled=True)
                if self.is_last:
                    with self.span(f"loss {m}", "compute"):
                        y, report = self.loss_fn(y, micro_batches[m])
                        reports.append(report)
                stash[m] = (self.meter.hold(x), self.meter.hold(y))
            else:
                x, y = (_unwrap(t) for t in stash.pop(m))
                self._backward(m, x, y)
        for channel in (self.previous, self.following):
            if channel is not None:
                channel.flush()
        timing = StepTiming(time.perf_counter() - start, self._wait_s, self.meter.peak)
        return reports, timing

    @torch.no_grad()
    def run_forward_only(self, micro_inputs, micro_batches) -> list:
        """Forward every micro-batch (evaluation); the last stage's loss reports."""
        reports = []
        for action in gpipe_schedule(self.num_stages, len(micro_batches), self.stage):
            if action.kind != FORWARD:
                continue
            m = action.micro_batch
            _, y = self._forward(m, micro_inputs[m], grad_enabled=False)
            if self.is_last:
                reports.append(self.loss_fn(y, micro_batches[m])[1])
        return reports

    def _forward(self, m: int, local_input, grad_enabled: bool):
        if self.previous is None:
            x = local_input
        else:
            x = self._recv(self.previous, m)
            if grad_enabled and x.is_floating_point():
                x.requires_grad_(True)
        with self.meter.hooks(), self.span(f"forward {m}", "compute"):
            y = self.module(x)
        if self.following is not None:
            self.following.send(y.detach(), tag=m)
        return x, y

    def _backward(self, m: int, x, y) -> None:
        grad = None if self.is_last else self._recv(self.following, m)
        with self.span(f"backward {m}", "compute"):
            y.backward(grad)
        if self.previous is not None:
            grad = x.grad if x.grad is not None else torch.zeros_like(x)
            self.previous.send(grad, tag=m)

    def _recv(self, channel, m: int) -> torch.Tensor:
        start = time.perf_counter()
        with self.span(f"recv {m} from rank {channel.peer}", "wait"):
            tensor = channel.recv(expected_tag=m)
        self._wait_s += time.perf_counter() - start
        return tensor if tensor.device == self.device else tensor.to(self.device)
