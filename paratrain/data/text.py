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
file between the splits.

The training split takes whole files until ``max_train_bytes`` (the last one cut at the
cap), in one of two orders (``file_order``):

- ``"hashed"`` (default): ordered by a second, independent hash of the relative path,
  so a capped prefix is a sample of the whole library rather than of its first letters,
  and adding a file shifts no other file's place relative to the rest;
- ``"sorted"``: relative-path order (the default 2 MiB cap then ends in ``email/utils.py``).

The held-out split holds all its files (about 10% of the corpus, under 1 MB) and is
evaluated on evenly spaced windows over all of them, at most ``max_heldout_bytes`` of
targets. A prefix would be a handful of files, one of which dominates: at 128 KiB,
four to nine files with one of 100 KiB, and a held-out figure that moves by 0.15
bits per byte with which file that is.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from paratrain.errors import ConfigError, check_choice, check_positive

EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__",
    "test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip",
    "pydoc_data", "encodings",
})
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
EXCLUDED_DIR_PREFIXES = ("config-",)
HASH_BUCKETS = 100
HELDOUT_BUCKETS = 10
FILE_ORDERS = ("hashed", "sorted")
DEFAULT_MAX_TRAIN_BYTES = 2 << 20       # 2 MiB: one epoch is 511 steps of 32 windows of 128
DEFAULT_MAX_HELDOUT_BYTES = 1 << 17     # 128 KiB: at most 1024 held-out windows of 128


class ByteTextDataset(Dataset):
    """A byte string cut into non-overlapping windows for next-byte prediction.

    Window ``i`` covers bytes ``[s, s + context + 1)`` with ``s = i * window_step *
    context``; item ``i`` is ``(x, y)`` with ``x`` its first ``context`` bytes and ``y``
    the same shifted by one, both int64 of length ``context``. With ``window_step=1``
    consecutive windows share one byte, so every byte after the first is a target
    exactly once; a larger step keeps every ``window_step``-th window only.
    """

    vocab_size = 256
    task = "lm"

    def __init__(self, data: torch.Tensor, context: int, *, num_files: int = 0, window_step: int = 1) -> None:
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ConfigError(f"ByteTextDataset needs a 1-D uint8 tensor; "
                              f"got {data.dtype} of shape {tuple(data.shape)}")
        for name, value in (("context", context), ("window_step", window_step)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        self.data = data
        self.context = context
        self.num_files = num_files
        self.window_step = window_step

    @property
    def num_bytes(self) -> int:
        """Bytes held (with ``window_step > 1``, more than the windows cover)."""
        return self.data.numel()

    def __len__(self) -> int:
        if self.num_bytes < self.context + 1:
            return 0
        return (self.num_bytes - self.context - 1) // (self.window_step * self.context) + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = (index % len(self)) * self.window_step * self.context
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


def _path_hash(salt: str, relative: str) -> bytes:
    return hashlib.sha256(f"{salt}:{relative}".encode("utf-8")).digest()


def is_heldout(relative: str) -> bool:
    """Whether a file belongs to the held-out split: a fixed hash of its relative path."""
    return int.from_bytes(_path_hash("split", relative)[:8], "big") % HASH_BUCKETS < HELDOUT_BUCKETS


def order_files(files: list[SourceFile], file_order: str) -> list[SourceFile]:
    """``files`` in the order a capped split takes them (see the module docstring)."""
    check_choice("file_order", file_order, FILE_ORDERS)
    if file_order == "sorted":
        return sorted(files, key=lambda f: f.relative)
    return sorted(files, key=lambda f: (_path_hash("order", f.relative), f.relative))


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
                 max_heldout_bytes: int = DEFAULT_MAX_HELDOUT_BYTES, file_order: str = "hashed",
                 stdlib_dir: str | os.PathLike | None = None) -> tuple[ByteTextDataset, ByteTextDataset]:
    """``(train, heldout)`` byte datasets from the standard library's sources (see the
    module docstring for which files, how they are split and in which order a split
    takes them up to its cap)."""
    for name, value in (("context", context), ("max_train_bytes", max_train_bytes),
                        ("max_heldout_bytes", max_heldout_bytes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer > 0")
        check_positive(name, value)
    check_choice("file_order", file_order, FILE_ORDERS)
    root = Path(stdlib_dir) if stdlib_dir is not None else default_stdlib_dir()
    files = list_sources(root) if root.is_dir() else []
    if not files:
        raise ConfigError(f"dataset 'pytext' found no .py files under {str(root)!r} "
                          f"(sysconfig stdlib path, or stdlib_dir=)")
    ordered = order_files(files, file_order)
    data, num_files = read_capped(root, [f for f in ordered if not is_heldout(f.relative)], max_train_bytes)
    train = ByteTextDataset(data, context, num_files=num_files)
    held_files = [f for f in ordered if is_heldout(f.relative)]
    data, num_files = read_capped(root, held_files, sum(f.size for f in held_files))
    available, wanted = max(0, (data.numel() - 1) // context), max(1, max_heldout_bytes // context)
    heldout = ByteTextDataset(data, context, num_files=num_files, window_step=max(1, -(-available // wanted)))
    for split_name, dataset in (("train", train), ("heldout", heldout)):
        if len(dataset) == 0:
            raise ConfigError(f"dataset 'pytext' {split_name} split under {str(root)!r} has {dataset.num_bytes} "
                              f"bytes, too few for one window of context+1={context + 1}")
    return train, heldout
