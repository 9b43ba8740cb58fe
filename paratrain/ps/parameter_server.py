"""A parameter server's state and request handlers: holds key slices, applies pushes,
answers pulls. :mod:`paratrain.ps.server` runs one as a process.

Every request is checked before any state changes; a bad one gets an ``ERROR``
reply and the server keeps running. The channel proves each peer's role at its
handshake; a message from a peer without one is dropped unanswered, and a peer's
first message must be the HELLO that joins it to the job (:mod:`paratrain.ps.admission`).
Requests that must wait (a sync pull before its round is complete, an ssp pull
ahead of the staleness bound, an init before rank 0's, a barrier) are parked with a
deadline (:mod:`paratrain.ps.parking`); past it, the reply is an error naming the
workers that were missing.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from paratrain.comm import codecs
from paratrain.comm.security import worker_rank
from paratrain.comm.transport import ServerChannel
from paratrain.comm.wire import tensor_bytes
from paratrain.errors import ConfigError
from paratrain.optimizers import build_server_optimizer
from paratrain.ps import protocol, row_sparse, state_transfer
from paratrain.ps.admission import JobTerms, check_hello, control_change, policy_for
from paratrain.ps.compressed_push import SERVER_CODECS, decode_push
from paratrain.comm.heartbeat import LivenessTracker
from paratrain.ps.optimizer import ServerOptimizer
from paratrain.ps.parking import INIT, ParkedRequests, Waiter
from paratrain.ps.policies import SliceState, UpdatePolicy
from paratrain.ps.protocol import Message, Op, ProtocolError, RequestRejected
from paratrain.ps.snapshot import SnapshotConfig, save_snapshot, snapshot_state

log = logging.getLogger("paratrain.ps.server")

#: The largest message a server accepts unless the job says (the CLI derives it from
#: the model's largest key slice): a peer that has not finished its handshake may have
#: one frame up to this size buffered, so it is kept small.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
#: Pushes one worker may have waiting for their COMMIT (a step's keys from hooks).
MAX_DEFERRED = 1 << 16


@dataclass
class ServerConfig:
    """One server's settings (from the environment when run as a process).

    ``num_workers``: the job's, when known at start-up (HELLOs must agree).
    ``optimizer``/``compression``: specs the job's configuration fixes (JSON dicts);
    None leaves them to worker 0's ``set_optimizer``/``set_gradient_compression``.
    ``locked``: once pushes were applied, those never change (the job's configuration
    says so); unlocked, worker 0 may change them as in MXNet, and the server says so."""

    server_rank: int = 0
    num_servers: int = 1
    timeout_s: float = 60.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    num_workers: int | None = None
    optimizer: dict | None = None
    compression: dict | None = None
    locked: bool = False

    def __post_init__(self) -> None:
        if self.num_servers < 1 or not 0 <= self.server_rank < self.num_servers:
            raise ConfigError(f"server_rank={self.server_rank} must be in [0, num_servers={self.num_servers})")
        if self.num_workers is not None and self.num_workers < 1:
            raise ConfigError(f"num_workers={self.num_workers} must be >= 1")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s={self.timeout_s} must be > 0")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes={self.max_message_bytes} must be >= 1024")


class ParameterServer:
    """The request handlers and state of one server; :meth:`serve` is its loop."""

    def __init__(self, config: ServerConfig, channel: ServerChannel, snapshots: SnapshotConfig | None = None):
        self.config = config
        self.snapshots = snapshots
        self.liveness: LivenessTracker | None = None   # set when workers send heartbeats
        self.channel = channel
        self.keys: dict[str, SliceState] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.ranks: dict[bytes, int] = {}             # peers that joined with a HELLO
        self.terms: JobTerms | None = None          # fixed by the first admitted worker
        self.policy: UpdatePolicy | None = None
        self.optimizer: ServerOptimizer | None = (
            build_server_optimizer(config.optimizer) if config.optimizer is not None else None)
        self.compression: codecs.CompressionConfig | None = (
            _server_codec(config.compression) if config.compression is not None else None)
        self.parked = ParkedRequests()
        self.goodbyes: set[int] = set()
        self.rejoined: set[bytes] = set()            # peers restarted into a running job
        # Ranks restarted into a running async job meet nobody at a barrier (the others
        # passed theirs), so no barrier waits for them either.
        self.excused: set[int] = set()
        self.sessions: dict[bytes, str] = {}         # peer -> the worker incarnation it speaks for
        self.last_push: dict[str, int] = {}          # session -> request id of its last applied push
        # Pushes sent during backward, before their scale was known: held (checked,
        # unapplied, unanswered) until the peer's COMMIT brings the scale.
        self.deferred: dict[bytes, list[tuple[Message, torch.Tensor]]] = {}
        # With snapshots, acknowledgements wait for the snapshot that makes their
        # push durable (group commit): a reply that went out is never lost by a crash.
        self.held: list[Callable[[], None]] = []
        self.fresh_held = 0                          # held acks of pushes applied (not resent duplicates)
        self.stats = defaultdict(int)

    # -- loop ---------------------------------------------------------------------------

    @property
    def num_workers(self) -> int | None:
        """The job's number of workers, once the first one was admitted."""
        return self.terms.num_workers if self.terms is not None else None

    @property
    def finished(self) -> bool:
        return self.num_workers is not None and len(self.goodbyes) >= self.num_workers

    def serve(self, keep_running: Callable[[], bool] = lambda: True, poll_s: float = 0.1,
              liveness_every_s: float = 2.0) -> None:
        """Handle requests until every worker said goodbye or ``keep_running()`` is
        False (checked every ``liveness_every_s`` seconds)."""
        next_check = time.monotonic()
        while not self.finished:
            item = self.channel.recv(0 if self.held else poll_s)
            if item is not None:
                self.handle(*item)
            if self.held and (item is None or self.fresh_held >= self.snapshots.every):
                self.flush()   # nothing queued, or enough updates: make them durable, then ack
            now = time.monotonic()
            if now >= next_check:
                self.expire(now)
                if not keep_running():
                    log.info("server %d: job is gone, exiting", self.config.server_rank)
                    return
                next_check = now + min(liveness_every_s, self.config.timeout_s / 4)

    def handle(self, peer: bytes, frames: list) -> None:
        """Decode and dispatch one message; never raises for bad input."""
        rank = self.ranks.get(peer)
        try:
            message = protocol.decode(frames, max_payload_bytes=self.config.max_message_bytes)
        except ProtocolError as exc:
            self.stats["malformed"] += 1
            if rank is not None:  # an authenticated worker deserves a reason
                self._error(peer, 0, f"malformed message: {exc}")
            return
        if rank is None:
            self._handle_unauthenticated(peer, message)
            return
        handler = self._HANDLERS.get(message.op)
        try:
            if handler is None:
                raise RequestRejected(f"op {message.op.name} is not a request")
            if peer in self.deferred and message.op not in (Op.COMMIT, Op.GOODBYE) and not (
                    message.op in (Op.PUSH, Op.ROW_PUSH) and message.status & protocol.STATUS_DEFERRED):
                raise RequestRejected(f"{message.op.name} while {len(self.deferred[peer])} deferred push(es) "
                                      f"wait for their COMMIT: commit first")
            handler(self, peer, rank, message)
        except (RequestRejected, ProtocolError, ConfigError, TypeError) as exc:
            self.stats["rejected"] += 1
            self._error(peer, message.request_id, str(exc))

    def expire(self, now: float) -> None:
        """Answer parked requests whose deadline passed with an error naming who
        they waited for."""
        for kind, key, waiter in self.parked.due(now):
            self._error(waiter.peer, waiter.message.request_id, self._waiting_text(kind, key, waiter))
        # dist_sync only: under dist_ssp a dead worker is restarted alone and rejoins,
        # so the others wait for it (up to the timeout) rather than fail.
        if self.liveness is not None and self.policy is not None and self.policy.name == "dist_sync":
            self._fail_pulls_waiting_for_the_dead()
        for generation, missing, waiters in self.parked.due_barriers(now, self.num_workers or 0):
            for waiter in waiters:
                self._error(waiter.peer, waiter.message.request_id,
                            f"barrier {generation} timed out after {self.config.timeout_s}s on server "
                            f"{self.config.server_rank}: missing worker(s) {missing}")

    def _fail_pulls_waiting_for_the_dead(self) -> None:
        """A pull parked for a worker that stopped beating would only time out: fail it
        now, naming the dead worker (the dist_sync policy: the round fails, the job
        stops or restarts; it never hangs)."""
        for key, waiters in list(self.parked.pulls.items()):
            state = self.keys[key]
            blocking = sorted({r for w in waiters for r in self.policy.blocking_workers(state, w.rank)})
            dead = self.liveness.dead(blocking)
            if not dead:
                continue
            for waiter in waiters:
                self._error(waiter.peer, waiter.message.request_id,
                            f"pull by worker {waiter.rank} (server {self.config.server_rank}, key {key!r}) cannot "
                            f"complete: worker(s) {dead} died or are unreachable (no heartbeat for "
                            f"{self.liveness.dead_after_s:.0f}s); missing worker(s) {dead}")
            del self.parked.pulls[key]

    def _waiting_text(self, kind: str, key: str, waiter: Waiter) -> str:
        where = f"server {self.config.server_rank}, key {key!r}"
        if kind == INIT:
            return f"init of {where} timed out after {self.config.timeout_s}s waiting for worker 0's init"
        state = self.keys[key]
        missing = self.policy.blocking_workers(state, waiter.rank)
        return (f"pull by worker {waiter.rank} ({where}) timed out after {self.config.timeout_s}s: "
                f"waiting for pushes from missing worker(s) {missing} (clocks {state.pushes})")

    # -- replies ------------------------------------------------------------------------

    def _reply(self, peer: bytes, frames: list):
        return self.channel.send(peer, frames)

    def _ok(self, peer: bytes, request_id: int, clock: int = 0) -> None:
        self._reply(peer, protocol.encode(Op.OK, request_id=request_id, clock=clock))

    def _error(self, peer: bytes, request_id: int, text: str) -> None:
        self.stats["errors"] += 1
        log.debug("server %d: error reply: %s", self.config.server_rank, text)
        payload = protocol.encode_json({"error": text[:4000]})
        self._reply(peer, protocol.encode(Op.ERROR, request_id=request_id, payload=payload))

    def _send_value(self, peer: bytes, message: Message, state: SliceState) -> None:
        if message.op == Op.ROW_PULL:   # a parked row pull, answered when its round is complete
            row_sparse.send_rows(self, peer, message, state)
            return
        frames = protocol.encode(
            Op.DATA, key=message.key, request_id=message.request_id, dtype=state.value.dtype,
            shape=state.full_shape, offset=state.offset, length=state.value.numel(),
            clock=self.policy.min_clock(state), payload=tensor_bytes(state.value))
        tracker = self._reply(peer, frames)
        if not tracker.done:  # zmq still reads state.value: the next update copies first
            state.lent = tracker

    # -- authentication -----------------------------------------------------------------

    def _handle_unauthenticated(self, peer: bytes, message: Message) -> None:
        """A peer's first message: a HELLO joins it as the worker its key proved."""
        proved_rank = worker_rank(self.channel.peer_role(peer))
        if proved_rank is None:   # the channel did not authenticate it: not one of the job's
            self.stats["unauthenticated"] += 1
            self.channel.drop(peer)
            return
        try:
            if message.op != Op.HELLO:
                raise RequestRejected(f"{message.op.name} before HELLO: a worker's first message is its HELLO")
            hello = message.control()
            rank = self._admit(hello, proved_rank)
        except (ProtocolError, RequestRejected) as exc:
            self._error(peer, message.request_id, str(exc))
            return
        self.ranks[peer] = rank
        session = hello.get("session")
        if isinstance(session, str) and session:
            for old in [p for p, s in self.sessions.items() if s == session[:64]]:
                self.deferred.pop(old, None)   # the worker reconnected and resends those
            self.sessions[peer] = session[:64]
        if hello.get("rejoin") is True:
            self.rejoined.add(peer)
            self.stats["rejoins"] += 1
            self._excuse_from_barriers(rank)
        # The OK says how large a message this server accepts (workers check their keys).
        self._reply(peer, protocol.encode(Op.OK, request_id=message.request_id,
                                          length=self.config.max_message_bytes))

    def _admit(self, hello: dict, proved_rank: int) -> int:
        rank, terms = check_hello(hello, self.terms, proved_rank=proved_rank, job_workers=self.config.num_workers)
        if self.policy is None:
            self.policy = policy_for(terms)
        self.terms = terms
        return rank

    # -- requests -----------------------------------------------------------------------

    def _check_slice(self, message: Message) -> None:
        numel = math.prod(message.shape)
        if message.length < 1 or message.offset + message.length > numel:
            raise RequestRejected(f"slice [{message.offset}, {message.offset + message.length}) does not fit "
                                  f"a key of shape {message.shape}")

    def _state_for(self, message: Message) -> SliceState:
        state = self.keys.get(message.key)
        if state is None:
            raise RequestRejected(f"unknown key {message.key!r} on server {self.config.server_rank}; "
                                  f"call kv.init first")
        if state.row_sparse:
            raise RequestRejected(f"key {message.key!r} is row-sparse: push torch sparse COO gradients and read "
                                  f"rows with kv.row_sparse_pull({message.key!r}, out=..., row_ids=...)")
        if message.op == Op.PULL:
            return state
        dtype = self.dtypes[message.key]
        compressed = message.op == Op.PUSH and bool(message.status & protocol.STATUS_COMPRESSED)
        if message.dtype != dtype and not compressed:
            raise RequestRejected(f"key {message.key!r} holds {dtype}, got {message.dtype}")
        if message.shape != state.full_shape or message.offset != state.offset or (
                message.length != state.value.numel() and not compressed):
            raise RequestRejected(f"key {message.key!r} slice is shape {state.full_shape} offset {state.offset} "
                                  f"length {state.value.numel()}, got shape {message.shape} offset "
                                  f"{message.offset} length {message.length}")
        return state

    def _on_init(self, peer: bytes, rank: int, message: Message) -> None:
        self._check_slice(message)
        if message.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise RequestRejected(f"key {message.key!r}: dtype {message.dtype} is not a float type")
        if message.key in self.keys:
            self._state_for(message)  # same shape, dtype and slice, or an error
            if rank == 0 and peer not in self.rejoined:   # a rejoining rank 0 keeps the trained value
                raise RequestRejected(f"key {message.key!r} is already initialized")
            self._ok(peer, message.request_id)
            return
        if rank != 0:  # rank 0's value wins: wait for it
            message.payload = None
            self.parked.inits[message.key].append(
                Waiter(peer, message, rank, time.monotonic() + self.config.timeout_s))
            return
        self.keys[message.key] = SliceState(
            value=message.tensor().clone(), full_shape=message.shape, offset=message.offset,
            num_workers=self.num_workers)
        self.dtypes[message.key] = message.dtype
        self._ok(peer, message.request_id)
        self._release_inits(message.key)

    def _release_inits(self, key: str) -> None:
        """Answer the other workers' inits of ``key``, parked until rank 0's arrived."""
        state = self.keys[key]
        for waiter in self.parked.inits.pop(key, []):
            try:
                if waiter.message.op == Op.ROW_INIT:
                    row_sparse.check_same_rows(state, waiter.message)
                else:
                    self._state_for(waiter.message)
                self._ok(waiter.peer, waiter.message.request_id)
            except RequestRejected as exc:
                self._error(waiter.peer, waiter.message.request_id, str(exc))

    def _on_push(self, peer: bytes, rank: int, message: Message) -> None:
        state = self._state_for(message)
        if self.optimizer is None and self.policy.needs_optimizer:
            raise RequestRejected(f"{self.policy.name} applies pushes on arrival and needs a server "
                                  f"optimizer: call kv.set_optimizer(...) first")
        if message.status & protocol.STATUS_COMPRESSED:
            grad = decode_push(self.compression, message, state.value.numel())
        else:
            grad = message.tensor()
            grad = grad.float() if message.dtype != torch.float32 else grad
        self._hold_or_apply(peer, rank, message, state, grad)

    def _hold_or_apply(self, peer: bytes, rank: int, message: Message, state: SliceState, grad) -> None:
        """A checked push: held for its COMMIT when deferred, applied now otherwise."""
        if message.status & protocol.STATUS_DEFERRED:   # checked; applied at the COMMIT
            held = self.deferred.setdefault(peer, [])
            if len(held) >= MAX_DEFERRED:
                raise RequestRejected(f"more than {MAX_DEFERRED} deferred pushes without a COMMIT")
            held.append((message, grad))
            return
        self._apply_push(peer, rank, message, state, grad, message.scale)

    def _apply_push(self, peer: bytes, rank: int, message: Message, state: SliceState, grad: torch.Tensor,
                    scale: float, lr: float | None = None) -> None:
        session = self.sessions.get(peer)
        # A push resent after this server restarted may already be in its snapshot.
        fresh = session is None or message.request_id > self.last_push.get(session, 0)
        if fresh:
            # A sync round is applied by the push that completes it, with that push's
            # rate: lockstep workers all send the same rate for a round.
            apply = self._apply if lr is None else functools.partial(self._apply, lr=lr)
            self.policy.on_push(state, rank, grad, scale, apply)
            self.stats["pushes"] += 1
            if session is not None:
                self.last_push[session] = message.request_id
            self._retry_pulls(message.key)
        else:
            self.stats["duplicate_pushes"] += 1
        message.payload = None  # do not keep the frame alive while parked or held
        self._acknowledge(lambda: self._answer_push(peer, rank, message), fresh)

    def _on_commit(self, peer: bytes, rank: int, message: Message) -> None:
        """Apply this peer's deferred pushes, in the order they came, with the scale
        (and learning rate, if given) the COMMIT carries; ``clock`` must count them
        (else none is applied)."""
        lr = message.control().get("lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                               or lr < 0):
            raise RequestRejected(f"COMMIT with lr={lr!r}: the learning rate must be a finite number >= 0")
        held = self.deferred.pop(peer, [])
        if message.clock != len(held):
            raise RequestRejected(f"COMMIT of {message.clock} deferred push(es), but {len(held)} arrived; "
                                  f"none applied")
        for push, grad in held:
            self._apply_push(peer, rank, push, self.keys[push.key], grad, message.scale, lr)
        self._acknowledge(lambda: self._ok(peer, message.request_id), fresh=False)

    def _answer_push(self, peer: bytes, rank: int, message: Message) -> None:
        if message.status & protocol.STATUS_PULL_AFTER:  # pushpull: answered as a pull
            self._on_pull(peer, rank, message)
        else:
            self._ok(peer, message.request_id, clock=self.keys[message.key].pushes[rank])

    def _acknowledge(self, reply: Callable[[], None], fresh: bool) -> None:
        """Send ``reply`` now, or (with snapshots) after the next snapshot."""
        if self.snapshots is None:
            self.stats["acknowledged_pushes"] += fresh
            reply()
            return
        self.held.append(reply)
        self.fresh_held += fresh

    def flush(self) -> None:
        """Snapshot (when configured), then send the acknowledgements it made durable."""
        if self.snapshots is None:
            return
        self.stats["acknowledged_pushes"] += self.fresh_held
        self.stats["snapshots"] += 1
        save_snapshot(snapshot_state(self), self.snapshots.directory, self.config.server_rank)
        held, self.held, self.fresh_held = self.held, [], 0
        for reply in held:
            reply()

    def _apply(self, state: SliceState, grad: torch.Tensor, scale: float, lr: float | None = None) -> None:
        if state.row_sparse:   # only the pushed rows change (lazily, with the rule's row form)
            row_sparse.apply_rows(state, grad, scale, self.optimizer, lr)
            return
        if self.optimizer is None:
            # Only dist_sync gets here: the round's sum (a fresh tensor, or a lone
            # push's received frame, never written) becomes the value, without a copy
            # where it can; a reply still reading the old value is unaffected.
            value = grad * scale if scale != 1.0 else grad
            converted = value.to(state.value.dtype)
            state.borrowed = converted is grad   # the policy's tensor: copy before writing
            state.value = converted
            state.lent = None
            return
        self.optimizer.update(state.writable_value(), grad, state.optimizer_state, scale, lr=lr)

    def _on_pull(self, peer: bytes, rank: int, message: Message) -> None:
        state = self._state_for(message)
        if self.policy.blocking_workers(state, rank):
            self.parked.pulls[message.key].append(Waiter(peer, message, rank, time.monotonic() + self.config.timeout_s))
            return
        self._send_value(peer, message, state)

    def _retry_pulls(self, key: str) -> None:
        waiters = self.parked.pulls.get(key)
        if not waiters:
            return
        state = self.keys[key]
        still = [w for w in waiters if self.policy.blocking_workers(state, w.rank)]
        for waiter in waiters:
            if waiter not in still:
                self._send_value(waiter.peer, waiter.message, state)
        if still:
            self.parked.pulls[key] = still
        else:
            del self.parked.pulls[key]

    def _on_set_optimizer(self, peer: bytes, rank: int, message: Message) -> None:
        optimizer = build_server_optimizer(message.control())
        current = self.optimizer.to_spec() if self.optimizer is not None else None
        if control_change("SET_OPTIMIZER", rank=rank, current=current, requested=optimizer.to_spec(),
                          fixed=self.config.optimizer is not None, started=self.stats["pushes"] > 0, locked=self.config.locked):
            if self.optimizer is None or type(optimizer) is not type(self.optimizer):
                for state in self.keys.values():  # a different rule: its state starts afresh
                    state.optimizer_state = {}
            self.optimizer = optimizer
        self._ok(peer, message.request_id)
        self._release_barriers()

    def _on_set_compression(self, peer: bytes, rank: int, message: Message) -> None:
        config = codecs.parse_compression(message.control())
        config = _server_codec(config) if config.enabled else None   # None: pushes come plain again
        current = self.compression.to_dict() if self.compression is not None else None
        if control_change("SET_COMPRESSION", rank=rank, current=current,
                          requested=config.to_dict() if config is not None else None,
                          fixed=self.config.compression is not None, started=self.stats["pushes"] > 0, locked=self.config.locked):
            self.compression = config
        self._ok(peer, message.request_id)

    def _on_barrier(self, peer: bytes, rank: int, message: Message) -> None:
        waiter = Waiter(peer, message, rank, time.monotonic() + self.config.timeout_s)
        for released in self.parked.arrive(message.clock, waiter, self.num_workers, self._barrier_excused()):
            self._ok(released.peer, released.message.request_id)

    def _barrier_excused(self) -> set[int]:
        # Until the job's optimizer is here, barriers keep waiting for everyone: the
        # start-up barrier is what keeps pushes behind rank 0's set_optimizer.
        ready = self.optimizer is not None or self.policy is None or not self.policy.needs_optimizer
        return self.excused if ready else set()

    def _excuse_from_barriers(self, rank: int) -> None:
        """A rank that rejoined skips its barriers: release those that only wait for it
        (a rank 0 restarted before its first barrier would otherwise hold the others there)."""
        self.excused.add(rank)
        self._release_barriers()

    def _release_barriers(self) -> None:
        for generation in list(self.parked.barriers):
            for released in self.parked.release(generation, self.num_workers, self._barrier_excused()):
                self._ok(released.peer, released.message.request_id)

    def _on_goodbye(self, peer: bytes, rank: int, message: Message) -> None:
        self.deferred.pop(peer, None)   # never committed: they never happened
        self.goodbyes.add(rank)
        self._stop_waiting_for(rank)
        self._acknowledge(lambda: self._ok(peer, message.request_id), fresh=False)
        del self.ranks[peer]
        self.rejoined.discard(peer)

    def _stop_waiting_for(self, rank: int) -> None:
        """``rank`` pushes no more: policies that wait for workers (backup workers, ssp)
        stop waiting for it, and whatever was waiting on it goes ahead."""
        self.policy.depart(rank)
        for key, state in self.keys.items():
            self.policy.apply_ready(state, self._apply)
            self._retry_pulls(key)

    def _on_depart(self, peer: bytes, rank: int, message: Message) -> None:
        """The worker pushes no more but still reads (its held-out evaluation pulls the
        rows of tables that live here); its GOODBYE comes later."""
        self._stop_waiting_for(rank)
        self._ok(peer, message.request_id)

    _HANDLERS = {Op.INIT: _on_init, Op.PUSH: _on_push, Op.PULL: _on_pull,
                 Op.SET_OPTIMIZER: _on_set_optimizer, Op.SET_COMPRESSION: _on_set_compression, Op.BARRIER: _on_barrier, Op.GOODBYE: _on_goodbye,
                 Op.COMMIT: _on_commit, Op.DEPART: _on_depart,
                 **row_sparse.HANDLERS, **state_transfer.HANDLERS}


def _server_codec(spec) -> codecs.CompressionConfig:
    """A compression setting the servers can decode one slice at a time, or ConfigError."""
    config = codecs.parse_compression(spec)
    if config.type not in SERVER_CODECS:
        raise ConfigError(f"compression type={config.type!r} cannot be decoded per slice on a "
                              f"server; choose one of: {', '.join(SERVER_CODECS)}")
    return config
