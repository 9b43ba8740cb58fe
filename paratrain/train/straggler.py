"""Simulated stragglers, for benchmarks and load-balancing tests.

``Straggler(strategy, factor, base_delay_s)`` makes every training step take
``factor`` times as long as (real work + ``base_delay_s``), by sleeping. The base delay
stands in for compute that does not shrink when other processes sleep: on a machine
with fewer cores than processes, a slowed worker frees CPU for the fast ones, and
only a wall-clock delay keeps "2x faster" meaning 2x. ``--straggler`` is parsed by
:func:`paratrain.config.parse_stragglers`.
"""
from __future__ import annotations

import time

from paratrain.train.strategy import Strategy, TrainSpec


class Straggler(Strategy):
    """Wraps a strategy (``inner``) and stretches each of its ``train_step`` calls by
    ``factor``; every other part of the :class:`Strategy` contract is the inner one's,
    delegated explicitly."""

    def __init__(self, inner: Strategy, factor: float = 1.0, base_delay_s: float = 0.0) -> None:
        self.inner, self.factor, self.base_delay_s = inner, factor, base_delay_s

    def train_step(self, batch, global_batch):
        start = time.perf_counter()
        result = self.inner.train_step(batch, global_batch)
        work = time.perf_counter() - start
        time.sleep(max(0.0, self.factor * (work + self.base_delay_s) - work))
        return result

    # -- the rest is the inner strategy's -----------------------------------------

    name = property(lambda self: self.inner.name)
    data_rank = property(lambda self: self.inner.data_rank)
    data_world = property(lambda self: self.inner.data_world)
    is_logging_rank = property(lambda self: self.inner.is_logging_rank)
    bytes_sent = property(lambda self: self.inner.bytes_sent)
    lr = property(lambda self: self.inner.lr)
    optimizer = property(lambda self: self.inner.optimizer)

    def setup(self, model, spec: TrainSpec) -> None:
        self.inner.setup(model, spec)

    def evaluate(self, batches):
        return self.inner.evaluate(batches)

    def eval_shard(self) -> tuple[int, int]:
        return self.inner.eval_shard()

    def agree_on_batch(self, local_len: int) -> tuple[bool, int]:
        return self.inner.agree_on_batch(local_len)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def validate(self, global_batch, world_size, model_factory) -> None:
        self.inner.validate(global_batch, world_size, model_factory)

    def end_epoch(self) -> None:
        self.inner.end_epoch()

    def finish(self) -> None:
        self.inner.finish()

    def attach_data(self, data) -> None:
        self.inner.attach_data(data)

    def joined_at_step(self) -> int | None:
        return self.inner.joined_at_step()

    def summary_fields(self) -> dict:
        return self.inner.summary_fields()

    def make_sampler(self, dataset_len: int, global_batch: int, seed: int):
        return self.inner.make_sampler(dataset_len, global_batch, seed)

    def job_totals(self, steps: int, samples: int, seconds: float):
        return self.inner.job_totals(steps, samples, seconds)

    def checkpoint_shard(self):
        return self.inner.checkpoint_shard()

    def resume_shard(self) -> str:
        return self.inner.resume_shard()

    def full_model_state(self) -> dict:
        return self.inner.full_model_state()

    def param_checksum(self) -> str:
        return self.inner.param_checksum()

    def close(self) -> None:
        self.inner.close()
