"""Durable server state: a parameter server's snapshot, written atomically.

A snapshot holds everything a restarted server needs to carry on as if it had never
died: every key slice (value, optimizer state, clocks, a sync round's queued pushes),
the job's mode, optimizer and compression, which workers said goodbye, and per
worker session the last push applied (so a push resent after a restart is
acknowledged, not applied twice). It is written with
:func:`paratrain.atomic.save_torch_atomic` (temp file, fsync, rename), so a kill at
any instant leaves the previous snapshot loadable, and it holds only tensors and
plain values (``torch.load(..., weights_only=True)``).
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from paratrain.errors import ConfigError
from paratrain.ps import row_sparse
from paratrain.ps.policies import SliceState
from paratrain.atomic import save_torch_atomic


@dataclass(frozen=True)
class SnapshotConfig:
    """Where a server snapshots, and after at most how many applied pushes."""

    directory: str
    every: int = 100

    def __post_init__(self) -> None:
        if not self.directory:
            raise ConfigError("snapshot directory='' : give a folder for the servers' snapshots")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"snapshot every={self.every!r} must be an integer >= 1 (pushes)")


def snapshot_path(directory: str | os.PathLike, server_rank: int) -> Path:
    return Path(directory) / f"server{server_rank}.pt"


def slice_to_dict(state: SliceState) -> dict:
    """One key slice as plain values (saved at once, so no copies are needed)."""
    saved = {"value": state.value, "full_shape": list(state.full_shape), "offset": state.offset,
             "num_workers": state.num_workers, "optimizer_state": dict(state.optimizer_state),
             "pushes": list(state.pushes), "applied_rounds": state.applied_rounds,
             "late_dropped": state.late_dropped}
    if state.row_sparse:   # a row range: its kind, lr_mult, and queued RowGradients as tensors
        return {**saved, **row_sparse.row_fields(state)}
    return {**saved, "pending": [[(grad, scale) for grad, scale in queue] for queue in state.pending]}


def slice_from_dict(saved: dict) -> SliceState:
    if saved.get("row_sparse"):
        return row_sparse.row_slice_from_dict(saved)
    state = SliceState(value=saved["value"], full_shape=tuple(saved["full_shape"]), offset=saved["offset"],
                       num_workers=saved["num_workers"], optimizer_state=dict(saved["optimizer_state"]))
    state.pushes = list(saved["pushes"])
    state.applied_rounds = saved["applied_rounds"]
    state.late_dropped = saved.get("late_dropped", 0)
    state.pending = [deque((grad, float(scale)) for grad, scale in queue) for queue in saved["pending"]]
    return state


def save_snapshot(state: dict, directory: str | os.PathLike, server_rank: int) -> Path:
    """Write ``state`` atomically; returns the file."""
    path = snapshot_path(directory, server_rank)
    save_torch_atomic(state, path)
    return path


def load_snapshot(directory: str | os.PathLike, server_rank: int) -> dict | None:
    """The last snapshot of ``server_rank``, or None when it never wrote one."""
    path = snapshot_path(directory, server_rank)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


#: Server counters that survive a restart.
DURABLE_STATS = ("pushes", "acknowledged_pushes", "duplicate_pushes", "rejoins", "snapshots")


def snapshot_state(server) -> dict:
    """Everything a :class:`~paratrain.ps.parameter_server.ParameterServer` must keep, as plain values."""
    return {
        "keys": {key: slice_to_dict(state) for key, state in server.keys.items()},
        "dtypes": {key: str(dtype).removeprefix("torch.") for key, dtype in server.dtypes.items()},
        "num_workers": server.num_workers,
        "mode": [server.terms.mode, server.terms.staleness] if server.terms else None,
        "backup_workers": server.terms.backup_workers if server.terms else 0,
        "optimizer": server.optimizer.to_spec() if server.optimizer is not None else None,
        "compression": server.compression.to_dict() if server.compression is not None else None,
        "goodbyes": sorted(server.goodbyes),
        "last_push": dict(server.last_push),
        "stats": {name: int(server.stats[name]) for name in DURABLE_STATS},
        # The counters tests and operators read: every acknowledged push is applied.
        "applied_pushes": int(server.stats["pushes"]),
        "acknowledged_pushes": int(server.stats["acknowledged_pushes"]),
        "rejoins": int(server.stats["rejoins"]),
        "late_dropped": sum(state.late_dropped for state in server.keys.values()),
    }


def restore_state(server, saved: dict) -> None:
    """Put a snapshot back into a freshly started server."""
    from paratrain.comm.codecs import parse_compression
    from paratrain.optimizers import build_server_optimizer
    from paratrain.ps.admission import JobTerms, policy_for

    server.keys = {key: slice_from_dict(state) for key, state in saved["keys"].items()}
    server.dtypes = {key: getattr(torch, name) for key, name in saved["dtypes"].items()}
    if saved["mode"] is not None:
        server.terms = JobTerms(saved["num_workers"], saved["mode"][0], int(saved["mode"][1]), saved["backup_workers"])
        server.policy = policy_for(server.terms)
    server.optimizer = build_server_optimizer(saved["optimizer"]) if saved["optimizer"] is not None else None
    server.compression = parse_compression(saved["compression"]) if saved["compression"] is not None else None
    server.goodbyes = set(saved["goodbyes"])
    for rank in server.goodbyes:
        if server.policy is not None:
            server.policy.depart(rank)
    server.last_push = dict(saved["last_push"])
    for name, value in saved["stats"].items():
        server.stats[name] = value
