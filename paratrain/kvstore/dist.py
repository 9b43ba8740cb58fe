"""``dist_sync``, ``dist_async``, ``dist_ssp``: the worker side of the parameter server.

A worker cuts every key into slices with :func:`paratrain.ps.sharding.plan_key` and
sends one request per slice through its :class:`~paratrain.kvstore.server_connection.
ServerConnection` (request ids, reply matching, restart recovery). Requests never
block; replies are matched by request id when a handle is waited on. A pull first
collects the acknowledgements of this worker's earlier pushes of the same key (they
arrive first, as each connection keeps order), so errors of a push that nobody waited
for still surface.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from paratrain.comm import codecs
from paratrain.comm.heartbeat import HeartbeatSender, heartbeat_key
from paratrain.comm.wire import dtype_code, tensor_bytes
from paratrain.env import DistEnv, read_env
from paratrain.errors import CommTimeout, ConfigError, PeerError, check_choice
from paratrain.kvstore.base import (Handle, Key, ServerKVStore, TensorOrList, check_key, copy_out, init_value, per_key,
                                    sum_values)
from paratrain.kvstore.row_sparse import RowSparseKeys, _RowKeyInfo, is_sparse
from paratrain.kvstore.server_connection import Request, ServerConnection
from paratrain.kvstore.server_state import ServerOptimizerStates
from paratrain.optimizers import build_server_optimizer, import_optimizer_plugins
from paratrain.ps import protocol
from paratrain.ps.optimizer import ServerOptimizer
from paratrain.ps.protocol import Op
from paratrain.ps.sharding import DEFAULT_BIGARRAY_BOUND, KeySlice, key_name, plan_key
from paratrain.strategies import SERVER_KVSTORE_TYPES

#: Extra seconds a worker waits beyond the servers' timeout, so that the server's
#: error (which names the missing workers) arrives before the worker gives up.
REPLY_MARGIN_S = 10.0
#: Codecs whose payload the servers can decode one slice at a time.
PS_CODECS = ("none", "fp16", "bf16", "2bit", "topk", "1bit")


@dataclass(frozen=True)
class DistKVStoreConfig:
    """Options of a parameter-server KVStore."""

    mode: str = "dist_sync"
    staleness: int = 2
    bigarray_bound: int = DEFAULT_BIGARRAY_BOUND
    transport: str = "zmq"
    backup_workers: int = 0     # dist_sync: apply a round once N - b workers pushed it

    def __post_init__(self) -> None:
        check_choice("kvstore", self.mode, SERVER_KVSTORE_TYPES)
        if isinstance(self.backup_workers, bool) or not isinstance(self.backup_workers, int) \
                or self.backup_workers < 0:
            raise ConfigError(f"backup_workers={self.backup_workers!r} must be an int >= 0")
        if self.backup_workers and self.mode != "dist_sync":
            raise ConfigError(f"backup_workers={self.backup_workers} applies to dist_sync only, not {self.mode!r}")
        if isinstance(self.staleness, bool) or not isinstance(self.staleness, int) or self.staleness < 0:
            raise ConfigError(f"staleness={self.staleness!r} must be an int >= 0")
        if isinstance(self.bigarray_bound, bool) or not isinstance(self.bigarray_bound, int) \
                or self.bigarray_bound < 1:
            raise ConfigError(f"bigarray_bound={self.bigarray_bound!r} must be an int >= 1 (elements)")


@dataclass
class _KeyInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    slices: list[KeySlice]
    unacked: list[Request] = field(default_factory=list)   # pushes not yet acknowledged
    codec_states: dict[int, codecs.CodecState] = field(default_factory=dict)


class DistKVStore(RowSparseKeys, ServerOptimizerStates, ServerKVStore):
    """A KVStore whose values live on parameter servers (row-sparse keys too:
    :mod:`paratrain.kvstore.row_sparse`).

    ``push_scale`` multiplies every pushed value on the server before it is summed
    (the Trainer sets it to 1 / global batch); ``last_min_clock[key]`` is the slowest
    worker's push count the servers reported with the last pull (instrumentation).
    """

    capabilities = frozenset({"broadcast", "pushpull", "optimizer", "row_sparse", "gradient_compression",
                              "optimizer_states"})

    def __init__(self, config: DistKVStoreConfig, *, rank: int, num_workers: int,
                 addresses: Sequence[str], secret: str, timeout_s: float = 60.0, rejoin: bool = False,
                 store=None):
        if not addresses:
            raise ConfigError(f"kvstore {config.mode!r} needs parameter servers; start the job with "
                              f"--servers M (M >= 1)")
        if not 0 <= rank < num_workers:
            raise ConfigError(f"rank={rank} must be in [0, num_workers={num_workers})")
        if config.backup_workers >= num_workers:
            raise ConfigError(f"backup_workers={config.backup_workers} must be < num_workers={num_workers}")
        self.config = config
        self.type = config.mode
        self._rank, self._num_workers = rank, num_workers
        self._timeout_s = timeout_s
        # A worker restarted alone into a running async job: the servers keep their
        # trained values (its init does not overwrite them) and it meets nobody at a
        # barrier, since the others passed theirs long ago.
        self._rejoin = rejoin
        self._keys: dict[Key, _KeyInfo] = {}
        self._row_keys: dict = {}              # row-sparse keys (RowSparseKeys)
        self._optimizer: ServerOptimizer | None = None
        self._compression = codecs.CompressionConfig()
        self._barriers = 0
        self._bytes_sent = 0
        self._closed = False
        self.push_scale = 1.0
        self._deferred: dict[int, int] = {}     # server -> pushes waiting for commit(scale)
        self.last_min_clock: dict[Key, int] = {}
        # Servers tell a dead worker from a slow one by its heartbeat in the store.
        self._heartbeat = HeartbeatSender(store, heartbeat_key(rank)).start() if store is not None else None
        # The session names this worker process, so a server drops a push resent after
        # its restart that it already applied.
        hello = {"rank": rank, "num_workers": num_workers, "mode": self.type, "staleness": config.staleness,
                 "rejoin": rejoin, "session": secrets.token_hex(8), "backup_workers": config.backup_workers}
        self._connection = ServerConnection(rank=rank, addresses=addresses, transport=config.transport,
                                            secret=secret, hello=hello, timeout_s=timeout_s, store=store)

    # -- KVStore API --------------------------------------------------------------------

    @property
    def num_servers(self) -> int:
        return self._connection.num_servers

    @property
    def reconnects(self) -> int:
        """How often this worker reconnected to a restarted server."""
        return self._connection.reconnects

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent

    @per_key("value")
    def init(self, key: Key, value: TensorOrList, *, initializer=None, lr_mult: float = 1.0) -> None:
        """Every worker calls it; the servers keep rank 0's value. Blocks until rank 0
        has initialized the key on every server. An empty sparse COO ``(rows, dim)``
        value declares a row-sparse key whose rows the servers make from
        ``initializer`` (a :class:`~paratrain.ps.row_init.RowInitializer` spec) and
        update with their rule's learning rate times ``lr_mult``."""
        check_key(key)
        value = init_value(key, value)
        self._check_committed(f"init of key {key!r}")
        if key in self._keys or key in self._row_keys:
            raise ConfigError(f"key {key!r} is already initialized")
        if is_sparse(value):
            self._init_rows(key, value, initializer, lr_mult)
            return
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"init value for key {key!r} must be a float tensor, got {type(value).__name__}")
        dtype_code(value.dtype)
        flat = to_host(value.detach().reshape(-1))
        info = _KeyInfo(tuple(value.shape), value.dtype,
                        plan_key(key, flat.numel(), self.num_servers, self.config.bigarray_bound))
        if flat.numel() == 0:
            raise ConfigError(f"key {key!r} has no elements")
        self._check_message_size(key, info)
        requests = [self._send(part.server, Op.INIT, key, info, part, flat[part.start:part.stop])
                    for part in info.slices]
        self._collect(requests, f"init of key {key!r}")
        self._keys[key] = info

    def _check_message_size(self, key: Key, info: _KeyInfo) -> None:
        """A slice larger than its server accepts would only drop the connection:
        refuse the key, naming the limit and the ways out."""
        itemsize = torch.empty(0, dtype=info.dtype).element_size()
        for part in info.slices:
            limit = self._connection.max_message_bytes[part.server]
            if part.length * itemsize > limit:
                raise ConfigError(f"key {key!r}: its slice on server {part.server} is {part.length * itemsize} "
                                  f"bytes, more than the {limit} bytes a message to that server may have; start the "
                                  f"servers with a larger PARATRAIN_MAX_MESSAGE_MB (paratrain train sets it from "
                                  f"the model), or use more servers (keys above bigarray_bound elements are "
                                  f"split across them)")

    @per_key("value")
    def push(self, key: Key, value: TensorOrList, priority: int = 0, *, defer_scale: bool = False) -> Handle:
        """Send ``value`` (a list is summed first) to the key's servers; does not block.
        A row-sparse key takes sparse COO gradients. ``defer_scale``: see :meth:`commit`."""
        if key in self._row_keys:
            return self._push_rows(key, value, defer_scale)
        info = self._info(key)
        requests = self._push_requests(key, info, value, pull_after=False, defer_scale=defer_scale)
        with self._connection.lock:
            info.unacked.extend(requests)
        return Handle(lambda timeout: self._collect_acks(info, requests, timeout), f"push of key {key!r}")

    def _push_requests(self, key: Key, info: _KeyInfo, value: TensorOrList, pull_after: bool,
                       defer_scale: bool = False) -> list:
        if not defer_scale:
            self._check_committed(f"push of key {key!r}")
        total = sum_values(value)
        if tuple(total.shape) != info.shape:
            raise ConfigError(f"push to key {key!r}: shape {tuple(total.shape)}, the key holds {info.shape}")
        if self._optimizer is None and self.type != "dist_sync":
            raise ConfigError(f"{self.type} applies pushes on the servers as they arrive and needs a server "
                              f"optimizer: call kv.set_optimizer(...) before pushing")
        flat = to_host(total.detach().to(dtype=info.dtype).reshape(-1))
        flags = (protocol.STATUS_PULL_AFTER if pull_after else 0) | (protocol.STATUS_DEFERRED if defer_scale else 0)
        with self._connection.lock:
            if defer_scale:
                for part in info.slices:
                    self._deferred[part.server] = self._deferred.get(part.server, 0) + 1
            return [self._send_push(key, info, part, flat[part.start:part.stop], flags) for part in info.slices]

    def commit(self, scale: float, *, lr: float | None = None) -> Handle:
        """Give the servers the scale of the pushes sent with ``defer_scale=True``
        since the last commit (pushes from backward hooks, sent before the batch
        size was known); they apply them now, in order, and answer their pulls.
        ``lr``: the learning rate the servers' rule uses for them (default: the
        rule's own). Until then this worker may only send more deferred pushes (or close)."""
        payload = protocol.encode_json({"lr": lr}) if lr is not None else None
        with self._connection.lock:
            deferred, self._deferred = self._deferred, {}
            requests = [self._connection.request(server, Op.COMMIT, scale=scale, clock=count, payload=payload)
                        for server, count in sorted(deferred.items())]
        return Handle(lambda timeout: self._collect(requests, "commit", timeout), "commit of deferred pushes")

    def _check_committed(self, what: str) -> None:
        if self._deferred:
            raise ConfigError(f"{what}: {sum(self._deferred.values())} push(es) sent with defer_scale=True wait "
                              f"for kv.commit(scale); commit them first")

    @per_key("value", "out")
    def pushpull(self, key: Key, value: TensorOrList, out: TensorOrList | None = None,
                 priority: int = 0, block: bool = True, *, defer_scale: bool = False) -> Handle:
        """Push then pull in one round trip per slice: each push asks its server to
        answer with the value, as a pull sent right after it would see it.
        ``defer_scale``: see :meth:`commit` (then ``block`` must be False)."""
        info = self._info(key)
        if defer_scale and block:
            raise ConfigError("pushpull(defer_scale=True) cannot block: its reply comes after kv.commit(scale)")
        requests = self._push_requests(key, info, value, pull_after=True, defer_scale=defer_scale)
        out = value if out is None else out
        handle = Handle(lambda timeout: self._finish_pull(key, info, requests, out, timeout),
                        f"pushpull of key {key!r}")
        if block:
            handle.wait(self._timeout_s + REPLY_MARGIN_S)
        return handle

    @per_key("out")
    def pull(self, key: Key, out: TensorOrList, priority: int = 0, block: bool = True) -> Handle:
        """Read the key into ``out``; sees every push this worker made before."""
        info = self._info(key)
        self._check_committed(f"pull of key {key!r}")
        requests = [self._send(part.server, Op.PULL, key, info, part) for part in info.slices]
        handle = Handle(lambda timeout: self._finish_pull(key, info, requests, out, timeout),
                        f"pull of key {key!r} from server(s) {sorted({p.server for p in info.slices})}")
        if block:
            handle.wait(self._timeout_s + REPLY_MARGIN_S)
        return handle

    def set_optimizer(self, optimizer: Any) -> None:
        """Run ``optimizer`` (a spec dict, a name, or a ServerOptimizer) on the
        servers. Every worker calls it; rank 0's is sent, then all meet at a barrier.
        The servers accept it once, before any push was applied, or when it repeats
        what they run (a rank 0 that rejoins sends it again and waits for nobody); a
        job's configuration may fix it at their start-up."""
        built = build_server_optimizer(optimizer)
        self._check_committed("set_optimizer")
        if self._rank == 0:
            self._collect(self._connection.request_all(Op.SET_OPTIMIZER, payload=protocol.encode_json(built.to_spec())),
                          "set_optimizer")
        if not self._rejoin:   # the others passed this barrier long ago
            self.barrier()
        self._optimizer = built

    def set_gradient_compression(self, compression: dict | str | None) -> None:
        """Compress pushes (``fp16``, ``bf16``, ``2bit``, ``1bit``, ``topk``); each worker keeps
        its own error-feedback residual per key slice. Rank 0 tells the servers (on
        the terms of :meth:`set_optimizer`)."""
        config = codecs.parse_compression(compression)
        check_choice("compression type for a parameter server", config.type, PS_CODECS)
        if self._rank == 0:
            self._collect(self._connection.request_all(Op.SET_COMPRESSION, payload=protocol.encode_json(config.to_dict())),
                          "set_gradient_compression")
        if not self._rejoin:
            self.barrier()
        self._compression = config
        for info in self._keys.values():
            info.codec_states.clear()

    def _set_updater(self, updater: Any) -> None:
        """MXNet's ``kv._set_updater``: the servers never run code sent over the wire, so
        an update rule reaches them by name: register it (``register_optimizer(name,
        server=Rule)``, or :func:`paratrain.optimizers.updater_rule` for a function) in
        a module named in ``PARATRAIN_SERVER_IMPORTS``; here give the name, a spec or
        the rule, as to :meth:`set_optimizer`."""
        if callable(updater) and not isinstance(updater, (str, dict, ServerOptimizer, type)):
            raise ConfigError("dist_* servers never unpickle code, so a Python updater function cannot reach them; "
                              "register it in a module named in PARATRAIN_SERVER_IMPORTS with "
                              "register_optimizer('name', server=paratrain.optimizers.updater_rule(fn)) and call "
                              "kv._set_updater('name') (or kv.set_optimizer('name'))")
        self.set_optimizer(updater)

    def depart(self) -> None:
        """This worker pushes no more: the servers stop waiting for it (dist_ssp bounds,
        backup workers), while it may still pull (held-out evaluation of tables that
        live there) until :meth:`close` says goodbye."""
        self._check_committed("depart")
        self._collect(self._connection.request_all(Op.DEPART), "depart")

    def barrier(self) -> None:
        """Block until every worker reached its same-numbered barrier (on server 0)."""
        self._check_committed("barrier")
        self._barriers += 1
        self._collect([self._connection.request(0, Op.BARRIER, clock=self._barriers)], f"barrier {self._barriers}")

    def close(self) -> None:
        """Say goodbye to every server (they exit when all workers did)."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.stop()
        try:
            self._collect(self._connection.request_all(Op.GOODBYE), "goodbye", timeout_s=min(5.0, self._timeout_s))
        except (CommTimeout, PeerError):
            pass  # a server that is already gone needs no goodbye
        finally:
            self._connection.close()

    # -- requests -----------------------------------------------------------------------

    def _info(self, key: Key) -> _KeyInfo:
        check_key(key)
        if key in self._row_keys:
            raise ConfigError(f"key {key!r} is row-sparse: push sparse COO gradients and read its rows with "
                              f"kv.row_sparse_pull({key!r}, out=..., row_ids=...)")
        if key not in self._keys:
            raise ConfigError(f"key {key!r} is not initialized on this worker; call kv.init({key!r}, value) first")
        return self._keys[key]

    def _send(self, server: int, op: Op, key: Key, info: _KeyInfo, part: KeySlice,
              values: torch.Tensor | None = None, *, scale: float = 1.0, status: int = 0) -> Request:
        payload = None if values is None else tensor_bytes(values)
        dtype = info.dtype if values is None else values.dtype
        frames = protocol.encode(op, key=key_name(key), request_id=self._connection.next_id(), dtype=dtype,
                                 shape=info.shape, offset=part.start, length=part.length if values is None
                                 else values.numel(), scale=scale, status=status, payload=payload)
        if payload is not None:
            self._bytes_sent += payload.nbytes
        return self._connection.send(server, frames)

    def _send_push(self, key: Key, info: _KeyInfo, part: KeySlice, values: torch.Tensor,
                   flags: int) -> Request:
        if not self._compression.enabled:
            return self._send(part.server, Op.PUSH, key, info, part, values, scale=self.push_scale, status=flags)
        payload, info.codec_states[part.start] = codecs.encode(
            self._compression, values, info.codec_states.get(part.start))
        return self._send(part.server, Op.PUSH, key, info, part, payload[0].reshape(-1).contiguous(),
                          scale=self.push_scale, status=flags | protocol.STATUS_COMPRESSED)

    def _collect(self, requests: list[Request], what: str, timeout_s: float | None = None) -> dict:
        """Wait for the replies to ``requests`` (default limit: the servers' timeout plus
        :data:`REPLY_MARGIN_S`, so their error naming the missing workers comes first)."""
        return self._connection.collect(requests, what, self._timeout_s + REPLY_MARGIN_S
                                        if timeout_s is None else timeout_s)

    def _collect_acks(self, info: _KeyInfo | _RowKeyInfo, requests: list[Request], timeout: float | None) -> None:
        """Wait for the acknowledgements of ``requests`` (a dense or a row-sparse key's pushes)."""
        with self._connection.lock:
            pending = [r for r in requests if r in info.unacked]
            for request in pending:
                info.unacked.remove(request)
            self._collect(pending, "push", timeout)

    def _finish_pull(self, key: Key, info: _KeyInfo, requests: list[Request], out: TensorOrList,
                     timeout: float | None) -> None:
        with self._connection.lock:
            if self._deferred:   # replies to deferred pushes come after the commit only
                self._check_committed(f"waiting for key {key!r}")
            acks, info.unacked = info.unacked, []
            self._collect(acks, f"push of key {key!r}", timeout)
            replies = self._collect(requests, f"pull of key {key!r}", timeout)
        direct = isinstance(out, torch.Tensor) and out.dtype == info.dtype and out.is_contiguous() \
            and tuple(out.shape) == info.shape and out.device.type == "cpu"
        # Straight into ``out`` when its layout allows: one copy from the received frame.
        flat = out.view(-1) if direct else torch.empty(math.prod(info.shape), dtype=info.dtype,
                                                       pin_memory=torch.cuda.is_available())
        for (server, request_id), part in zip(requests, info.slices):
            message = replies[request_id]
            if message.op != Op.DATA or message.offset != part.start or message.length != part.length \
                    or message.dtype != info.dtype:
                raise PeerError(f"worker {self._rank}: server {server} answered the pull of key {key!r} "
                                f"with {message.op.name} offset {message.offset} length {message.length}")
            flat[part.start:part.stop] = message.tensor()
        self.last_min_clock[key] = min(replies[r].clock for _, r in requests)
        if not direct:
            copy_out(flat.view(info.shape), out)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy for the wire: a GPU tensor goes through pinned host memory
    (one DMA copy; ZeroMQ then sends it without another); a CPU tensor is itself."""
    if tensor.device.type == "cpu":
        return tensor.contiguous()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)
    return host


def server_addresses(env: DistEnv) -> list[str]:
    """The servers' addresses, as they announced them in the job's TCP store."""
    from paratrain.comm.process_group import connect_store
    from datetime import timedelta

    if env.num_servers < 1:
        raise ConfigError("PARATRAIN_NUM_SERVERS=0: dist_* kvstores need parameter servers; "
                          "launch with --servers M (M >= 1)")
    store = connect_store(env)
    keys = [f"ps/server/{i}" for i in range(env.num_servers)]
    try:
        store.wait(keys, timedelta(seconds=env.timeout_s))
    except Exception as exc:  # torch raises several types for a store timeout
        raise CommTimeout(f"worker {env.rank}: parameter servers did not announce {keys} in the store "
                          f"within {env.timeout_s}s: {exc}") from None
    return [store.get(key).decode("utf-8") for key in keys]


def create_dist_kvstore(type_name: str, *, staleness: int = 2, env: DistEnv | None = None,
                        **options) -> ServerKVStore:
    """Connect to the job's parameter servers as a ``dist_sync``/``dist_async``/
    ``dist_ssp`` KVStore. ``options``: ``bigarray_bound``, ``transport``, ``backup_workers``."""
    allowed = ("bigarray_bound", "transport", "backup_workers")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"kvstore {type_name!r} got unknown option(s) {unknown}; allowed: staleness, "
                          f"{', '.join(allowed)}")
    config = DistKVStoreConfig(mode=type_name, staleness=staleness, **options)
    env = env or read_env()
    import_optimizer_plugins(env.server_imports)   # so that a spec naming a plugin rule is known here too
    from paratrain.comm.process_group import connect_store
    return DistKVStore(config, rank=env.rank, num_workers=env.world_size, addresses=server_addresses(env),
                       secret=env.secret, timeout_s=env.timeout_s, rejoin=env.rejoin, store=connect_store(env))
