"""The one tensor wire format: dtype codes and raw bytes, never pickle.

A tensor travels as the raw bytes of its contiguous elements plus, in the message
header of whoever sends it (the parameter-server protocol, the pipeline links), a dtype
code from :data:`DTYPE_CODES` and its shape. Both ends read and write through the
functions here, so every message format agrees on what a code means.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

#: dtype -> wire code. The codes are the protocol: append new ones, never renumber.
#: Code 0 is never used, so a zeroed header is always invalid.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4,
    torch.int32: 5, torch.int64: 6, torch.uint8: 7, torch.int8: 8,
    torch.int16: 9, torch.bool: 10,
}
CODE_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
ITEMSIZES: dict[torch.dtype, int] = {dtype: torch.empty(0, dtype=dtype).element_size() for dtype in DTYPE_CODES}


def dtype_code(dtype: torch.dtype) -> int:
    """The wire code of ``dtype``; ``TypeError`` naming the allowed dtypes otherwise."""
    code = DTYPE_CODES.get(dtype)
    if code is None:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_CODES)
        raise TypeError(f"dtype {dtype} cannot travel on the wire; allowed: {allowed}")
    return code


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's elements as bytes: no copy for a contiguous CPU tensor (bfloat16
    included); a GPU tensor is copied to the host first."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


# Received frames are read-only and only ever read through view_tensor: torch's warning
# about viewing a non-writable buffer is silenced for this module's calls (once, not per
# message: a warnings.catch_warnings on every frame costs more than decoding it).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=__name__)


def view_tensor(buffer: Any, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor viewing ``buffer``'s bytes, without a copy. Read-only: never
    write to it (received frames belong to the transport)."""
    view = memoryview(buffer)
    if view.nbytes == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(view, dtype=torch.uint8).view(dtype)


def copy_tensor(buffer: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A writable tensor of ``dtype`` and ``shape`` holding a copy of ``buffer``'s bytes."""
    data = bytearray(buffer)
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)
