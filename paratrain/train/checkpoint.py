"""Atomic checkpoints: write a temporary file, fsync it, rename it over the old one.

A kill at any instant leaves either the previous checkpoint or the new one, never a
half-written file. Checkpoints hold only tensors and plain Python values, so they load
with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch

from paratrain.errors import ConfigError

SUFFIX = ".pt"


def checkpoint_path(directory: str | os.PathLike, shard: str) -> Path:
    return Path(directory) / f"{shard}{SUFFIX}"


def save_atomic(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename + dir fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)   # make the rename itself durable
    finally:
        os.close(dir_fd)


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
