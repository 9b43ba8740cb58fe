"""What ``fit`` writes into a checkpoint and reads back on resume: the strategy's
state, where the run stands (epoch, batch in epoch, step) and the random states,
sealed and kept by :mod:`paratrain.train.checkpoint` under the run's identity.

A run resumes from its own checkpoints when it restarts by itself (a group restart,
torchrun's ``--max-restarts``), never from another run's; with ``resume`` it may also
take up the newest checkpoint of another run with the same options. A damaged newest
checkpoint is passed over, saying so in one line, only on a restart."""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from paratrain.env import read_env
from paratrain.errors import ConfigError
from paratrain.optimizers import optimizer_name
from paratrain.train import checkpoint as ckpt
from paratrain.train.callbacks import FitState
from paratrain.train.checkpoint import RunIdentity
from paratrain.train.strategy import Strategy

log = logging.getLogger("paratrain.train.checkpoint")


def default_identity(strategy: Strategy, *, seed: int, global_batch: int, optimizer, optimizer_params: dict | None
                     ) -> RunIdentity:
    """The identity of a ``fit`` call given none: the job's run id (the launcher's or
    torchrun's; a fresh one outside a launcher) and the options every resume must keep."""
    name = optimizer_name(optimizer) or repr(optimizer)
    params = {key: value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)
              for key, value in sorted((optimizer_params or {}).items())}
    return RunIdentity(read_env().job_run_id or secrets.token_hex(8),
                       {"strategy": strategy.name, "seed": seed, "batch_size": global_batch, "optimizer": name,
                        "optimizer_params": params})


@dataclass(frozen=True)
class CheckpointPlan:
    """Where and how often ``fit`` saves, and under which identity."""

    directory: str | None
    every: int | None
    seed: int
    keep: int
    identity: RunIdentity

    def due(self, step: int) -> bool:
        """Whether a step checkpoint is due after ``step``."""
        return bool(self.directory and self.every and step % self.every == 0)

    def save(self, strategy: Strategy, state: FitState) -> None:
        save(strategy, state, self.directory, self.seed, self.identity, self.keep)


def save(strategy: Strategy, state: FitState, directory: str, seed: int, identity: RunIdentity,
         keep: int = ckpt.DEFAULT_KEEP) -> None:
    shard = strategy.checkpoint_shard()
    if shard is None:
        return
    ckpt.save_checkpoint({"strategy": strategy.state_dict(), "epoch": state.epoch,
                          "batch_in_epoch": state.batch_in_epoch, "step": state.step, "seed": seed,
                          "global_batch": state.global_batch, "rng": ckpt.rng_state()},
                         directory, shard, step=state.step, identity=identity, keep=keep)


def restore(strategy: Strategy, state: FitState, directory: str | None, *, seed: int, identity: RunIdentity,
            resume: bool) -> bool:
    """Load the checkpoint this run continues from, if any; returns whether it did.
    ``resume``: the user asked to continue the folder's run (else only a restart of
    this run resumes, from its own checkpoints)."""
    restarting = read_env().restart_count > 0
    if not (resume or restarting):
        ckpt.check_directory(directory, identity, resume=False)   # a fresh run needs a folder of its own
        return False
    if not directory:
        raise ConfigError("resume needs a checkpoint directory (--checkpoint-dir)")
    choice = ckpt.choose_checkpoint(directory, identity, adopt=resume, restarting=restarting)
    if choice is None:
        if resume:
            ckpt.check_directory(directory, identity, resume=True)   # says why, in one line
        return False   # restarted before this run's first checkpoint: start afresh
    for reason in choice.skipped:
        log.warning("%s; falling back to the checkpoint of step %d", reason, choice.step)
    shard = strategy.resume_shard()
    if shard not in choice.entries:
        raise ckpt.CheckpointError(f"checkpoint {directory}: shard {shard!r} has no checkpoint of step {choice.step}")
    saved = ckpt.load_entry(directory, choice.entries[shard])
    for name, current in (("seed", seed), ("global_batch", state.global_batch)):
        if saved[name] != current:
            raise ConfigError(f"cannot resume: checkpoint has {name}={saved[name]}, this run has {name}={current}")
    strategy.load_state_dict(saved["strategy"])
    ckpt.set_rng_state(saved["rng"])
    state.epoch, state.batch_in_epoch, state.step = saved["epoch"], saved["batch_in_epoch"], saved["step"]
    return True
