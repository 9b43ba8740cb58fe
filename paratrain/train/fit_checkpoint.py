"""What ``fit`` writes into a checkpoint and reads back on resume: the strategy's
state, where the run stands (epoch, batch in epoch, step) and the random states."""
from __future__ import annotations

from paratrain.atomic import save_torch_atomic
from paratrain.errors import ConfigError
from paratrain.train import checkpoint as ckpt
from paratrain.train.callbacks import FitState
from paratrain.train.strategy import Strategy


def save(strategy: Strategy, state: FitState, directory: str, seed: int) -> None:
    shard = strategy.checkpoint_shard()
    if shard is None:
        return
    save_torch_atomic({"strategy": strategy.state_dict(), "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                       "step": state.step, "seed": seed, "global_batch": state.global_batch,
                       "rng": ckpt.rng_state()}, ckpt.checkpoint_path(directory, shard))


def restore(strategy: Strategy, state: FitState, directory: str | None, *, seed: int) -> None:
    if not directory:
        raise ConfigError("resume needs a checkpoint directory (--checkpoint-dir)")
    saved = ckpt.load_checkpoint(ckpt.checkpoint_path(directory, strategy.resume_shard()))
    for name, current in (("seed", seed), ("global_batch", state.global_batch)):
        if saved[name] != current:
            raise ConfigError(f"cannot resume: checkpoint has {name}={saved[name]}, this run has {name}={current}")
    strategy.load_state_dict(saved["strategy"])
    ckpt.set_rng_state(saved["rng"])
    state.epoch, state.batch_in_epoch, state.step = saved["epoch"], saved["batch_in_epoch"], saved["step"]
