"""Held-out metrics for binary tasks (click prediction): pure functions on tensors.

They live in the training layer so that ``fit``'s evaluation can report them, and the
data and model layers above can use them too. Both compute in float64, so a million
samples sum without float32 drift.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from paratrain.errors import ConfigError


def _flat_pair(scores: torch.Tensor, labels: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.as_tensor(scores).detach().reshape(-1).to(torch.float64)
    labels = torch.as_tensor(labels).detach().reshape(-1).to(torch.float64)
    if scores.numel() != labels.numel():
        raise ConfigError(f"{name} and labels differ in length: {scores.numel()} vs {labels.numel()}")
    if scores.numel() == 0:
        raise ConfigError(f"{name} is empty; need at least one sample")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ConfigError("labels must be 0 or 1")
    return scores, labels


def binary_logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean Bernoulli log loss (natural log) of ``sigmoid(logits)`` against 0/1 ``labels``,
    computed from the logits so that confident predictions do not overflow."""
    logits, labels = _flat_pair(logits, labels, "logits")
    return float(F.binary_cross_entropy_with_logits(logits, labels))


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a
    random negative, ties counting one half (as ``sklearn.metrics.roc_auc_score``).

    Computed as the Mann-Whitney rank statistic with mid-ranks for tied scores, in
    O(n log n). Raises :class:`ConfigError` when only one class is present, where the
    AUC is undefined.
    """
    scores, labels = _flat_pair(scores, labels, "scores")
    num_pos = int(labels.sum())
    num_neg = labels.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ConfigError(f"roc_auc needs both classes; got {num_pos} positives and {num_neg} negatives")
    sorted_scores, order = torch.sort(scores)
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)            # 1-based rank of each tie group's last
    mid_ranks = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.repeat_interleave(mid_ranks, counts)
    positive_rank_sum = float(ranks[labels[order] == 1].sum())
    return (positive_rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)
