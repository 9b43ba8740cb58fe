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

    A stage takes one tensor or several values and returns one or a tuple; each value
    travels as its own message, and gradients go back for the floating-point ones only.
    On the last stage, ``loss_fn(outputs, micro_batch) -> (loss, report)`` gives the
    loss to back-propagate and a report of it (whatever the caller wants to add up);
    the runner returns the reports, one per micro-batch, in order."""

    def __init__(self, module, stage: int, num_stages: int, previous, following, loss_fn, *,
                 timeline=NULL_TIMELINE, device: torch.device | str = "cpu", input_is_int=None,
                 eval_module=None) -> None:
        self.module, self.stage, self.num_stages = module, stage, num_stages
        # Traced stages take several inputs, some Python ints (sent as 0-d int64 tensors);
        # None: one tensor, as an nn.Sequential slice takes.
        self.input_is_int = tuple(input_is_int) if input_is_int is not None else (False,)
        self.eval_module = eval_module if eval_module is not None else module   # run by run_forward_only
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
                inputs, y = self._forward(self.module, m, micro_inputs[m], grad_enabled=True)
                if self.is_last:
                    with self.span(f"loss {m}", "compute"):
                        y, report = self.loss_fn(y, micro_batches[m])
                        reports.append(report)
                stash[m] = (self._hold(inputs), self._hold(y if isinstance(y, tuple) else (y,)))
            else:
                inputs, outputs = (tuple(_unwrap(t) for t in held) for held in stash.pop(m))
                self._backward(m, inputs, outputs)
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
            _, y = self._forward(self.eval_module, m, micro_inputs[m], grad_enabled=False)
            if self.is_last:
                reports.append(self.loss_fn(y, micro_batches[m])[1])
        return reports

    def _hold(self, values) -> tuple:
        return tuple(self.meter.hold(v) if isinstance(v, torch.Tensor) else v for v in values)

    def _forward(self, module, m: int, local_input, grad_enabled: bool):
        """Receive (or take) the inputs, run ``module``, send its outputs; returns the
        inputs as tensors and the module's result."""
        if self.previous is None:
            inputs = (local_input,)
        else:
            inputs = tuple(self._recv(self.previous, m) for _ in self.input_is_int)
            if grad_enabled:
                for x in inputs:
                    if x.is_floating_point():
                        x.requires_grad_(True)
        args = [int(x) if is_int else x for x, is_int in zip(inputs, self.input_is_int)]
        with self.meter.hooks(), self.span(f"forward {m}", "compute"):
            y = module(*args)
        if self.following is not None:
            for value in (y if isinstance(y, tuple) else (y,)):
                tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.int64)
                self.following.send(tensor.detach(), tag=m)
        return inputs, y

    def _backward(self, m: int, inputs, outputs) -> None:
        if self.is_last:
            roots, grads = list(outputs), None
        else:
            floats = [y for y in outputs if isinstance(y, torch.Tensor) and y.is_floating_point()]
            received = [self._recv(self.following, m) for _ in floats]
            pairs = [(y, g) for y, g in zip(floats, received) if y.requires_grad]
            roots, grads = [y for y, _ in pairs], [g for _, g in pairs]
        with self.span(f"backward {m}", "compute"):
            if roots:
                torch.autograd.backward(roots, grads)
        if self.previous is not None:
            for x in inputs:
                if x.is_floating_point():
                    self.previous.send(x.grad if x.grad is not None else torch.zeros_like(x), tag=m)

    def _recv(self, channel, m: int) -> torch.Tensor:
        start = time.perf_counter()
        with self.span(f"recv {m} from rank {channel.peer}", "wait"):
            tensor = channel.recv(expected_tag=m)
        self._wait_s += time.perf_counter() - start
        return tensor if tensor.device == self.device else tensor.to(self.device)
