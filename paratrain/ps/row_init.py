"""How the rows of a row-sparse key are made where they live: pure functions, no network.

A row-sparse key (an embedding table) is never sent whole: each server makes its own
row range from an :class:`RowInitializer` spec (zeros, uniform or normal, with a seed).
Rows are drawn in fixed blocks of :data:`BLOCK_ROWS` rows, block ``b`` from a generator
seeded with a hash of ``(seed, b)``, so row ``r`` has the same value whatever the number
of servers, the row range a server holds, or whether one process makes the whole
table (a plain embedding under ``local``/``allreduce``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from paratrain.errors import ConfigError, check_choice

INITIALIZER_KINDS = ("zeros", "uniform", "normal")
#: Rows drawn from one seeded generator; a row range is made block by block.
BLOCK_ROWS = 4096
_MASK64 = (1 << 64) - 1


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"initializer {name}={value!r} must be a finite number")
    return float(value)


@dataclass(frozen=True)
class RowInitializer:
    """``zeros``; ``uniform`` in ``[low, high)``; or ``normal(mean, std)``, from ``seed``."""

    kind: str = "zeros"
    low: float = -0.05
    high: float = 0.05
    mean: float = 0.0
    std: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("initializer kind", self.kind, INITIALIZER_KINDS)
        for name in ("low", "high", "mean", "std"):
            _finite(name, getattr(self, name))
        if self.kind == "uniform" and not self.low < self.high:
            raise ConfigError(f"uniform initializer needs low < high, got low={self.low}, high={self.high}")
        if self.kind == "normal" and not self.std > 0:
            raise ConfigError(f"normal initializer std={self.std!r} must be > 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= _MASK64:
            raise ConfigError(f"initializer seed={self.seed!r} must be an int in [0, 2**64)")

    @classmethod
    def from_spec(cls, spec: Any) -> "RowInitializer":
        """From an initializer, a kind name, or a dict such as ``{"kind": "uniform",
        "low": -0.1, "high": 0.1, "seed": 3}``; unknown keys are refused."""
        if isinstance(spec, RowInitializer):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, str):
            return cls(kind=spec)
        if not isinstance(spec, dict):
            raise ConfigError(f"initializer={spec!r} must be a RowInitializer, a kind "
                              f"({', '.join(INITIALIZER_KINDS)}) or a dict")
        unknown = sorted(set(spec) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"initializer got unknown key(s) {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**spec)

    def to_spec(self) -> dict:
        return asdict(self)


def _block_seed(seed: int, block: int) -> int:
    """splitmix64 of ``(seed, block)``: unrelated streams for neighbouring blocks."""
    x = (seed * 0x9E3779B97F4A7C15 + block + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def fill_rows(initializer: RowInitializer, out: torch.Tensor, first_row: int) -> torch.Tensor:
    """Write rows ``[first_row, first_row + len(out))`` of the table into ``out`` (2-D,
    any float dtype), in place, one block at a time; returns ``out``."""
    if out.dim() != 2:
        raise ValueError(f"fill_rows needs a 2-D tensor of rows, got shape {tuple(out.shape)}")
    if initializer.kind == "zeros":
        return out.zero_()
    rows, dim = out.shape
    generator = torch.Generator()
    block = first_row // BLOCK_ROWS
    while block * BLOCK_ROWS < first_row + rows:
        start = block * BLOCK_ROWS
        generator.manual_seed(_block_seed(initializer.seed, block))
        values = torch.empty(BLOCK_ROWS, dim, dtype=torch.float32)
        if initializer.kind == "uniform":
            values.uniform_(initializer.low, initializer.high, generator=generator)
        else:
            values.normal_(initializer.mean, initializer.std, generator=generator)
        lo, hi = max(start, first_row), min(start + BLOCK_ROWS, first_row + rows)
        out[lo - first_row:hi - first_row] = values[lo - start:hi - start]
        block += 1
    return out
