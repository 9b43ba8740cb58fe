"""Batches of any structure: tensors, tuples, lists, dicts (a transformers
``BatchEncoding`` included) and objects with ``.to()``, nested.

Pure functions over that structure: move it to a device, count its samples, and cut
it into micro-batches along the first dimension of every tensor in it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def move_to(batch: Any, device: torch.device | str, *, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor in it on ``device``; other leaves unchanged. An
    object that is not a container but has ``.to()`` (a custom batch class) is moved
    by calling it."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return _rebuild(batch, {key: move_to(value, device, non_blocking=non_blocking) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):   # a namedtuple
        return type(batch)(*(move_to(value, device, non_blocking=non_blocking) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(value, device, non_blocking=non_blocking) for value in batch)
    to = getattr(batch, "to", None)
    return to(device) if callable(to) else batch


def tensors_of(batch: Any) -> list[torch.Tensor]:
    """Every tensor in ``batch``, in a fixed order (dict keys in their order)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for value in batch.values() for t in tensors_of(value)]
    if isinstance(batch, (list, tuple)):
        return [t for value in batch for t in tensors_of(value)]
    return []


def batch_len(batch: Any) -> int:
    """The number of samples in ``batch``: the first dimension of its first tensor
    (0 for a batch that holds no tensor)."""
    tensors = tensors_of(batch)
    if not tensors:
        return 0
    if tensors[0].dim() == 0:
        raise ValueError("a batch's first tensor is a scalar; batches must stack samples along dimension 0")
    return tensors[0].shape[0]


def split_batch(batch: Any, chunks: int) -> list[Any]:
    """Cut ``batch`` into at most ``chunks`` non-empty micro-batches of nearly equal
    size along dimension 0 of every tensor (``tensor_split``); non-tensor leaves are
    shared by every micro-batch."""
    count = min(chunks, batch_len(batch))
    if count <= 1:
        return [batch] if count == 1 else []
    return [_take(batch, index, count) for index in range(count)]


def _take(batch: Any, index: int, count: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.tensor_split(count)[index]
    if isinstance(batch, Mapping):
        return _rebuild(batch, {key: _take(value, index, count) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_take(value, index, count) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_take(value, index, count) for value in batch)
    return batch


def _rebuild(original: Mapping, values: dict) -> Any:
    """A mapping of ``original``'s type holding ``values`` (a plain dict where that
    type cannot be built from one)."""
    try:
        return type(original)(values)
    except TypeError:
        return values
