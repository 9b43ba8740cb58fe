"""``fit``: the training loop, readable on one screen.

Per-step work lives in the strategy's ``train_step``; how a batch becomes a loss in an
:class:`~paratrain.train.objective.Objective`; loading in
:mod:`paratrain.data.loading`; progress, Speedometer, metrics and checkpoints are
callbacks and :mod:`paratrain.train.fit_checkpoint`. Data order comes from a seeded
sampler, so a run is reproducible and ``resume`` continues exactly where a checkpoint
left off.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from paratrain.data.batches import batch_len
from paratrain.data.loading import LoaderConfig, build_epoch_batches, build_eval_batches
from paratrain.errors import ConfigError, TrainingDiverged
from paratrain.timeline import NULL_TIMELINE
from paratrain.train import fit_checkpoint
from paratrain.train.checkpoint import DEFAULT_KEEP, RunIdentity
from paratrain.train.build import build_strategy
from paratrain.train.callbacks import Callback, FitState, notify
from paratrain.train.objective import HeldoutStats, Objective, StepResult
from paratrain.train.strategy import Strategy, TrainSpec


def fit(model: nn.Module, train_data: Any, *, heldout: Any = None, strategy: str | Strategy = "allreduce",
        epochs: int = 1, batch_size: int = 64, optimizer: Any = "sgd", optimizer_params: dict | None = None,
        step_fn: Callable | None = None, loss_fn: Callable | None = None, loss_reduction: str | None = None,
        heldout_stats: HeldoutStats | None = None,
        collate_fn: Callable | None = None, num_workers: int = 0, pin_memory: bool = False,
        persistent_workers: bool = False, scheduler: Any = None, max_grad_norm: float | None = None,
        amp: str | None = None, seed: int = 0, callbacks: Sequence[Callback] = (),
        checkpoint_dir: str | None = None, checkpoint_every: int | None = None, resume: bool = False,
        timeline=NULL_TIMELINE, keep_checkpoints: int = DEFAULT_KEEP, run_identity: RunIdentity | None = None) -> dict:
    """Train ``model`` on ``train_data`` with ``strategy``; return the run summary.

    ``train_data``/``heldout``: a map-style ``Dataset``, an ``IterableDataset``, a
    ``DataLoader`` or paratrain's ``TensorDataset``. ``batch_size`` is the GLOBAL batch,
    split across data-parallel workers. The loss is ``step_fn(model, batch)`` or
    ``loss_fn(outputs, batch)`` (either may also return ``(loss, {name: value})``), or,
    with neither, cross-entropy on ``(inputs, targets)`` batches; ``loss_reduction``
    says whether that loss is a ``"mean"`` or a ``"sum"`` over the batch (default:
    ``"mean"`` for your functions, ``"sum"`` for the built-in one). Either way the
    update is that of one process over the whole global batch. ``heldout_stats`` (a
    :class:`~paratrain.train.objective.HeldoutStats`) adds sums that are not means to
    the held-out totals (a score histogram for the AUC), for callbacks to read in
    ``state.heldout.stats``. A loss that becomes NaN or infinite stops the run
    (:class:`~paratrain.errors.TrainingDiverged`).

    Checkpoints (``checkpoint_dir``) carry ``run_identity`` (default: the job's run id
    and the strategy, seed and batch size); the newest ``keep_checkpoints`` are kept.
    A run restarted by its launcher resumes its own; ``resume=True`` also continues
    another run's with the same options. A folder holding another run's checkpoints
    is refused without ``resume``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r} must be an integer >= 1")
    loader = LoaderConfig(collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers)
    strategy = build_strategy(strategy) if isinstance(strategy, str) else strategy
    torch.manual_seed(seed)
    strategy.setup(model, TrainSpec(optimizer=optimizer, optimizer_params=optimizer_params or {"lr": 0.1},
                                    objective=Objective(step_fn=step_fn, loss_fn=loss_fn, reduction=loss_reduction,
                                                        stats=heldout_stats),
                                    scheduler=scheduler, max_grad_norm=max_grad_norm, amp=amp or "none",
                                    timeline=timeline))
    data = build_epoch_batches(train_data, global_batch=batch_size, rank=strategy.data_rank,
                               world=strategy.data_world, config=loader,
                               sampler_factory=lambda length: strategy.make_sampler(length, batch_size, seed))
    strategy.attach_data(data)
    eval_rank, eval_world = strategy.eval_shard()
    evaluation = None if heldout is None else build_eval_batches(heldout, global_batch=batch_size, rank=eval_rank,
                                                                 world=eval_world, config=loader)
    state = FitState(strategy.name, epochs, data.steps_per_epoch, batch_size, strategy=strategy)
    identity = run_identity or fit_checkpoint.default_identity(strategy, seed=seed, global_batch=batch_size,
                                                               optimizer=optimizer, optimizer_params=optimizer_params)
    plan = fit_checkpoint.CheckpointPlan(checkpoint_dir, checkpoint_every, seed, keep_checkpoints, identity)
    try:
        joined = strategy.joined_at_step()
        if (checkpoint_dir or resume) and joined is None:
            fit_checkpoint.restore(strategy, state, checkpoint_dir, seed=seed, identity=plan.identity, resume=resume)
        if joined is not None:   # a replacement: on from a healthy peer's state and step
            state.step, (state.epoch, state.batch_in_epoch) = joined, divmod(joined, data.steps_per_epoch)
        return _train(strategy, state, data, evaluation, callbacks, plan, timeline)
    finally:
        strategy.close()   # fit set it up, fit releases it (process group, kvstore, channels)


def _train(strategy: Strategy, state: FitState, data, evaluation, callbacks, plan: fit_checkpoint.CheckpointPlan,
           timeline) -> dict:
    train_seconds, train_samples, epoch_loss = 0.0, 0, StepResult(0.0, 0)
    notify(callbacks, "on_train_begin", state)
    for epoch in range(state.epoch, state.epochs):
        state.epoch, epoch_loss = epoch, StepResult(0.0, 0)
        for global_len, batch in _steps(data, strategy, epoch, state.batch_in_epoch, timeline):
            tic, bytes_before = time.perf_counter(), strategy.bytes_sent
            state.last = _finite(strategy.train_step(batch, global_len), state)
            state.step_seconds, state.step_bytes = time.perf_counter() - tic, strategy.bytes_sent - bytes_before
            state.step, state.batch_in_epoch, state.lr = state.step + 1, state.batch_in_epoch + 1, strategy.lr
            train_seconds, train_samples = train_seconds + state.step_seconds, train_samples + state.last.samples
            epoch_loss.loss_sum, epoch_loss.samples = epoch_loss.loss_sum + state.last.loss_sum, \
                epoch_loss.samples + state.last.samples
            notify(callbacks, "on_step_end", state)
            if plan.due(state.step):
                plan.save(strategy, state)
        strategy.end_epoch()
        if epoch == state.epochs - 1:
            strategy.finish()   # before the last checkpoint and evaluation: the final model
        state.epoch, state.batch_in_epoch = epoch + 1, 0   # the checkpoint resumes at the next epoch
        if plan.directory:
            plan.save(strategy, state)
        state.epoch = epoch
        state.heldout = None if evaluation is None else strategy.evaluate(batch for _, batch in evaluation.epoch(0))
        notify(callbacks, "on_epoch_end", state)
    state.summary = _summary(strategy, state, epoch_loss, train_samples, train_seconds)
    notify(callbacks, "on_train_end", state)
    timeline.save()
    return state.summary


def _finite(result: StepResult, state: FitState) -> StepResult:
    """``result``, unless its loss is NaN or infinite: then the run has diverged and
    every later step would only train on garbage."""
    if not math.isfinite(result.loss_sum):
        raise TrainingDiverged(f"the training loss is {result.loss_sum} at step {state.step + 1} (epoch "
                               f"{state.epoch}): the run diverged; lower the learning rate, or clip the gradients "
                               f"(max_grad_norm)")
    return result


def _steps(data, strategy: Strategy, epoch: int, start_batch: int, timeline):
    """``(global_len, batch)`` per step; for an IterableDataset the workers agree on
    each step's length and on when the epoch ends."""
    batches = iter(data.epoch(epoch, start_batch))
    while True:
        with timeline.span("data", "data"):
            global_len, batch = next(batches, (None, None))
        if global_len is None:
            more, global_len = strategy.agree_on_batch(batch_len(batch) if batch is not None else 0)
            if not more:
                return
        yield global_len, batch


def _summary(strategy: Strategy, state: FitState, epoch_loss: StepResult, samples: int, seconds: float) -> dict:
    steps_per_worker, samples_per_sec = strategy.job_totals(state.step, samples, seconds)
    heldout = state.heldout
    summary = {
        "strategy": strategy.name,
        "final_loss": epoch_loss.loss if epoch_loss.samples else None,
        "accuracy": heldout.accuracy if heldout is not None else None,
        "heldout_loss": heldout.loss if heldout is not None else None,
        "samples_per_sec": samples_per_sec,
        "steps": max(state.step, steps_per_worker[0]) if steps_per_worker else state.step,   # all incarnations
        "steps_per_worker": steps_per_worker,
        "wall_s": round(state.wall_s, 3),
        "param_checksum": strategy.param_checksum(),
    }
    if heldout is not None:
        summary.update({f"heldout_{name}": value for name, value in heldout.metric_means().items()})
    summary.update(strategy.summary_fields())
    return summary
