"""Checkpoints, written with the one atomic writer (:mod:`paratrain.atomic`).

A kill at any instant leaves either the previous checkpoint or the new one, never a
half-written file. Checkpoints hold only tensors and plain Python values, so they load
with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from paratrain.errors import ConfigError

SUFFIX = ".pt"


def checkpoint_path(directory: str | os.PathLike, shard: str) -> Path:
    return Path(directory) / f"{shard}{SUFFIX}"


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Random states of torch and Python, as weights_only-loadable values."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
