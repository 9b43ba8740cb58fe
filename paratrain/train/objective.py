"""How a batch becomes a loss: the user's ``step_fn(model, batch)`` or
``loss_fn(outputs, batch)``, or cross-entropy on an ``(inputs, targets)`` batch.

``reduction`` says what the user's loss does over the samples of the batch it is given
(``"mean"`` or ``"sum"``). The strategies turn either into the summed loss the Trainer
normalises by the GLOBAL batch, so a mean loss over a worker's share gives the same
update as one process over the whole global batch.

Model outputs may be a tensor, a dict with ``"logits"``, or an object with ``.logits``
(a transformers ``ModelOutput``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from paratrain.data.batches import batch_len
from paratrain.errors import ConfigError

REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class HeldoutStats:
    """Statistics of the held-out set that are sums, not means (a histogram of scores,
    from which the AUC is read): ``fn(outputs, batch)`` returns ``size`` numbers for
    one batch; evaluation adds them up over batches and ranks (``StepResult.stats``)."""

    size: int
    fn: Callable

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"HeldoutStats size={self.size!r} must be an int >= 1")
        if not callable(self.fn):
            raise ConfigError(f"HeldoutStats fn={self.fn!r} must be callable (outputs, batch) -> numbers")


@dataclass
class BatchLoss:
    """One (micro-)batch's loss and what is reported about it."""

    loss: torch.Tensor                 # as the user's function reduced it
    samples: int
    correct: int | None = None         # classification only
    metrics: dict[str, float] = field(default_factory=dict)   # means over the batch
    stats: torch.Tensor | None = None   # evaluation's HeldoutStats of the batch (float64)

    def summed(self, reduction: str) -> torch.Tensor:
        """The loss summed over the batch's samples (what backward is called on)."""
        return self.loss * self.samples if reduction == "mean" else self.loss


@dataclass
class StepResult:
    """Totals over the global batch of one step (or an evaluation); identical on every
    rank where workers move in lockstep. ``metrics`` are sums of per-batch means times
    samples, so ``metric_means`` weighs every sample alike."""

    loss_sum: float
    samples: int
    correct: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    stats: torch.Tensor | None = None   # sums of HeldoutStats (evaluation only)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / max(self.samples, 1)

    def metric_means(self) -> dict[str, float]:
        return {name: value / max(self.samples, 1) for name, value in self.metrics.items()}

    def add(self, batch: BatchLoss, reduction: str) -> None:
        """Count one batch in (its loss as a detached float)."""
        self.loss_sum += float(batch.summed(reduction).detach())
        self.samples += batch.samples
        if batch.correct is not None:
            self.correct = (self.correct or 0) + batch.correct
        for name, value in batch.metrics.items():
            self.metrics[name] = self.metrics.get(name, 0.0) + value * batch.samples
        if batch.stats is not None:
            self.stats = batch.stats.clone() if self.stats is None else self.stats + batch.stats

    def scaled(self, factor: float) -> "StepResult":
        """This worker's totals scaled to an estimate of the whole job (async steps)."""
        return StepResult(self.loss_sum * factor, int(self.samples * factor),
                          None if self.correct is None else int(self.correct * factor),
                          {name: value * factor for name, value in self.metrics.items()},
                          None if self.stats is None else self.stats * factor)

    def to_vector(self) -> list[float]:
        """For one summing collective: loss, samples, correct, metrics (sorted names)."""
        return [self.loss_sum, float(self.samples), float(self.correct if self.correct is not None else -1),
                *(self.metrics[name] for name in sorted(self.metrics)),
                *(self.stats.tolist() if self.stats is not None else ())]

    def from_vector(self, values: list[float], world: int) -> "StepResult":
        """The totals a :meth:`to_vector` summed over ``world`` ranks stands for."""
        names = sorted(self.metrics)
        correct = None if self.correct is None else int(round(values[2]))
        stats = None if self.stats is None else torch.tensor(values[3 + len(names):], dtype=torch.float64)
        return StepResult(values[0], int(round(values[1])), correct,
                          {name: value for name, value in zip(names, values[3:3 + len(names)])}, stats)


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits in a model's outputs: a tensor, ``outputs["logits"]`` or ``outputs.logits``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"the model returned {type(outputs).__name__}; the default loss needs a tensor of logits, a dict "
                    f"with 'logits' or an object with .logits; give fit a loss_fn or step_fn instead")


class Objective:
    """``objective(model, batch) -> BatchLoss``. Exactly one of ``step_fn`` and
    ``loss_fn`` may be given; with neither, an ``(inputs, targets)`` batch is scored
    with cross-entropy (summed), and accuracy is counted when the logits are
    ``[N, C]`` and the targets class indices ``[N]``."""

    def __init__(self, *, step_fn: Callable | None = None, loss_fn: Callable | None = None,
                 reduction: str | None = None, stats: HeldoutStats | None = None) -> None:
        if step_fn is not None and loss_fn is not None:
            raise ConfigError("give fit step_fn or loss_fn, not both")
        if stats is not None and (step_fn is not None or not isinstance(stats, HeldoutStats)):
            raise ConfigError("heldout_stats needs the model's outputs: give a HeldoutStats with loss_fn (or the "
                              "default loss), not with step_fn")
        for name, fn in (("step_fn", step_fn), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"{name}={fn!r} must be callable")
        if reduction is None:
            reduction = "sum" if step_fn is None and loss_fn is None else "mean"
        if reduction not in REDUCTIONS:
            raise ConfigError(f"loss_reduction={reduction!r} is not allowed; choose one of: {', '.join(REDUCTIONS)}")
        self.step_fn, self.loss_fn, self.reduction, self.stats = step_fn, loss_fn, reduction, stats
        self.uses_model_directly = step_fn is not None

    def __call__(self, model: torch.nn.Module, batch: Any) -> BatchLoss:
        samples = batch_len(batch)
        if self.step_fn is not None:
            return self._checked(self.step_fn(model, batch), samples)
        inputs = _inputs_of(batch) if self.loss_fn is None else _model_inputs(batch)
        return self.loss_of(model(inputs), batch, samples)

    def evaluate(self, model: torch.nn.Module, batch: Any) -> BatchLoss:
        """As a call, plus the batch's :class:`HeldoutStats` (where there are any)."""
        if self.stats is None:
            return self(model, batch)
        outputs = model(_inputs_of(batch) if self.loss_fn is None else _model_inputs(batch))
        result = self.loss_of(outputs, batch)
        stats = torch.as_tensor(self.stats.fn(outputs, batch), dtype=torch.float64).reshape(-1)
        if stats.numel() != self.stats.size:
            raise TypeError(f"HeldoutStats fn returned {stats.numel()} numbers, its size is {self.stats.size}")
        result.stats = stats
        return result

    def empty_totals(self) -> StepResult:
        """Totals before the first batch (with zero stats, so every rank sums the same shape)."""
        stats = None if self.stats is None else torch.zeros(self.stats.size, dtype=torch.float64)
        return StepResult(0.0, 0, stats=stats)

    def loss_of(self, outputs: Any, batch: Any, samples: int | None = None) -> BatchLoss:
        """The loss of ``outputs`` against ``batch`` (the last pipeline stage calls this)."""
        samples = batch_len(batch) if samples is None else samples
        if self.loss_fn is not None:
            return self._checked(self.loss_fn(outputs, batch), samples)
        logits, targets = logits_of(outputs), _targets_of(batch)
        correct = None
        if logits.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point():
            correct = int((logits.argmax(1) == targets).sum())
        flat_logits = logits.float().reshape(-1, logits.shape[-1]) if logits.dim() > 2 else logits.float()
        loss = F.cross_entropy(flat_logits, targets.reshape(-1) if logits.dim() > 2 else targets,
                               reduction=self.reduction)
        return BatchLoss(loss, samples, correct)

    def _checked(self, result: Any, samples: int) -> BatchLoss:
        metrics = {}
        if isinstance(result, tuple):
            if len(result) != 2 or not isinstance(result[1], dict):
                raise TypeError("step_fn/loss_fn must return a loss, or (loss, {name: value}) for metrics")
            result, metrics = result
        loss = result
        if not isinstance(loss, torch.Tensor) and isinstance(getattr(loss, "loss", None), torch.Tensor):
            loss = loss.loss   # a transformers ModelOutput returned whole
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"step_fn/loss_fn must return a scalar loss tensor, got {type(loss).__name__}"
                            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        return BatchLoss(loss, samples, None, {name: float(value) for name, value in metrics.items()})


def _inputs_of(batch: Any):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    raise TypeError(f"with neither step_fn nor loss_fn, fit scores (inputs, targets) batches with cross-entropy; "
                    f"got a batch of type {type(batch).__name__}: give a step_fn(model, batch) or loss_fn")


def _targets_of(batch: Any):
    """The default loss's batches are ``(inputs, targets)``."""
    return batch[1]


def _model_inputs(batch: Any):
    """What the model is called with when the user gave ``loss_fn``: ``batch[0]`` of a
    tuple, else the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch
