"""MXNet's ``save_optimizer_states``/``load_optimizer_states`` for a KVStore whose
optimizer runs on the servers: each key slice's state (momentum, Adam's moments, a
row-sparse range's per-row state) comes to this worker, or goes back, in the one
tensor wire format (:mod:`paratrain.ps.state_transfer`).

The file is written atomically with ``torch.save`` and holds only tensors and plain
values (``torch.load(..., weights_only=True)`` reads it): ``{"optimizer": spec or None,
"keys": {key name: {offset: state}}}``. Call it on one worker (rank 0), at a point where
no push is in flight; load it the same way, then ``kv.barrier()``.
"""
from __future__ import annotations

import os

import torch

from paratrain.atomic import save_torch_atomic
from paratrain.errors import ConfigError, PeerError
from paratrain.ps.protocol import Op
from paratrain.ps.sharding import key_name
from paratrain.ps.state_transfer import decode_state, encode_state


class ServerOptimizerStates:
    """The part of :class:`~paratrain.kvstore.dist.DistKVStore` that moves optimizer state (a mixin)."""

    def _slices(self) -> list[tuple[str, int, int]]:
        """``(key name, server, offset)`` of every slice and row range this worker knows."""
        dense = [(key_name(key), part.server, part.start) for key, info in self._keys.items() for part in info.slices]
        rows = [(key_name(key), part.server, part.start) for key, info in self._row_keys.items()
                for part in info.ranges]
        return dense + rows

    def save_optimizer_states(self, fname: str | os.PathLike, dump_optimizer: bool = False) -> None:
        """Write every key slice's server-side optimizer state to ``fname`` (with the
        rule's spec too when ``dump_optimizer``)."""
        if self._optimizer is None:
            raise ConfigError("save_optimizer_states: no optimizer runs on the servers; call kv.set_optimizer first")
        self._check_committed("save_optimizer_states")
        slices = self._slices()
        requests = [self._connection.request(server, Op.STATE_PULL, key=name, offset=offset)
                    for name, server, offset in slices]
        replies = self._collect(requests, "save_optimizer_states")
        saved: dict[str, dict[int, dict]] = {}
        for (name, server, offset), (_, request_id) in zip(slices, requests):
            message = replies[request_id]
            if message.op != Op.STATE:
                raise PeerError(f"worker {self._rank}: server {server} answered a state pull with {message.op.name}")
            saved.setdefault(name, {})[offset] = decode_state(message.control(), message.values)
        save_torch_atomic({"optimizer": self._optimizer.to_spec() if dump_optimizer else None, "keys": saved}, fname)

    def load_optimizer_states(self, fname: str | os.PathLike) -> None:
        """Give every key slice the optimizer state ``fname`` holds for it (written by
        :meth:`save_optimizer_states` for the same keys and servers)."""
        if self._optimizer is None:
            raise ConfigError("load_optimizer_states: no optimizer runs on the servers; call kv.set_optimizer first")
        self._check_committed("load_optimizer_states")
        saved = torch.load(fname, map_location="cpu", weights_only=True)
        keys = saved.get("keys", {}) if isinstance(saved, dict) else {}
        requests = []
        for name, server, offset in self._slices():
            state = keys.get(name, {}).get(offset)
            if state is None:
                raise ConfigError(f"load_optimizer_states: {str(fname)!r} holds no state for key {name!r} at offset "
                                  f"{offset}; it was saved for other keys or another number of servers")
            description, values = encode_state(state)
            requests.append(self._connection.request(server, Op.STATE_SET, key=name, offset=offset,
                                                     payload=description, values=values))
        self._collect(requests, "load_optimizer_states")

