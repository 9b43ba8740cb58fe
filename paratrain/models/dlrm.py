"""DLRM, the deep learning recommendation model (Naumov et al., 2019), for click prediction.

One embedding table per categorical feature; a bottom MLP maps the dense features to a
vector of the embedding width; the dot products of every pair among that vector and the
embeddings (each pair once, no self-products), concatenated with the bottom output, feed
a top MLP that ends in one logit.

The tables come from an ``embedding_factory(num_rows, dim)``, so that a table that lives
on parameter servers (``paratrain.nn.ServerEmbedding``) replaces ``nn.Embedding`` without
touching the model. Nothing else in the model depends on the table sizes: with a factory
that allocates no rows, a model with tables of millions of rows is as small as its MLPs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from paratrain.errors import ConfigError, check_choice

EmbeddingFactory = Callable[[int, int], nn.Module]


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")


def _as_widths(name: str, value, *, allow_empty: bool) -> tuple[int, ...]:
    """``value`` as a tuple of positive ints, or a ConfigError naming the field."""
    if isinstance(value, (list, tuple)) and (value or allow_empty) and all(
            isinstance(width, int) and not isinstance(width, bool) and width >= 1 for width in value):
        return tuple(value)
    kind = "a tuple" if allow_empty else "a non-empty tuple"
    raise ConfigError(f"{name}={value!r} must be {kind} of ints >= 1")


@dataclass(kw_only=True)
class DLRMConfig:
    """DLRM's shape. ``bottom_mlp`` and ``top_mlp`` are hidden widths: the bottom MLP
    always ends in a layer of width ``embedding_dim``, the top MLP in one logit.

    ``bottom_relu_last`` puts a ReLU after the bottom MLP's last layer, as the reference
    DLRM does. It is off by default: a signed bottom output takes dot products with the
    embeddings directly, where a non-negative one must learn each direction twice, so
    the linear ending learns faster (docs/dlrm.md has the measurements).
    """

    num_dense: int
    table_sizes: tuple[int, ...]
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64,)
    top_mlp: tuple[int, ...] = (64,)
    bottom_relu_last: bool = False

    def __post_init__(self) -> None:
        _check_int("num_dense", self.num_dense, 1)
        _check_int("embedding_dim", self.embedding_dim, 1)
        self.table_sizes = _as_widths("table_sizes", self.table_sizes, allow_empty=False)
        self.bottom_mlp = _as_widths("bottom_mlp", self.bottom_mlp, allow_empty=True)
        self.top_mlp = _as_widths("top_mlp", self.top_mlp, allow_empty=True)
        if not isinstance(self.bottom_relu_last, bool):
            raise ConfigError(f"bottom_relu_last={self.bottom_relu_last!r} must be True or False")

    @property
    def num_tables(self) -> int:
        return len(self.table_sizes)

    @property
    def num_interactions(self) -> int:
        """Pairwise dot products among the bottom output and the embeddings."""
        vectors = self.num_tables + 1
        return vectors * (vectors - 1) // 2


def sparse_embedding(num_rows: int, dim: int) -> nn.Embedding:
    """The default table: ``nn.Embedding(num_rows, dim, sparse=True)`` (its gradient is a
    sparse COO tensor holding only the rows a batch touched), initialised uniformly in
    ``±sqrt(1 / num_rows)`` as the reference DLRM: the rows of a big table, most of
    which training rarely or never touches, start near zero and add no noise."""
    table = nn.Embedding(num_rows, dim, sparse=True)
    bound = math.sqrt(1.0 / num_rows)
    nn.init.uniform_(table.weight, -bound, bound)
    return table


def _mlp(widths: tuple[int, ...], *, relu_last: bool) -> nn.Sequential:
    """Linear layers through ``widths`` (input width first), ReLU between them and, when
    ``relu_last``, after the last."""
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if relu_last or index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """``forward(dense: float[B, num_dense], sparse: long[B, num_tables]) -> logits float[B]``.

    ``tables`` is an ``nn.ModuleList`` with one module per categorical feature, built by
    ``embedding_factory(num_rows, dim)`` (default :func:`sparse_embedding`); any module
    that maps a LongTensor of ids of shape ``(B,)`` to ``(B, dim)`` embeddings will do.
    """

    def __init__(self, config: DLRMConfig, *, embedding_factory: EmbeddingFactory | None = None):
        super().__init__()
        self.config = config
        factory = embedding_factory or sparse_embedding
        dim = config.embedding_dim
        self.bottom = _mlp((config.num_dense, *config.bottom_mlp, dim), relu_last=config.bottom_relu_last)
        self.tables = nn.ModuleList(factory(rows, dim) for rows in config.table_sizes)
        self.top = _mlp((dim + config.num_interactions, *config.top_mlp, 1), relu_last=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        if dense.dim() != 2 or sparse.dim() != 2 or sparse.shape != (dense.shape[0], len(self.tables)):
            raise ValueError(f"DLRM needs dense (B, {self.config.num_dense}) and sparse (B, {len(self.tables)}); "
                             f"got {tuple(dense.shape)} and {tuple(sparse.shape)}")
        bottom = self.bottom(dense)
        vectors = torch.stack([bottom, *(table(sparse[:, index]) for index, table in enumerate(self.tables))], dim=1)
        products = torch.bmm(vectors, vectors.transpose(1, 2))                       # (B, T+1, T+1)
        rows, cols = torch.tril_indices(vectors.shape[1], vectors.shape[1], offset=-1, device=products.device)
        return self.top(torch.cat([bottom, products[:, rows, cols]], dim=1)).squeeze(1)


def build_dlrm(config: DLRMConfig, *, seed: int | None = None,
               embedding_factory: EmbeddingFactory | None = None) -> DLRM:
    """A DLRM; ``seed`` fixes its initial weights (tables included, when the factory
    draws them from torch's global generator)."""
    if seed is not None:
        torch.manual_seed(seed)
    return DLRM(config, embedding_factory=embedding_factory)


def click_loss(logits: torch.Tensor, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy of ``logits`` against ``batch["click"]`` (0/1 floats)."""
    check_choice("reduction", reduction, ("mean", "sum"))
    return F.binary_cross_entropy_with_logits(logits, batch["click"].to(logits.dtype), reduction=reduction)
