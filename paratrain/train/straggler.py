"""Simulated stragglers, for benchmarks and load-balancing tests.

``Straggler(strategy, factor, base_delay_s)`` makes every training step take
``factor`` times as long as (real work + ``base_delay_s``), by sleeping. The base delay
stands in for compute that does not shrink when other processes sleep: on a machine
with fewer cores than processes, a slowed worker frees CPU for the fast ones, and
only a wall-clock delay keeps "2x faster" meaning 2x. It wraps any strategy and
changes nothing else.
"""
from __future__ import annotations

import time

from paratrain.errors import ConfigError
from paratrain.train.strategy import Strategy


def parse_stragglers(spec: str | None) -> dict[int, float]:
    """``"1:3,2:1.5"`` -> ``{1: 3.0, 2: 1.5}`` (rank: slowdown factor >= 1)."""
    if not spec:
        return {}
    result = {}
    for item in spec.split(","):
        rank_text, sep, factor_text = item.partition(":")
        try:
            rank, factor = int(rank_text), float(factor_text)
        except ValueError:
            raise ConfigError(f"--straggler {spec!r}: use RANK:FACTOR[,RANK:FACTOR], e.g. 3:2.5") from None
        if not sep or rank < 0 or factor < 1:
            raise ConfigError(f"--straggler {item!r}: rank must be >= 0 and factor >= 1")
        result[rank] = factor
    return result


class Straggler:
    """Wraps a strategy (``inner``): the same object in every respect except that each
    ``train_step`` is stretched by ``factor``."""

    def __init__(self, inner: Strategy, factor: float = 1.0, base_delay_s: float = 0.0) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "factor", factor)
        object.__setattr__(self, "base_delay_s", base_delay_s)

    def __getattr__(self, name):            # everything but train_step is the inner strategy's
        return getattr(self.inner, name)

    def __setattr__(self, name, value):     # e.g. fit sets .timeline on the real strategy
        setattr(self.inner, name, value)

    def train_step(self, inputs, targets, global_batch):
        start = time.perf_counter()
        result = self.inner.train_step(inputs, targets, global_batch)
        work = time.perf_counter() - start
        time.sleep(max(0.0, self.factor * (work + self.base_delay_s) - work))
        return result
