"""Named learning-rate schedules for the CLI (``--lr-schedule``, ``--warmup-steps``):
a linear warm-up from 0, then constant, or cosine or linear decay over the rest of the
run down to ``min_factor`` of the base rate.
From Python, give ``fit`` any ``torch.optim.lr_scheduler`` instead."""
from __future__ import annotations

import math

import torch

from paratrain.config import LR_SCHEDULES
from paratrain.errors import check_choice


def lr_factor(step: int, *, kind: str, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based); pure."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_factor + (1.0 - min_factor) * decay


def build_lr_schedule(optimizer: torch.optim.Optimizer, *, kind: str, warmup_steps: int,
                      total_steps: int, min_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor`, stepped once per optimizer step."""
    check_choice("lr_schedule", kind, LR_SCHEDULES)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps,
                                          min_factor=min_factor))
