"""Bytes on the wire: what each worker sends in one collective, by algorithm.

One home for these formulas, so that every Speedometer ``comm_MB`` figure and every
``bytes_sent`` counter (plain and compressed allreduce, local SGD, hybrid replicas,
the allreduce KVStore) counts the same way. Pure functions.

| collective | bytes one worker sends, for a buffer of ``n`` bytes on ``W`` workers |
|---|---|
| ring all_reduce | ``2 (W - 1) n / W`` |
| ring all_gather (``n`` bytes each) | ``(W - 1) n`` |
| all_to_all | ``(W - 1) n / W`` (all but its own share) |
"""
from __future__ import annotations

import torch


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """The size of ``tensor``'s elements in bytes."""
    return tensor.numel() * tensor.element_size()


def ring_allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes each worker sends in a ring allreduce of ``nbytes``: 2 (W-1)/W of it."""
    return 0 if world <= 1 else (2 * (world - 1) * nbytes) // world


def all_gather_bytes(nbytes: int, world: int) -> int:
    """Bytes each worker sends in a ring all_gather of ``nbytes`` each: W-1 times it."""
    return (world - 1) * nbytes


def all_to_all_bytes(nbytes: int, world: int) -> int:
    """Bytes each worker sends in an all_to_all of a buffer of ``nbytes``: all but its own share."""
    return (world - 1) * nbytes // world
