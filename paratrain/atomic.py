"""The one atomic file writer: write a temporary file beside the target, fsync it,
rename it over the target, fsync the directory.

A kill at any instant leaves either the previous file or the new one, never a
half-written file. Checkpoints, parameter-server snapshots and timelines all go through
:func:`write_atomic`; it sits below every layer so that each of them can use it.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import IO, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(handle)`` on a temporary binary file in ``path``'s directory, then
    make it ``path`` atomically and durably. Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # 0o666 lets the umask decide the mode, as for any ordinary file
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
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
    return path


def save_torch_atomic(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save(state)`` to ``path`` atomically."""
    import torch
    return write_atomic(path, lambda handle: torch.save(state, handle))


def write_json_atomic(path: str | os.PathLike, payload: dict) -> Path:
    """``payload`` as compact JSON to ``path`` atomically."""
    data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    return write_atomic(path, lambda handle: handle.write(data))
