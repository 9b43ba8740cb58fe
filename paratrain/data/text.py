"""``pytext``: byte-level text from the ``.py`` files of Python's own standard library.

Every machine has it, nothing is downloaded, and the same Python build gives the same
corpus: files are listed recursively under ``sysconfig.get_paths()["stdlib"]`` and read
as raw bytes in sorted relative-path order.

Left out, by directory name anywhere in the path (:data:`EXCLUDED_DIRS`):

- ``site-packages``/``dist-packages``: third-party code, different on every machine;
- ``test``/``tests``, ``idlelib``, ``tkinter``, ``turtledemo``, ``lib2to3``,
  ``distutils``, ``ensurepip``: parts that Linux distributions ship as separate, optional
  packages (so a corpus with them would differ between two installs of one Python
  version); the test suites also hold deliberately malformed and non-UTF-8 files;
- ``pydoc_data`` and ``encodings``: generated data (one dump of the HTML docs as a
  string, and codec tables of escaped bytes), not code;

and files named ``_sysconfigdata*`` and anything under ``config-*`` (the build's own
settings, which differ from build to build).

The held-out split is by file: a file is held out when a hash of its relative path
falls in one of :data:`HELDOUT_BUCKETS` out of :data:`HASH_BUCKETS` buckets (about 10%).
A hash rather than every k-th file, so that adding or removing one file moves no other
file between the splits. Each split then takes its files in sorted order until its
byte cap; the last file taken is cut at the cap.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from paratrain.errors import ConfigError, check_positive

EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__",
    "test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip",
    "pydoc_data", "encodings",
})
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
EXCLUDED_DIR_PREFIXES = ("config-",)
HASH_BUCKETS = 100
HELDOUT_BUCKETS = 10
DEFAULT_MAX_TRAIN_BYTES = 1 << 20
DEFAULT_MAX_HELDOUT_BYTES = 1 << 17


class ByteTextDataset(Dataset):
    """A byte string cut into non-overlapping windows for next-byte prediction.

    Window ``i`` covers bytes ``[i * context, i * context + context + 1)``; item ``i`` is
    ``(x, y)`` with ``x`` its first ``context`` bytes and ``y`` the same shifted by one,
    both int64 of length ``context``. Consecutive windows share one byte, so every byte
    after the first is a target exactly once.
    """

    vocab_size = 256
    task = "lm"

    def __init__(self, data: torch.Tensor, context: int, *, num_files: int = 0) -> None:
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ConfigError(f"ByteTextDataset needs a 1-D uint8 tensor; got {data.dtype} of shape {tuple(data.shape)}")
        if not isinstance(context, int) or isinstance(context, bool) or context < 1:
            raise ConfigError(f"context={context!r} must be an integer >= 1")
        self.data = data
        self.context = context
        self.num_files = num_files

    @property
    def num_bytes(self) -> int:
        return self.data.numel()

    def __len__(self) -> int:
        return max(0, (self.num_bytes - 1) // self.context)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = (index % len(self)) * self.context
        window = self.data[start:start + self.context + 1].long()
        return window[:-1], window[1:]


@dataclass(frozen=True)
class SourceFile:
    """One corpus file: its path relative to the stdlib root, and its size in bytes."""

    relative: str
    size: int


def default_stdlib_dir() -> Path:
    """Where this Python's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_excluded(relative: str) -> bool:
    """Whether a ``/``-separated path relative to the stdlib root is left out of the corpus."""
    *dirs, name = relative.split("/")
    return (any(d in EXCLUDED_DIRS or d.startswith(EXCLUDED_DIR_PREFIXES) for d in dirs)
            or name.startswith(EXCLUDED_FILE_PREFIXES))


def is_heldout(relative: str) -> bool:
    """Whether a file belongs to the held-out split: a fixed hash of its relative path."""
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HASH_BUCKETS < HELDOUT_BUCKETS


def list_sources(root: Path) -> list[SourceFile]:
    """The corpus's ``.py`` files under ``root``, in sorted relative-path order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(EXCLUDED_DIR_PREFIXES)]
        for name in filenames:
            path = Path(dirpath, name)
            relative = path.relative_to(root).as_posix()
            if name.endswith(".py") and path.is_file() and not is_excluded(relative):
                found.append(SourceFile(relative, path.stat().st_size))
    return sorted(found, key=lambda f: f.relative)


def read_capped(root: Path, files: list[SourceFile], max_bytes: int) -> tuple[torch.Tensor, int]:
    """Concatenate ``files`` in order until ``max_bytes``; return the bytes and how many
    files contributed (the last one possibly cut)."""
    chunks, total = [], 0
    for source in files:
        if total >= max_bytes:
            break
        data = (root / source.relative).read_bytes()[:max_bytes - total]
        chunks.append(data)
        total += len(data)
    buffer = bytearray(b"".join(chunks))
    return torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8), len(chunks)


def build_pytext(*, context: int = 128, max_train_bytes: int = DEFAULT_MAX_TRAIN_BYTES,
                 max_heldout_bytes: int = DEFAULT_MAX_HELDOUT_BYTES,
                 stdlib_dir: str | os.PathLike | None = None) -> tuple[ByteTextDataset, ByteTextDataset]:
    """``(train, heldout)`` byte datasets from the standard library's sources (see the
    module docstring for which files and how they are split)."""
    for name, value in (("context", context), ("max_train_bytes", max_train_bytes),
                        ("max_heldout_bytes", max_heldout_bytes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer > 0")
        check_positive(name, value)
    root = Path(stdlib_dir) if stdlib_dir is not None else default_stdlib_dir()
    files = list_sources(root) if root.is_dir() else []
    if not files:
        raise ConfigError(f"dataset 'pytext' found no .py files under {str(root)!r} "
                          f"(sysconfig stdlib path, or stdlib_dir=)")
    splits = []
    for split_name, cap, wanted in (("train", max_train_bytes, False), ("heldout", max_heldout_bytes, True)):
        data, num_files = read_capped(root, [f for f in files if is_heldout(f.relative) is wanted], cap)
        dataset = ByteTextDataset(data, context, num_files=num_files)
        if len(dataset) == 0:
            raise ConfigError(f"dataset 'pytext' {split_name} split under {str(root)!r} has {data.numel()} bytes, "
                              f"too few for one window of context+1={context + 1}")
        splits.append(dataset)
    return splits[0], splits[1]
