"""Synthetic click logs with a planted model: learnable, of any size, with a known best loss.

Each sample has ``num_dense`` dense features (standard normal) and one categorical id per
table. Ids follow a Zipf law over the table's rows; clicks are Bernoulli draws of

    p = sigmoid(bias + dense_strength * <w, x> / sqrt(D)
                + interaction_strength * sum_{a<b} <v_a, v_b> / sqrt(r * num_pairs))

where ``v_0 = P x / sqrt(D)`` projects the dense features to the planted rank ``r`` and
``v_t`` (t >= 1) is the planted vector of the sample's id in table ``t``. That is DLRM's
own shape (pairwise dot products between a dense projection and the embeddings), so a
DLRM can represent the planted model, and its loss on a split is the best any model can
expect there (``planted_logloss``). ``bias`` is solved so that the mean click rate is
``click_rate``.

Everything random is a counter-based hash of ``(seed, stream, ...)`` (splitmix64): the
planted vector of ``(table, id)`` is computed from the id when a sample needs it, so a
table of millions of rows costs nothing; sample ``i`` of a split depends on nothing but
``(seed, split, i)``, so the held-out split stays the same whatever ``num_train`` is.
An id's planted strength falls with its popularity rank ``k`` as
``1 / (1 + k / signal_rows)``: the long tail of rare ids, which no model sees often
enough to learn, carries little of the signal, so the planted loss can be approached.
Ids are ranks passed through a per-table affine bijection, so the hot rows spread over
the whole row range (and over every server's row shard) instead of sitting at 0, 1, 2.

The splits are generated up front into tensors (vectorised, in chunks), so a batch is a
gather: ``dataset.batch(indices)`` returns the dict for a whole batch at once, and
``dataset[i]`` one sample, as any map-style ``torch.utils.data.Dataset``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import Dataset

from paratrain.errors import ConfigError, check_positive
from paratrain.metrics import binary_logloss, roc_auc

DEFAULT_TABLE_SIZES = (4_000_000, 1_000_000, 100_000, 10_000, 1_000, 100)
MAX_TABLE_ROWS = 2**31 - 1        # rank * multiplier stays inside int64
_CHUNK = 1 << 15                  # samples generated at a time: bounds the temporaries
_CALIBRATION_SAMPLES = 1 << 15

# Hash streams: one per kind of random quantity, so no two ever share a counter.
_TRAIN, _HELDOUT, _CALIBRATION = 0, 1, 2
_DENSE, _IDS, _LABEL, _VECTOR, _DENSE_WEIGHT, _PROJECTION, _PERMUTATION = range(10, 17)

_MASK64 = 2**64 - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that scrambles every bit."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def hash64(*keys) -> np.ndarray:
    """A uint64 hash of the keys (ints or integer arrays, broadcast together)."""
    with np.errstate(over="ignore"):
        state = np.zeros((), dtype=np.uint64)
        for key in keys:
            key = np.uint64(key & _MASK64) if isinstance(key, int) else np.asarray(key).astype(np.uint64)
            state = _mix64(state ^ (key + _GOLDEN))
        return state


def hash_uniform(*keys) -> np.ndarray:
    """Uniform floats in the open interval (0, 1), one per broadcast element of ``keys``."""
    return ((hash64(*keys) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def hash_normal(*keys) -> np.ndarray:
    """Standard normal floats (Box-Muller on two hashed uniforms)."""
    radius = np.sqrt(-2.0 * np.log(hash_uniform(*keys, 0)))
    return radius * np.cos(2.0 * math.pi * hash_uniform(*keys, 1))


def zipf_ranks(uniform: np.ndarray, num_rows: int, exponent: float) -> np.ndarray:
    """Popularity ranks in ``[0, num_rows)``, P(rank k) roughly proportional to
    ``(k + 1) ** -exponent``: the inverse CDF of a Pareto law truncated to
    ``[1, num_rows + 1)``, floored. No per-row table, so any ``num_rows`` is free."""
    top = float(num_rows) + 1.0
    if abs(exponent - 1.0) < 1e-9:
        values = np.exp(uniform * math.log(top))
    else:
        power = 1.0 - exponent
        values = (1.0 - uniform * (1.0 - top**power)) ** (1.0 / power)
    return np.clip(np.floor(values).astype(np.int64) - 1, 0, num_rows - 1)


def _id_permutation(seed: int, table: int, num_rows: int) -> tuple[int, int]:
    """``(multiplier, offset)`` of the bijection ``rank -> (multiplier * rank + offset) % rows``."""
    if num_rows == 1:
        return 1, 0
    multiplier = 1 + int(hash64(seed, _PERMUTATION, table, 0)) % (num_rows - 1)
    while math.gcd(multiplier, num_rows) != 1:
        multiplier = multiplier % (num_rows - 1) + 1
    return multiplier, int(hash64(seed, _PERMUTATION, table, 1)) % num_rows


@dataclass(kw_only=True)
class ClickConfig:
    """The planted click model and the shape of its logs."""

    table_sizes: tuple[int, ...] = DEFAULT_TABLE_SIZES
    num_dense: int = 13
    zipf_exponent: float = 1.1
    latent_dim: int = 4                  # rank r of the planted vectors
    signal_rows: int = 50                # ids past this popularity rank carry less signal
    click_rate: float = 0.2              # mean of the click probability (bias is solved for it)
    dense_strength: float = 0.5
    interaction_strength: float = 1.5
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.table_sizes, list):
            self.table_sizes = tuple(self.table_sizes)
        if not isinstance(self.table_sizes, tuple) or not self.table_sizes or not all(
                isinstance(rows, int) and not isinstance(rows, bool) and 1 <= rows <= MAX_TABLE_ROWS
                for rows in self.table_sizes):
            raise ConfigError(f"table_sizes={self.table_sizes!r} must be a non-empty tuple of ints "
                              f"in [1, {MAX_TABLE_ROWS}]")
        for name in ("num_dense", "latent_dim", "signal_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an int >= 1")
        if isinstance(self.zipf_exponent, bool) or not isinstance(self.zipf_exponent, (int, float)) \
                or not 0.5 <= self.zipf_exponent <= 3.0:
            raise ConfigError(f"zipf_exponent={self.zipf_exponent!r} must be a number in [0.5, 3.0]")
        if isinstance(self.click_rate, bool) or not isinstance(self.click_rate, (int, float)) \
                or not 0.0 < self.click_rate < 1.0:
            raise ConfigError(f"click_rate={self.click_rate!r} must be a number in (0, 1)")
        check_positive("dense_strength", self.dense_strength, allow_zero=True)
        check_positive("interaction_strength", self.interaction_strength, allow_zero=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an int")


class PlantedClickModel:
    """The true click probability of any sample: a pure function of the config."""

    def __init__(self, config: ClickConfig):
        self.config = config
        seed, dim = config.seed, config.latent_dim
        columns = np.arange(config.num_dense)
        self.dense_weight = hash_normal(seed, _DENSE_WEIGHT, columns)                    # (D,)
        self.projection = hash_normal(seed, _PROJECTION, np.arange(dim)[:, None], columns)   # (r, D)
        self.permutations = [_id_permutation(seed, table, rows) for table, rows in enumerate(config.table_sizes)]
        self.bias = self._solve_bias()

    def sample(self, split: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples ``[start, stop)`` of ``split``: dense, sparse ids, true probability, click."""
        dense, ids, ranks = self._features(split, start, stop)
        probability = 1.0 / (1.0 + np.exp(-(self.bias + self._unbiased_logits(dense, ids, ranks))))
        click = hash_uniform(self.config.seed, _LABEL, split, np.arange(start, stop, dtype=np.uint64)) < probability
        return {"dense": dense, "sparse": ids, "probability": probability, "click": click}

    def _features(self, split: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        config, index = self.config, np.arange(start, stop, dtype=np.uint64)
        dense = hash_normal(config.seed, _DENSE, split, index[:, None], np.arange(config.num_dense))
        ranks = np.stack([zipf_ranks(hash_uniform(config.seed, _IDS, split, index, table), rows, config.zipf_exponent)
                          for table, rows in enumerate(config.table_sizes)], axis=1)
        ids = np.stack([(multiplier * ranks[:, table] + offset) % rows for table, (rows, (multiplier, offset))
                        in enumerate(zip(config.table_sizes, self.permutations))], axis=1)
        return dense, ids, ranks

    def _unbiased_logits(self, dense: np.ndarray, ids: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        config, dim, num_tables = self.config, self.config.latent_dim, len(self.config.table_sizes)
        root_dense = math.sqrt(config.num_dense)
        strength = 1.0 / (1.0 + ranks / config.signal_rows)                               # (B, T)
        vectors = hash_uniform(config.seed, _VECTOR, np.arange(num_tables)[:, None], ids[:, :, None], np.arange(dim))
        vectors = (2.0 * vectors - 1.0) * math.sqrt(3.0) * strength[:, :, None]          # unit variance at rank 0
        projected = dense @ self.projection.T / root_dense                                 # (B, r)
        everything = np.concatenate([projected[:, None, :], vectors], axis=1)             # (B, T+1, r)
        pair_sum = 0.5 * ((everything.sum(axis=1) ** 2).sum(axis=1) - (everything**2).sum(axis=(1, 2)))
        num_pairs = (num_tables + 1) * num_tables / 2
        return (config.dense_strength * dense @ self.dense_weight / root_dense
                + config.interaction_strength * pair_sum / math.sqrt(dim * num_pairs))

    def _solve_bias(self) -> float:
        """The bias whose mean click probability over a calibration sample is ``click_rate``
        (bisection: the mean is increasing in the bias)."""
        logits = self._unbiased_logits(*self._features(_CALIBRATION, 0, _CALIBRATION_SAMPLES))
        low, high = -40.0, 40.0
        for _ in range(80):
            middle = (low + high) / 2
            if np.mean(1.0 / (1.0 + np.exp(-(logits + middle)))) < self.config.click_rate:
                low = middle
            else:
                high = middle
        return (low + high) / 2


class ClickLogs(Dataset):
    """One split of the click logs, held in tensors. ``dataset[i]`` and
    ``dataset.batch(indices)`` give ``{"dense": float32[..., D], "sparse": int64[..., T],
    "click": float32[...]}``.

    ``planted_logloss`` and ``planted_auc`` are the true model's mean log loss and AUC on
    this split's own labels: the best a model can expect here. ``base_rate_logloss`` is
    the loss of always predicting this split's click rate (no model at all).
    """

    task = "clicks"

    def __init__(self, model: PlantedClickModel, split: int, num_samples: int):
        chunks = [model.sample(split, start, min(start + _CHUNK, num_samples))
                  for start in range(0, num_samples, _CHUNK)]
        merged = {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}
        self.table_sizes = model.config.table_sizes
        self.num_dense = model.config.num_dense
        self.dense = torch.from_numpy(merged["dense"].astype(np.float32))
        self.sparse = torch.from_numpy(merged["sparse"].astype(np.int64))
        self.click = torch.from_numpy(merged["click"].astype(np.float32))
        self.probability = torch.from_numpy(merged["probability"])           # float64, the truth
        logit = torch.logit(self.probability)
        self.planted_logloss = binary_logloss(logit, self.click)
        self.planted_auc = roc_auc(self.probability, self.click) if 0 < self.click_rate < 1 else float("nan")
        rate = min(max(self.click_rate, 1e-12), 1 - 1e-12)
        self.base_rate_logloss = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))

    @property
    def click_rate(self) -> float:
        return float(self.click.mean())

    def __len__(self) -> int:
        return len(self.click)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"dense": self.dense[index], "sparse": self.sparse[index], "click": self.click[index]}

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The samples at ``indices`` as one batch (a gather; no per-sample collation)."""
        return {"dense": self.dense[indices], "sparse": self.sparse[indices], "click": self.click[indices]}


def build_clicks(*, num_train: int = 1_000_000, num_heldout: int = 100_000,
                 table_sizes: tuple[int, ...] = DEFAULT_TABLE_SIZES, num_dense: int = 13,
                 zipf_exponent: float = 1.1, seed: int = 0, **planted) -> tuple[ClickLogs, ClickLogs]:
    """``(train, heldout)`` click logs of one planted model. ``planted`` takes the other
    :class:`ClickConfig` fields (``latent_dim``, ``signal_rows``, ``click_rate``,
    ``dense_strength``, ``interaction_strength``)."""
    for name, value in (("num_train", num_train), ("num_heldout", num_heldout)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an int >= 1")
    named_here = {"table_sizes", "num_dense", "zipf_exponent", "seed"}
    allowed = sorted({field.name for field in fields(ClickConfig)} - named_here)
    unknown = sorted(set(planted) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown click-log option(s) {unknown}; allowed: {', '.join(allowed)}")
    config = ClickConfig(table_sizes=table_sizes, num_dense=num_dense, zipf_exponent=zipf_exponent,
                         seed=seed, **planted)
    model = PlantedClickModel(config)
    return ClickLogs(model, _TRAIN, num_train), ClickLogs(model, _HELDOUT, num_heldout)
