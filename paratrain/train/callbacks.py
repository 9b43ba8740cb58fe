"""Callbacks for ``fit``: small objects whose hooks default to doing nothing.

``fit`` calls ``on_train_begin``, then ``on_step_end`` after every optimizer step,
``on_epoch_end`` after each held-out evaluation, and ``on_train_end``. Each receives
the :class:`FitState`. Callbacks run on every rank, so one that changes the training
(the learning rate through ``state.strategy.optimizer``) changes it everywhere; the
ones that only report (``rank_zero_only = True``: progress bar, Speedometer, metrics)
run on the logging rank alone.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from typing import Any, Sequence

from paratrain.train.objective import StepResult


@dataclass
class FitState:
    """Where a run stands; owned by ``fit`` and read by callbacks."""

    strategy_name: str
    epochs: int
    steps_per_epoch: int | None    # None for an IterableDataset
    global_batch: int
    strategy: Any = None           # the Strategy (its ``optimizer``, ``is_logging_rank``)
    epoch: int = 0
    batch_in_epoch: int = 0        # batches of the current epoch already done
    step: int = 0                  # optimizer steps done in total
    start_time: float = field(default_factory=time.perf_counter)
    step_seconds: float = 0.0      # duration of the last step
    step_bytes: int = 0            # bytes this rank sent during the last step
    lr: float = 0.0
    last: StepResult | None = None
    heldout: StepResult | None = None
    summary: dict | None = None    # the run's summary, set just before on_train_end

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.start_time


class Callback:
    """A hook into ``fit``; every method does nothing unless overridden."""

    #: True for callbacks that only report: they run on the logging rank alone.
    rank_zero_only: bool = False

    def on_train_begin(self, state: FitState) -> None: ...
    def on_step_end(self, state: FitState) -> None: ...
    def on_epoch_end(self, state: FitState) -> None: ...
    def on_train_end(self, state: FitState) -> None: ...


def notify(callbacks: Sequence[Callback], hook: str, state: FitState) -> None:
    """Call ``hook`` of each callback meant for this rank."""
    logging_rank = state.strategy is None or state.strategy.is_logging_rank
    for callback in callbacks:
        if logging_rank or not callback.rank_zero_only:
            getattr(callback, hook)(state)


def describe(result: StepResult, *, digits: int = 4) -> dict[str, float]:
    """What a step or an evaluation reports: loss, accuracy where it applies, and the
    user's metrics (means over the samples)."""
    values = {} if result.accuracy is None else {"accuracy": round(result.accuracy, digits + 2)}
    values["loss"] = round(result.loss, digits + 2)
    values.update({name: round(value, digits + 2) for name, value in result.metric_means().items()})
    return values


class Speedometer(Callback):
    """MXNet's Speedometer: every ``frequent`` batches, one line with the global speed,
    the training accuracy (where it applies), loss and your metrics over those batches,
    e.g. ``Epoch[0] Batch [0-50]\tSpeed: 4298.37 samples/sec\taccuracy=0.996630\t
    loss=0.031200\tcomm_MB=0.51`` (MB this rank sent per batch); after each epoch's
    held-out evaluation, one ``Epoch[N] Validation-...`` line."""

    rank_zero_only = True

    def __init__(self, frequent: int = 50, stream: TextIO | None = None, *,
                 tokens_per_sample: int | None = None) -> None:
        self.frequent = frequent
        self.stream = stream
        self.tokens_per_sample = tokens_per_sample   # language models: tokens/sec too
        self._reset(0)

    def _reset(self, batch: int) -> None:
        self._first_batch, self._totals, self._bytes = batch, StepResult(0.0, 0), 0
        self._tic = time.perf_counter()

    def on_step_end(self, state: FitState) -> None:
        if state.batch_in_epoch == 1:
            self._reset(0)
        last, totals = state.last, self._totals
        totals.loss_sum, totals.samples = totals.loss_sum + last.loss_sum, totals.samples + last.samples
        if last.correct is not None:
            totals.correct = (totals.correct or 0) + last.correct
        for name, value in last.metrics.items():
            totals.metrics[name] = totals.metrics.get(name, 0.0) + value
        self._bytes += state.step_bytes
        batch = state.batch_in_epoch
        if batch % self.frequent == 0 or batch == state.steps_per_epoch:
            elapsed = max(time.perf_counter() - self._tic, 1e-9)
            batches = max(batch - self._first_batch, 1)
            reported = "\t".join(f"{name}={value:.6f}" for name, value in describe(totals).items())
            speed = f"Speed: {totals.samples / elapsed:.2f} samples/sec"
            if self.tokens_per_sample:
                speed += f" ({totals.samples * self.tokens_per_sample / elapsed:.0f} tokens/sec)"
            line = (f"Epoch[{state.epoch}] Batch [{self._first_batch}-{batch}]\t{speed}\t{reported}\t"
                    f"comm_MB={self._bytes / batches / 1e6:.4f}")
            print(line, file=self.stream or sys.stdout, flush=True)
            self._reset(batch)

    def on_epoch_end(self, state: FitState) -> None:
        """The epoch's held-out scores, as MXNet's ``fit`` logs them:
        ``Epoch[7] Validation-accuracy=0.980556\tValidation-loss=0.071234``."""
        if state.heldout is not None:
            scores = "\t".join(f"Validation-{name}={value:.6f}" for name, value in describe(state.heldout).items())
            print(f"Epoch[{state.epoch}] {scores}", file=self.stream or sys.stdout, flush=True)


class ProgressBar(Callback):
    """A tqdm bar per epoch with loss and samples/sec (rank 0, on stderr); the
    held-out scores are the :class:`Speedometer`'s lines."""

    rank_zero_only = True

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar = None

    def on_step_end(self, state: FitState) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=state.steps_per_epoch, initial=state.batch_in_epoch - 1,
                             desc=f"epoch {state.epoch}", leave=False, dynamic_ncols=True, file=sys.stderr)
        speed = state.last.samples / max(state.step_seconds, 1e-9)
        postfix = {name: f"{value:.4f}" for name, value in describe(state.last).items()}
        self._bar.set_postfix(samples_per_sec=f"{speed:.0f}", refresh=False, **postfix)
        self._bar.update(1)
        if state.batch_in_epoch == state.steps_per_epoch:
            self._close()

    def on_epoch_end(self, state: FitState) -> None:
        self._close()

    def on_train_end(self, state: FitState) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class MetricsLogger(Callback):
    """Per-step and per-epoch metrics to ``log_dir/metrics.jsonl`` and TensorBoard
    (``log_dir/tb``, when the tensorboard package is installed)."""

    rank_zero_only = True

    def __init__(self, log_dir: str | Path, tensorboard: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.log_dir / "metrics.jsonl", "a", buffering=1)
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(str(self.log_dir / "tb"))
            except ImportError:
                pass   # JSONL is always written; TensorBoard is optional

    def _write(self, record: dict, step: int) -> None:
        self._file.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name not in ("step", "epoch"):
                    self._writer.add_scalar(f"{record['kind']}/{name}", value, step)

    def on_step_end(self, state: FitState) -> None:
        last = state.last
        self._write({"kind": "train", "step": state.step, "epoch": state.epoch,
                     "wall_s": round(state.wall_s, 4), **describe(last, digits=8),
                     "samples_per_sec": last.samples / max(state.step_seconds, 1e-9),
                     "bytes_sent": state.step_bytes, "lr": state.lr, "strategy": state.strategy_name}, state.step)

    def on_epoch_end(self, state: FitState) -> None:
        if state.heldout is not None:
            self._write({"kind": "eval", "step": state.step, "epoch": state.epoch,
                         "wall_s": round(state.wall_s, 4), **describe(state.heldout, digits=8)}, state.step)

    def on_train_end(self, state: FitState) -> None:
        if state.summary is not None:
            self._file.write(json.dumps({"kind": "summary", **state.summary}) + "\n")
        self._file.close()
        if self._writer is not None:
            self._writer.close()
