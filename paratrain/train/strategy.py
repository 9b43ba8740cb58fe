"""What ``fit`` asks of a parallelism strategy.

A :class:`Strategy` owns how one training step runs across processes (plain data
parallel through a Trainer, a pipeline schedule, ...). ``fit`` only calls the methods
below, so adding a strategy means adding one class, not a branch in the loop.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable

import torch

from paratrain.timeline import NULL_TIMELINE


@dataclass
class StepResult:
    """Totals over the *global* batch of one step, identical on every rank."""

    loss_sum: float
    correct: int
    samples: int

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)


class Strategy(abc.ABC):
    """One way to train across processes. ``fit`` calls, in order: ``setup`` once,
    then ``train_step`` per global batch, ``evaluate`` per epoch, and
    ``state_dict``/``load_state_dict`` for checkpoints, ``close`` at the end."""

    name: str = "base"

    #: Which slice of each global batch this process loads: data_rank in
    #: [0, data_world). Pipeline stages of one replica share a data_rank.
    data_rank: int = 0
    data_world: int = 1
    #: True on the process that prints progress and writes metrics.
    is_logging_rank: bool = True

    @abc.abstractmethod
    def setup(self, model: torch.nn.Module, optimizer: str, optimizer_params: dict,
              loss_fn: Any, *, timeline=NULL_TIMELINE) -> None:
        """Place the model (split, replicate, hook) and build optimizers; record
        spans into ``timeline`` (a :class:`paratrain.timeline.Timeline`)."""

    @abc.abstractmethod
    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, global_batch: int) -> StepResult:
        """Run forward, backward and the update for this process's share of one
        global batch of ``global_batch`` samples."""

    @abc.abstractmethod
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepResult:
        """Loss and correct count over held-out data (every rank gets the totals)."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume this process (model, optimizer, ...)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def validate(self, global_batch: int, world_size: int, model_factory: Callable[[], torch.nn.Module]) -> None:
        """Raise :class:`~paratrain.errors.ConfigError` if this strategy cannot train
        ``model_factory()`` at ``global_batch`` on ``world_size`` processes. Called
        before any process starts; must start nothing. Default: nothing to check."""

    def end_epoch(self) -> None:
        """Called on every rank after an epoch's last step, before its checkpoint and
        evaluation (e.g. local SGD averages the models here)."""

    def finish(self) -> None:
        """Called on every rank after its last step, before the summary: release what
        others may be waiting on (parameter-server workers say goodbye)."""

    def make_sampler(self, dataset_len: int, global_batch: int, seed: int):
        """The batch sampler this process trains with (default: a fixed shard of every
        global batch; async strategies hand batches out dynamically)."""
        from paratrain.data.sampler import ShardedBatchSampler
        return ShardedBatchSampler(dataset_len, global_batch, self.data_rank, self.data_world, seed)

    def job_totals(self, steps: int, samples: int, seconds: float) -> tuple[list[int], float]:
        """Called once at the end with this worker's step count and the global samples
        and seconds it trained: every worker's step count, in rank order, and the
        job's samples/sec. In lockstep each step's totals are already global."""
        from paratrain.comm.process_group import all_gather_ints
        return all_gather_ints(steps), samples / seconds if seconds else 0.0

    def checkpoint_shard(self) -> str | None:
        """File-name stem this process saves its checkpoint under, or None when
        another rank saves the same state (data parallel: only rank 0 saves)."""
        return "model" if self.is_logging_rank else None

    def resume_shard(self) -> str:
        """File-name stem this process resumes from (data-parallel replicas all load
        the one rank 0 wrote; pipeline replicas load their stage's)."""
        return self.checkpoint_shard() or "model"

    def full_model_state(self) -> dict:
        """A single state dict a one-process model loads (pipelines assemble it)."""
        raise NotImplementedError

    def param_checksum(self) -> str:
        """sha256 of the final parameters as bytes, equal on every rank."""
        raise NotImplementedError

    @property
    def bytes_sent(self) -> int:
        """Bytes this process has put on the wire so far."""
        return 0

    @property
    @abc.abstractmethod
    def lr(self) -> float:
        """The learning rate the last step used (progress and metrics)."""

    def close(self) -> None:
        pass
