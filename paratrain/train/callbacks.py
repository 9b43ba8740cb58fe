"""Callbacks for ``fit``: small objects whose hooks default to doing nothing.

``fit`` calls ``on_train_begin``, then ``on_step_end`` after every optimizer step,
``on_epoch_end`` after each held-out evaluation, and ``on_train_end``. Each receives
the :class:`FitState`; only the logging rank (rank 0) gets progress callbacks.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from paratrain.train.strategy import StepResult


@dataclass
class FitState:
    """Where a run stands; owned by ``fit`` and read by callbacks."""

    strategy: str
    epochs: int
    steps_per_epoch: int
    global_batch: int
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
    def on_train_begin(self, state: FitState) -> None: ...
    def on_step_end(self, state: FitState) -> None: ...
    def on_epoch_end(self, state: FitState) -> None: ...
    def on_train_end(self, state: FitState) -> None: ...


class Speedometer(Callback):
    """MXNet's Speedometer: every ``frequent`` batches, one line with the global speed
    and the training accuracy, e.g. ``Epoch[0] Batch [0-50]\\tSpeed: 4298.37
    samples/sec\\taccuracy=0.996630\\tcomm_MB=0.51`` (MB this rank sent per batch)."""

    def __init__(self, frequent: int = 50, stream: TextIO | None = None) -> None:
        self.frequent = frequent
        self.stream = stream
        self._reset(0)

    def _reset(self, batch: int) -> None:
        self._first_batch, self._samples, self._correct, self._bytes = batch, 0, 0, 0
        self._tic = time.perf_counter()

    def on_step_end(self, state: FitState) -> None:
        if state.batch_in_epoch == 1:
            self._reset(0)
        self._samples += state.last.samples
        self._correct += state.last.correct
        self._bytes += state.step_bytes
        batch = state.batch_in_epoch
        if batch % self.frequent == 0 or batch == state.steps_per_epoch:
            elapsed = max(time.perf_counter() - self._tic, 1e-9)
            batches = max(batch - self._first_batch, 1)
            line = (f"Epoch[{state.epoch}] Batch [{self._first_batch}-{batch}]\t"
                    f"Speed: {self._samples / elapsed:.2f} samples/sec\t"
                    f"accuracy={self._correct / max(self._samples, 1):.6f}\t"
                    f"comm_MB={self._bytes / batches / 1e6:.4f}")
            print(line, file=self.stream or sys.stdout, flush=True)
            self._reset(batch)


class ProgressBar(Callback):
    """A tqdm bar per epoch with loss and samples/sec (rank 0, on stderr)."""

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
        self._bar.set_postfix(loss=f"{state.last.loss:.4f}", samples_per_sec=f"{speed:.0f}", refresh=False)
        self._bar.update(1)
        if state.batch_in_epoch == state.steps_per_epoch:
            self._close()

    def on_epoch_end(self, state: FitState) -> None:
        self._close()
        if self.enabled and state.heldout is not None:
            print(f"epoch {state.epoch}: held-out loss {state.heldout.loss:.4f} "
                  f"accuracy {state.heldout.correct / max(state.heldout.samples, 1):.4f}",
                  file=sys.stderr, flush=True)

    def on_train_end(self, state: FitState) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class MetricsLogger(Callback):
    """Per-step and per-epoch metrics to ``log_dir/metrics.jsonl`` and TensorBoard
    (``log_dir/tb``, when the tensorboard package is installed)."""

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
                     "wall_s": round(state.wall_s, 4), "loss": last.loss,
                     "accuracy": last.correct / max(last.samples, 1),
                     "samples_per_sec": last.samples / max(state.step_seconds, 1e-9),
                     "bytes_sent": state.step_bytes, "lr": state.lr, "strategy": state.strategy}, state.step)

    def on_epoch_end(self, state: FitState) -> None:
        if state.heldout is not None:
            self._write({"kind": "eval", "step": state.step, "epoch": state.epoch,
                         "wall_s": round(state.wall_s, 4), "loss": state.heldout.loss,
                         "accuracy": state.heldout.correct / max(state.heldout.samples, 1)}, state.step)

    def on_train_end(self, state: FitState) -> None:
        if state.summary is not None:
            self._file.write(json.dumps({"kind": "summary", **state.summary}) + "\n")
        self._file.close()
        if self._writer is not None:
            self._writer.close()
