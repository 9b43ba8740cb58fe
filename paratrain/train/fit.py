"""``fit``: the training loop, readable on one screen.

Per-step work lives in the strategy's ``train_step``; progress, Speedometer, metrics
and checkpoints are callbacks. Data order comes from a seeded sampler, so a run is
reproducible and ``resume`` continues exactly where a checkpoint left off.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn

from paratrain.atomic import save_torch_atomic
from paratrain.data.datasets import TensorDataset
from paratrain.errors import ConfigError
from paratrain.timeline import NULL_TIMELINE
from paratrain.train import checkpoint as ckpt
from paratrain.train.build import build_strategy
from paratrain.train.callbacks import Callback, FitState
from paratrain.train.strategy import StepResult, Strategy


def fit(model: nn.Module, train_data: TensorDataset, *, heldout: TensorDataset | None = None,
        strategy: str | Strategy = "allreduce", epochs: int = 1, batch_size: int = 64,
        optimizer: Any = "sgd", optimizer_params: dict | None = None, loss_fn: nn.Module | None = None,
        seed: int = 0, callbacks: Sequence[Callback] = (), checkpoint_dir: str | None = None,
        checkpoint_every: int | None = None, resume: bool = False, timeline=NULL_TIMELINE) -> dict:
    """Train ``model`` on ``train_data`` with ``strategy``; return the run summary.

    ``batch_size`` is the *global* batch (split across data-parallel workers).
    ``loss_fn`` must sum over the batch (default: cross-entropy, reduction="sum");
    gradients are normalised by the global batch, as Gluon's ``trainer.step``.
    """
    if epochs < 1:
        raise ConfigError(f"epochs={epochs} must be >= 1")
    strategy = build_strategy(strategy) if isinstance(strategy, str) else strategy
    torch.manual_seed(seed)
    strategy.setup(model, optimizer, optimizer_params or {"lr": 0.1}, loss_fn or nn.CrossEntropyLoss(reduction="sum"),
                   timeline=timeline)
    sampler = strategy.make_sampler(len(train_data), batch_size, seed)
    state = FitState(strategy.name, epochs, len(sampler), batch_size)
    if resume:
        _restore(strategy, state, checkpoint_dir, seed=seed, batch_size=batch_size)
    callbacks = list(callbacks) if strategy.is_logging_rank else []
    train_seconds, train_samples, epoch_loss = 0.0, 0, StepResult(0.0, 0, 0)
    _notify(callbacks, "on_train_begin", state)
    for epoch in range(state.epoch, epochs):
        state.epoch, epoch_loss = epoch, StepResult(0.0, 0, 0)
        for global_len, indices in sampler.batches(epoch, state.batch_in_epoch):
            with timeline.span("data", "data"):
                inputs, targets = train_data.batch(indices)
            tic, bytes_before = time.perf_counter(), strategy.bytes_sent
            state.last = strategy.train_step(inputs, targets, global_len)
            state.step_seconds, state.step_bytes = time.perf_counter() - tic, strategy.bytes_sent - bytes_before
            state.step, state.batch_in_epoch, state.lr = state.step + 1, state.batch_in_epoch + 1, strategy.lr
            train_seconds, train_samples = train_seconds + state.step_seconds, train_samples + state.last.samples
            epoch_loss = StepResult(epoch_loss.loss_sum + state.last.loss_sum, 0, epoch_loss.samples + state.last.samples)
            _notify(callbacks, "on_step_end", state)
            if checkpoint_dir and checkpoint_every and state.step % checkpoint_every == 0:
                _save(strategy, state, checkpoint_dir, seed)
        strategy.end_epoch()
        state.epoch, state.batch_in_epoch = epoch + 1, 0   # the checkpoint resumes at the next epoch
        if checkpoint_dir:
            _save(strategy, state, checkpoint_dir, seed)
        state.epoch = epoch
        state.heldout = strategy.evaluate(heldout.inputs, heldout.targets) if heldout is not None else None
        _notify(callbacks, "on_epoch_end", state)
    strategy.finish()
    steps_per_worker, samples_per_sec = strategy.job_totals(state.step, train_samples, train_seconds)
    state.summary = {
        "strategy": strategy.name,
        "final_loss": epoch_loss.loss if epoch_loss.samples else None,
        "accuracy": state.heldout.correct / state.heldout.samples if state.heldout else None,
        "samples_per_sec": samples_per_sec,
        "steps": state.step,
        "steps_per_worker": steps_per_worker,
        "wall_s": round(state.wall_s, 3),
        "param_checksum": strategy.param_checksum(),
    }
    _notify(callbacks, "on_train_end", state)
    timeline.save()
    strategy.close()   # fit set it up, fit releases it (process group, kvstore, channels)
    return state.summary


def _notify(callbacks: Sequence[Callback], hook: str, state: FitState) -> None:
    for callback in callbacks:
        getattr(callback, hook)(state)


def _save(strategy: Strategy, state: FitState, directory: str, seed: int) -> None:
    shard = strategy.checkpoint_shard()
    if shard is None:
        return
    save_torch_atomic({"strategy": strategy.state_dict(), "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                      "step": state.step, "seed": seed, "global_batch": state.global_batch,
                      "rng": ckpt.rng_state()}, ckpt.checkpoint_path(directory, shard))


def _restore(strategy: Strategy, state: FitState, directory: str | None, *, seed: int, batch_size: int) -> None:
    if not directory:
        raise ConfigError("resume needs a checkpoint directory (--checkpoint-dir)")
    saved = ckpt.load_checkpoint(ckpt.checkpoint_path(directory, strategy.resume_shard()))
    for name, current in (("seed", seed), ("global_batch", batch_size)):
        if saved[name] != current:
            raise ConfigError(f"cannot resume: checkpoint has {name}={saved[name]}, this run has {name}={current}")
    strategy.load_state_dict(saved["strategy"])
    ckpt.set_rng_state(saved["rng"])
    state.epoch, state.batch_in_epoch, state.step = saved["epoch"], saved["batch_in_epoch"], saved["step"]
