"""Checkpoint files: written with the one atomic writer (:mod:`paratrain.atomic`),
sealed with a content hash, kept K deep, and named by the run that wrote them.

A shard (``model``, ``stage1``) is a folder's ``<shard>.json`` manifest plus the files
it lists, newest first: ``<shard>-<step>.pt``, each a ``torch.save`` of plain values
(``torch.load(..., weights_only=True)``). Each entry records the file's sha256 and
size, the step, and the identity of the run that wrote it (:class:`RunIdentity`: a
hash of its options, minus those that may change on resume, and the job's run id).

A save writes the new file (atomically), then the manifest (atomically), then deletes
what the manifest no longer lists; a kill at any instant leaves a manifest whose every
entry is complete. A load checks the size and the hash before it unpickles anything:
a file changed after it was written (a bad disk, a stray write) is named in one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from paratrain.atomic import write_atomic, write_json_atomic
from paratrain.errors import ConfigError

SUFFIX = ".pt"
MANIFEST_SUFFIX = ".json"
FORMAT = 2
DEFAULT_KEEP = 2
_CHUNK = 1 << 20


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used, in one line naming the file and the reason."""


@dataclass(frozen=True)
class RunIdentity:
    """Which run a checkpoint belongs to: ``run_id`` (the same in every incarnation of
    the job) and ``options`` (what must be equal to resume it; plain JSON values)."""

    run_id: str
    options: dict = field(default_factory=dict)

    @property
    def options_hash(self) -> str:
        """sha256 of the options as canonical JSON."""
        text = json.dumps(self.options, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def differences(self, saved_options: dict) -> list[str]:
        """``"--lr 0.05 there, 0.3 here"`` for each option that differs from ``saved_options``."""
        names = sorted(set(self.options) | set(saved_options))
        return [f"--{name.replace('_', '-')} {_show(saved_options.get(name))} there, {_show(self.options.get(name))} "
                f"here" for name in names if saved_options.get(name) != self.options.get(name)]


def _show(value: Any) -> str:
    return "unset" if value is None else str(value)


@dataclass(frozen=True)
class Entry:
    """One checkpoint file of a shard, as its manifest lists it."""

    file: str
    sha256: str
    size: int
    step: int
    run_id: str
    options_hash: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Manifest:
    """A shard's checkpoints, newest first, and the options of the run that wrote the newest."""

    shard: str
    entries: tuple[Entry, ...] = ()
    options: dict = field(default_factory=dict)


def checkpoint_path(directory: str | os.PathLike, shard: str) -> Path:
    """The manifest of ``shard`` in ``directory``."""
    return Path(directory) / f"{shard}{MANIFEST_SUFFIX}"


def manifest_shards(directory: str | os.PathLike | None) -> list[str]:
    """The shards that have a manifest in ``directory`` (none when it does not exist)."""
    if not directory or not Path(directory).is_dir():
        return []
    return sorted(path.stem for path in Path(directory).glob(f"*{MANIFEST_SUFFIX}"))


def has_checkpoint(directory: str | os.PathLike | None) -> bool:
    """Whether ``directory`` holds a checkpoint (a manifest, or a file of the older,
    unsealed format)."""
    return bool(manifest_shards(directory)) or bool(directory and Path(directory).is_dir()
                                                    and any(Path(directory).glob(f"*{SUFFIX}")))


def read_manifest(directory: str | os.PathLike, shard: str) -> Manifest:
    """The manifest of ``shard`` (empty when there is none); CheckpointError when it is
    not one paratrain wrote."""
    path = checkpoint_path(directory, shard)
    if not path.is_file():
        legacy = Path(directory) / f"{shard}{SUFFIX}"
        if legacy.is_file():
            raise CheckpointError(f"checkpoint {legacy}: written by an older paratrain without a content hash "
                                  f"({shard}{MANIFEST_SUFFIX} is missing); it cannot be verified, so it is not loaded")
        return Manifest(shard)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT or data.get("shard") != shard:
            raise ValueError(f"format {data.get('format')!r}, shard {data.get('shard')!r}")
        entries = tuple(Entry(**entry) for entry in data["entries"])
        return Manifest(shard, entries, dict(data.get("options") or {}))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint manifest {path} is damaged or not paratrain's "
                              f"({type(exc).__name__}: {exc})") from None


class _Hashing:
    """A write-only file that hashes what goes through it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return self._handle.write(view)

    def flush(self) -> None:
        self._handle.flush()


def save_checkpoint(state: dict, directory: str | os.PathLike, shard: str, *, step: int, identity: RunIdentity,
                    keep: int = DEFAULT_KEEP) -> Path:
    """Write ``state`` as the newest checkpoint of ``shard``; keep the ``keep`` newest.
    Returns the file written."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"keep_checkpoints={keep!r} must be an integer >= 1")
    directory = Path(directory)
    name = f"{shard}-{step:010d}{SUFFIX}"
    hashing: list[_Hashing] = []

    def write(handle: IO[bytes]) -> None:
        hashing.append(_Hashing(handle))
        torch.save(state, hashing[-1])

    path = write_atomic(directory / name, write)
    try:
        previous = read_manifest(directory, shard).entries
    except CheckpointError:
        previous = ()   # a damaged manifest is replaced; its files are swept below
    entry = Entry(name, hashing[-1].digest.hexdigest(), hashing[-1].size, step, identity.run_id,
                  identity.options_hash)
    entries = [entry] + [old for old in previous if old.file != name][:keep - 1]
    write_json_atomic(checkpoint_path(directory, shard),
                      {"format": FORMAT, "shard": shard, "options": identity.options,
                       "entries": [e.to_dict() for e in entries]})
    _sweep(directory, shard, {e.file for e in entries})
    return path


def _sweep(directory: Path, shard: str, listed: set[str]) -> None:
    """Delete this shard's files the manifest no longer lists: older ones, one a kill
    left between writing it and listing it, and temporary files of writes a kill cut
    short (one process writes a shard, and its own write is done)."""
    pattern = re.compile(rf"\.?{re.escape(shard)}-\d+{re.escape(SUFFIX)}(\.[0-9a-f]+\.tmp)?|"
                         rf"\.{re.escape(shard)}{re.escape(MANIFEST_SUFFIX)}\.[0-9a-f]+\.tmp")
    for path in directory.iterdir():
        if pattern.fullmatch(path.name) and path.name not in listed:
            path.unlink(missing_ok=True)


def verify(directory: str | os.PathLike, entry: Entry) -> None:
    """CheckpointError unless ``entry``'s file has the size and sha256 it was written with."""
    path = Path(directory) / entry.file
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror})") from None
    if size != entry.size:
        raise CheckpointError(f"checkpoint {path} is {size} bytes, but {entry.size} were written (truncated or "
                              f"overwritten)")
    if digest.hexdigest() != entry.sha256:
        raise CheckpointError(f"checkpoint {path} does not match its sha256 (changed after it was written: "
                              f"corrupt)")


@dataclass(frozen=True)
class Choice:
    """The checkpoint a run resumes from: its step, each shard's entry at that step, and
    one line for each newer one that was passed over because it is damaged."""

    step: int
    entries: dict
    skipped: tuple[str, ...] = ()


def choose_checkpoint(directory: str | os.PathLike, identity: RunIdentity, *, adopt: bool,
                      restarting: bool) -> Choice | None:
    """The newest step at which every shard has a verified checkpoint of this run
    (``identity.run_id``) or, with ``adopt``, of any run with the same options. None
    when there is none. A damaged newest one is passed over (and named in
    ``skipped``) only when the job is ``restarting`` by itself; otherwise it is a
    CheckpointError, as is finding nothing but damaged ones."""
    def usable(entry: Entry) -> bool:
        return entry.run_id == identity.run_id or (adopt and entry.options_hash == identity.options_hash)

    by_shard = {}
    for shard in manifest_shards(directory):
        steps = {entry.step: entry for entry in read_manifest(directory, shard).entries if usable(entry)}
        if steps:
            by_shard[shard] = steps
    if not by_shard:
        return None
    skipped: list[str] = []
    for step in sorted(set.intersection(*(set(steps) for steps in by_shard.values())), reverse=True):
        try:
            for steps in by_shard.values():
                verify(directory, steps[step])
        except CheckpointError as exc:
            if not restarting:
                raise
            skipped.append(str(exc))
            continue
        return Choice(step, {shard: steps[step] for shard, steps in by_shard.items()}, tuple(skipped))
    raise CheckpointError(f"no usable checkpoint in {directory}: " + ("; ".join(skipped) or
                                                                     "its shards share no step"))


def check_directory(directory: str | os.PathLike | None, identity: RunIdentity, *, resume: bool) -> None:
    """Before a run starts. Without ``resume``: refuse a folder holding another run's
    checkpoints. With it: refuse unless a checkpoint with the same options loads (its
    hash verified). One line (CheckpointError) naming the folder and the differences."""
    if not directory:
        return
    legacy = sorted(str(path) for path in Path(directory).glob(f"*{SUFFIX}")
                    if not re.fullmatch(rf".+-\d+{re.escape(SUFFIX)}", path.name)) if Path(directory).is_dir() else []
    if legacy:
        raise CheckpointError(f"--checkpoint-dir {directory} holds {legacy[0]}, written by an older paratrain without "
                              f"a content hash: it cannot be verified; move it away or use another folder")
    shards = manifest_shards(directory)
    newest = max((read_manifest(directory, shard) for shard in shards),
                 key=lambda m: m.entries[0].step if m.entries else -1, default=None)
    if newest is None or not newest.entries:
        if resume:
            raise CheckpointError(f"--resume: no checkpoint in --checkpoint-dir {directory!r}")
        return
    other = [entry for entry in newest.entries if entry.run_id != identity.run_id]
    if not resume:
        if other:
            differences = "; ".join(identity.differences(newest.options)) or "the same options"
            raise CheckpointError(f"--checkpoint-dir {directory} holds run {other[0].run_id}'s checkpoint (step "
                                  f"{other[0].step}; {differences}): give --resume to continue it, or another "
                                  f"--checkpoint-dir")
        return
    if choose_checkpoint(directory, identity, adopt=True, restarting=False) is None:
        differences = "; ".join(identity.differences(newest.options)) or "another layout"
        raise CheckpointError(f"--resume: the checkpoint in {directory} (step {newest.entries[0].step}) was written "
                              f"with other options ({differences}); resume with the same ones")


def load_entry(directory: str | os.PathLike, entry: Entry) -> dict:
    """The state in ``entry``'s file, verified first (CheckpointError naming the file)."""
    verify(directory, entry)
    return load_checkpoint(Path(directory) / entry.file)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file safely (``weights_only=True``); CheckpointError in one
    line for a missing file or one torch cannot read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # torch raises many kinds for a damaged or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint")
    return state


def rng_state() -> dict:
    """Random states of torch and Python, as weights_only-loadable values."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
