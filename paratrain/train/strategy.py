"""What ``fit`` asks of a parallelism strategy.

A :class:`Strategy` owns how one training step runs across processes (plain data
parallel through a Trainer, a pipeline schedule, ...). ``fit`` only calls the methods
below, so adding a strategy means adding one class, not a branch in the loop.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from paratrain.errors import ConfigError
from paratrain.timeline import NULL_TIMELINE
from paratrain.train.objective import Objective, StepResult


@dataclass(kw_only=True)
class TrainSpec:
    """What a strategy trains with, as ``fit`` hands it over in ``setup``.

    ``optimizer``: a registered name, a ``torch.optim`` class or an instance;
    ``objective``: how a batch becomes a loss; ``scheduler``: a
    ``torch.optim.lr_scheduler`` instance (built on the given optimizer instance) or a
    callable that builds one from the optimizer, stepped after every optimizer step;
    ``max_grad_norm``: clip by the global norm of the aggregated, normalised gradient;
    ``amp``: ``none``, ``bf16`` or ``fp16``."""

    optimizer: Any = "sgd"
    optimizer_params: dict = field(default_factory=lambda: {"lr": 0.1})
    objective: Objective = field(default_factory=Objective)
    scheduler: Any = None
    max_grad_norm: float | None = None
    amp: str = "none"
    timeline: Any = NULL_TIMELINE

    def __post_init__(self) -> None:
        norm = self.max_grad_norm
        if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float))
                                 or not 0 < norm < float("inf")):
            raise ConfigError(f"max_grad_norm={norm!r} must be a finite number > 0 (or None)")

    def build_scheduler(self, optimizer: torch.optim.Optimizer):
        """The scheduler of ``optimizer`` (None without one)."""
        if self.scheduler is None:
            return None
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LRScheduler):
            if self.scheduler.optimizer is not optimizer:
                raise ConfigError("scheduler is an instance built on another optimizer; give fit the optimizer "
                                  "instance it was built on, or a callable: scheduler=lambda opt: ...")
            return self.scheduler
        if not callable(self.scheduler):
            raise ConfigError(f"scheduler={self.scheduler!r} must be an LR scheduler or a callable "
                              f"optimizer -> scheduler")
        scheduler = self.scheduler(optimizer)
        if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            raise TypeError(f"scheduler callable returned {type(scheduler).__name__}, not a "
                            f"torch.optim.lr_scheduler.LRScheduler")
        return scheduler


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
    def setup(self, model: torch.nn.Module, spec: TrainSpec) -> None:
        """Place the model (split, replicate, hook), build the optimizer and scheduler,
        and record spans into ``spec.timeline``."""

    @abc.abstractmethod
    def train_step(self, batch: Any, global_batch: int) -> StepResult:
        """Run forward, backward and the update for this process's share of one
        global batch of ``global_batch`` samples (``batch`` may be None: this worker's
        share of an epoch's short last batch is empty, yet it takes part)."""

    @abc.abstractmethod
    def evaluate(self, batches: Iterable[Any]) -> StepResult:
        """Totals over this process's share of the held-out set (``batches``, cut as
        :meth:`eval_shard` says), summed over the processes that share it: every rank
        gets the same totals."""

    def eval_shard(self) -> tuple[int, int]:
        """``(rank, world)``: which share of the held-out set this process evaluates
        (default: its data-parallel share)."""
        return self.data_rank, self.data_world

    def agree_on_batch(self, local_len: int) -> tuple[bool, int]:
        """For an IterableDataset, whose length nobody knows: whether every worker
        still has a batch, and the step's global length. Default (one worker)."""
        return local_len > 0, local_len

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

    def attach_data(self, data) -> None:
        """This process's training batches (:class:`~paratrain.data.loading.EpochBatches`),
        given once before the first step: a strategy whose workers can change between
        steps loads a step's slice again when the group changed. Default: unused."""

    def joined_at_step(self) -> int | None:
        """The committed step count at which this process joined a job already
        training (a replacement took a dead worker's place); fit starts there. None:
        it starts at the beginning, or at its checkpoint."""
        return None

    def summary_fields(self) -> dict:
        """What this strategy adds to the run's summary (fault-tolerant runs:
        ``worker_failures``, ``recoveries``, ``steps_repeated``). Default: nothing."""
        return {}

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

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer this process steps (a callback may change its learning rate)."""
        return None

    def close(self) -> None:
        pass
