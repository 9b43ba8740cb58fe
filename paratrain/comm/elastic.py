"""Elastic data parallelism: a gloo group that loses and regains workers at step
boundaries, with no process restart and no checkpoint read.

Workers belong to *epochs* of membership. An epoch is a list of member ids decided
through the job's TCP store and a gloo process group of its own under the epoch's
store prefix. A step's collectives run in the current epoch's group; the optimizer
step is taken only after all of them succeeded. When one fails (a peer was SIGKILLed:
its sockets close and gloo fails within milliseconds), the survivor releases the
group, so that peers blocked on it fail too, and meets the others in the store for
the next epoch. The members of the new epoch compare committed step counts; the
lowest-ranked member with the highest count (a healthy peer) broadcasts its state to
every member that is behind. So no member repeats a step, and all end on the same
state. A replacement registers as a joiner; the leader sees it from a watcher thread
and says so in the step's boundary allreduce (which also sums the step's
statistics), so every member grows the group after the same step.

What gloo on torch 2.13 allows, measured (docs/resilience.md): a process whose group
saw a peer die can build a new ``ProcessGroupGloo`` and keep working;
``Backend.abort()`` and ``shutdown()`` return at once but neither ends a pending
collective nor closes a socket; destroying a group blocks until its pending
collectives ended (at worst the gloo timeout), so old groups are released from a
daemon thread. A hung peer (SIGSTOP) closes nothing: the launcher kills it once its
heartbeat stopped (:class:`ElasticWatch`), and the hang becomes a death.

Store layout, under ``ElasticConfig.prefix``:

| key | meaning |
|---|---|
| ``slot/<s>/incarnations`` | counter: process n of launcher slot s is member ``"<s>.<n>"`` |
| ``hb/<member>`` | heartbeat counter (:mod:`paratrain.comm.heartbeat`) |
| ``dead/<member>`` | set by the launcher once that process exited or was killed |
| ``joiners``, ``joiner/<i>`` | replacements waiting to be admitted, in order of arrival |
| ``epoch/<n>/arrivals``, ``epoch/<n>/arrival/<i>`` | members that reached rendezvous n |
| ``epoch/<n>/members`` | the decided membership of epoch n (JSON list; the first decider wins) |
| ``pg/<n>/`` | gloo's own keys for epoch n's group |
| ``spare/<id>/slot`` | the launcher hands a vacant slot to a waiting spare |
| ``finished`` | training is over: a replacement still waiting to be admitted exits |
"""
from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from paratrain.comm.heartbeat import HeartbeatSender, LivenessTracker
from paratrain.errors import CommTimeout, ConfigError, PeerError, check_positive


@dataclass(kw_only=True)
class ElasticConfig:
    min_workers: int = 1
    heartbeat_every_s: float = 1.0
    dead_after_s: float = 10.0     # heartbeat silence that makes a member dead (and the launcher kill it)
    timeout_s: float = 60.0        # bound on every wait: one collective, a rendezvous, a join
    poll_s: float = 0.005          # store polling while a rendezvous is open
    join_poll_s: float = 0.05      # the leader's look for joiners, off the step's path
    prefix: str = "elastic/"

    def __post_init__(self) -> None:
        if not isinstance(self.min_workers, int) or self.min_workers < 1:
            raise ConfigError(f"min_workers={self.min_workers!r} must be an integer >= 1")
        for name in ("heartbeat_every_s", "dead_after_s", "timeout_s", "poll_s", "join_poll_s"):
            check_positive(name, getattr(self, name))
        if self.dead_after_s <= 2 * self.heartbeat_every_s:
            raise ConfigError(f"dead_after_s={self.dead_after_s} must exceed two heartbeats "
                              f"(heartbeat_every_s={self.heartbeat_every_s})")


class PeerLost(PeerError):
    """A collective of the current epoch failed: a member died or was cut off."""


class JobFinished(PeerError):
    """A replacement arrived after the members had finished training: nothing to join."""


class Replica(Protocol):
    """What the group needs from the training state it keeps identical."""

    def committed_steps(self) -> int: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def member_id(slot: int, incarnation: int) -> str:
    return f"{slot}.{incarnation}"


def member_order(member: str) -> tuple[int, int]:
    """Members sort by launcher slot, then incarnation: at full size rank == slot."""
    slot, incarnation = member.split(".")
    return int(slot), int(incarnation)


def waiting_for(previous: list[str], arrived: list[str], gone: set[str]) -> list[str]:
    """Members of the last epoch that neither reached the rendezvous nor are gone."""
    return [m for m in previous if m not in arrived and m not in gone]


def decide_membership(previous: list[str], arrived: list[str], joiners: list[str], gone: set[str],
                      min_workers: int) -> list[str] | None:
    """The next epoch's members, or None while the rendezvous must stay open: some
    member of the last epoch may still arrive, or fewer than ``min_workers`` are live
    (a replacement may still register). A pure function."""
    if waiting_for(previous, arrived, gone):
        return None
    members = {m for m in arrived if m not in gone} | {j for j in joiners if j not in gone}
    if len(members) < min_workers:
        return None
    return sorted(members, key=member_order)


def pending_joiners(joiners: list[str], members: list[str], dead: set[str]) -> list[str]:
    """Joiners still waiting for admission: not members, not dead, and not replaced
    by a newer process of their slot. A pure function."""
    newest: dict[int, int] = {}
    for member in [*joiners, *members]:
        slot, incarnation = member_order(member)
        newest[slot] = max(newest.get(slot, 0), incarnation)
    return [j for j in joiners if j not in members and j not in dead and member_order(j)[1] == newest[member_order(j)[0]]]


def sync_plan(steps: list[int]) -> tuple[int, list[int]]:
    """``(source, behind)``: the lowest rank holding the most committed steps, and the
    ranks with fewer. A pure function."""
    most = max(steps)
    return steps.index(most), [rank for rank, count in enumerate(steps) if count < most]


@dataclass
class Reconfiguration:
    """One change of membership, as the summary reports it."""

    kind: str   # "start"; "shrink" or "regroup" (after a failure); "grow"; "rejoin" (this member was admitted)
    epoch: int
    members: list[str]
    step: int                   # committed steps after the state sync
    seconds: float              # from noticing the need to training in the new epoch
    synced: list[int] = field(default_factory=list)   # ranks that received the healthy peer's state
    reason: str = ""


class ElasticGroup:
    """This worker's membership of an elastic data-parallel group.

    ``slot`` is the launcher's rank for the process (a replacement takes the dead
    one's slot); ``num_slots`` the full size. Collectives go through
    :meth:`all_reduce` / :meth:`all_reduce_async` (a failure becomes
    :class:`PeerLost`) and a step through :meth:`run_step`.
    """

    def __init__(self, store, *, slot: int, num_slots: int, replica: Replica, config: ElasticConfig) -> None:
        if not 0 <= slot < num_slots:
            raise ConfigError(f"slot={slot} must be in [0, num_slots={num_slots})")
        self.config, self.slot, self.num_slots, self.replica = config, slot, num_slots, replica
        self._store = dist.PrefixStore(config.prefix, store)
        self.incarnation = int(self._store.add(f"slot/{slot}/incarnations", 1))
        self.member = member_id(slot, self.incarnation)
        self._heartbeat = HeartbeatSender(self._store, f"hb/{self.member}", config.heartbeat_every_s).start()
        self._liveness = LivenessTracker(lambda m: int(self._store.add(f"hb/{m}", 0)), config.dead_after_s)
        self.pg = None
        self.epoch, self.members, self.rank, self.size = -1, [], 0, 0
        self.history: list[Reconfiguration] = []
        self._joins_waiting = (-1, 0)            # (epoch, count): written by the watcher thread, read at boundaries
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_joiners, name=f"elastic joiners {self.member}", daemon=True)

    # -- public API ------------------------------------------------------------------

    def start(self) -> None:
        """Form the first epoch with the other first processes, or join a running job."""
        tic = time.monotonic()
        members: list[str] = []
        if self.incarnation == 1 and not self._store.check(["epoch/0/members"]):
            members = self._rendezvous(0, [member_id(slot, 1) for slot in range(self.num_slots)])
        if self.member in members:
            self._enter(0, members, kind="start", reason="first epoch", tic=tic)
        else:   # a replacement, or a first process that came too late for epoch 0
            self._join(tic)
        self._watcher.start()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place across the current epoch's members."""
        self.all_reduce_async(tensor).wait()
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> "PendingCollective":
        return self._launch(lambda: self.pg.allreduce([tensor]), "allreduce")

    def run_step(self, compute: Callable[[], torch.Tensor | None], commit: Callable[[], None]) -> torch.Tensor | None:
        """Run one step to its commit, re-forming the group after each failure (at
        most ``2 * num_slots + 2`` attempts).

        ``compute()`` zeroes the gradients, takes this member's share of the global
        batch for ``replica.committed_steps()`` (its rank and size may have changed since
        the last call), runs forward, backward and the gradient collectives, and
        returns a float64 tensor of statistics to sum (or None). ``commit()`` applies
        the optimizer step and counts the step. Returns the summed statistics.
        """
        for _attempt in range(2 * self.num_slots + 2):
            try:
                stats = compute()
                summed, joins = self._boundary(stats)
            except PeerLost as lost:
                reason = str(lost)
            else:
                commit()
                if joins:
                    self._grow()
                return summed
            # Out of the except block: its traceback held compute()'s frame, whose
            # pending collectives would keep the old group's sockets open.
            self._recover(reason)
        raise PeerError(f"member {self.member}: step {self.replica.committed_steps()} failed "
                        f"{2 * self.num_slots + 2} times in a row; giving up")

    def finish(self) -> None:
        """Say that training is over, so a replacement still starting exits instead
        of waiting to be admitted (:class:`JobFinished`)."""
        self._store.set("finished", "1")

    def close(self) -> None:
        """Stop the threads and release the group (without waiting for it)."""
        self._stop.set()
        self._heartbeat.stop()
        if self._watcher.is_alive():
            self._watcher.join(timeout=2 * self.config.join_poll_s + 1)
        self._retire()

    # -- one step ----------------------------------------------------------------------

    def _boundary(self, stats: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
        """Sum the step's statistics and the leader's count of waiting joiners in one
        allreduce, so every member learns of a join after the same step."""
        epoch, joins = self._joins_waiting   # counted against this epoch's members, or stale
        word = torch.tensor([float(joins if self.rank == 0 and epoch == self.epoch else 0)], dtype=torch.float64)
        flat = word if stats is None else torch.cat([stats.to(torch.float64).flatten(), word])
        self.all_reduce(flat)
        return (None if stats is None else flat[:-1].reshape(stats.shape)), int(flat[-1].item())

    def _lost(self, what: str, exc: Exception) -> PeerLost:
        return PeerLost(f"member {self.member} (rank {self.rank} of {self.size}, epoch {self.epoch}): "
                        f"{what} failed: {str(exc).splitlines()[0][:300]}")

    # -- membership ----------------------------------------------------------------

    def _recover(self, reason: str) -> None:
        """A collective failed: meet the survivors in the next epoch, shrinking the group."""
        tic = time.monotonic()
        for _attempt in range(2 * self.num_slots + 2):
            self._retire()
            next_epoch, previous = self.epoch + 1, self.members
            try:
                members = self._rendezvous(next_epoch, previous)
                if self.member not in members:   # decided without us (we were late): join as a replacement
                    self._join(tic, after=next_epoch)
                    return
                self._enter(next_epoch, members, kind="shrink" if len(members) < len(previous) else "regroup",
                            reason=reason, tic=tic)
                return
            except PeerLost as again:   # another member died while we re-formed
                self.epoch, self.members, reason = next_epoch, members, str(again)
        raise PeerError(f"member {self.member}: could not re-form the group after {2 * self.num_slots + 2} "
                        f"attempts; last failure: {reason}")

    def _grow(self) -> None:
        """Admit the waiting joiners at this step boundary."""
        tic = time.monotonic()
        self._retire()
        next_epoch, previous = self.epoch + 1, self.members
        try:
            members = self._rendezvous(next_epoch, previous)
            self._enter(next_epoch, members, kind="grow", reason="replacement joined", tic=tic)
        except PeerLost as lost:
            self.epoch, self.members = next_epoch, members
            self._recover(str(lost))

    def _join(self, tic: float, after: int = 0) -> None:
        """Register as a joiner and wait for an epoch that admits us."""
        index = int(self._store.add("joiners", 1))
        self._store.set(f"joiner/{index}", self.member)
        epoch, deadline = after, time.monotonic() + self.config.timeout_s
        while True:
            while self._store.check([f"epoch/{epoch}/members"]):
                members = json.loads(self._store.get(f"epoch/{epoch}/members"))
                if self.member in members:
                    try:
                        self._enter(epoch, members, kind="rejoin", reason="admitted", tic=tic)
                    except PeerLost as lost:
                        self.epoch, self.members = epoch, members
                        self._recover(str(lost))
                    return
                epoch += 1
            if self._store.check(["finished"]):
                raise JobFinished(f"member {self.member}: the job finished before it was admitted")
            if time.monotonic() > deadline:
                raise CommTimeout(f"member {self.member}: not admitted within {self.config.timeout_s:.0f}s "
                                  f"(newest epoch {epoch - 1}); the group's leader never reached a step boundary")
            time.sleep(self.config.join_poll_s)

    def _rendezvous(self, epoch: int, previous: list[str]) -> list[str]:
        """Arrive at epoch ``epoch`` and return its membership, decided by the first
        member that saw nobody left to wait for."""
        store, key = self._store, f"epoch/{epoch}/members"
        index = int(store.add(f"epoch/{epoch}/arrivals", 1))
        store.set(f"epoch/{epoch}/arrival/{index}", self.member)
        deadline = time.monotonic() + self.config.timeout_s
        while not store.check([key]):
            arrived = self._read_list(f"epoch/{epoch}/arrival", int(store.add(f"epoch/{epoch}/arrivals", 0)))
            joiners = self._read_list("joiner", int(store.add("joiners", 0)))
            gone = self._gone(set(previous) | set(joiners))
            decided = decide_membership(previous, arrived, joiners, gone, self.config.min_workers)
            if decided is not None:
                store.compare_set(key, "", json.dumps(decided))
                break
            if time.monotonic() > deadline:
                live = len({m for m in arrived + joiners if m not in gone})
                raise CommTimeout(
                    f"member {self.member}: epoch {epoch} not formed within {self.config.timeout_s:.0f}s; "
                    f"waiting for {waiting_for(previous, arrived, gone) or 'nobody'} of the last epoch; "
                    f"{live} live worker(s), min_workers={self.config.min_workers}")
            time.sleep(self.config.poll_s)
        return json.loads(store.get(key))

    def _gone(self, members: set[str]) -> set[str]:
        """Members that exited (the launcher said so), were replaced by a newer
        process of their slot, or whose heartbeat stopped."""
        newest: dict[int, int] = {}
        for member in members:
            slot, incarnation = member_order(member)
            newest[slot] = max(newest.get(slot, 0), incarnation)
        gone = {m for m in members if member_order(m)[1] < newest[member_order(m)[0]]}
        gone |= {m for m in members if self._store.check([f"dead/{m}"])}
        gone |= set(self._liveness.dead(sorted(members - gone - {self.member})))
        return gone

    def _read_list(self, prefix: str, count: int) -> list[str]:
        if count == 0:
            return []
        return [value.decode() for value in self._store.multi_get([f"{prefix}/{i}" for i in range(1, count + 1)])]

    def _watch_joiners(self) -> None:
        """The leader's thread: count the joiners that wait for admission."""
        seen: list[str] = []
        while not self._stop.wait(self.config.join_poll_s):
            epoch, members = self.epoch, list(self.members)
            if self.rank != 0 or self.pg is None:
                continue
            try:
                count = int(self._store.add("joiners", 0))
                if count > len(seen):
                    seen += self._read_list("joiner", count)[len(seen):]
                dead = {j for j in seen if j not in members and self._store.check([f"dead/{j}"])}
                self._joins_waiting = (epoch, len(pending_joiners(seen, members, dead)))
            except Exception:   # the store is gone at shutdown: the main thread reports that
                continue

    # -- groups and state --------------------------------------------------------------

    def _enter(self, epoch: int, members: list[str], *, kind: str, reason: str, tic: float) -> None:
        """Build epoch ``epoch``'s group and bring every member to the healthiest state."""
        self.epoch, self.members = epoch, members
        self.rank, self.size = members.index(self.member), len(members)
        try:
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore(f"pg/{epoch}/", self._store), self.rank, self.size,
                                            timedelta(seconds=self.config.timeout_s))
        except RuntimeError as exc:
            raise self._lost("building the group", exc) from None
        synced = self._sync_state(force=epoch == 0)
        self.history.append(Reconfiguration(kind, epoch, list(members), self.replica.committed_steps(),
                                            round(time.monotonic() - tic, 4), synced, reason))

    def _sync_state(self, force: bool) -> list[int]:
        """The healthy peer's state to every member that is behind (all, when forced)."""
        mine = torch.tensor([self.replica.committed_steps()], dtype=torch.int64)
        steps = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        self._launch(lambda: self.pg.allgather([steps], [mine]), "allgather of committed steps").wait()
        source, behind = sync_plan([int(s) for s in steps])
        if force:
            behind = [rank for rank in range(self.size) if rank != source]
        if not behind:
            return []
        blob = _serialize(self.replica.state_dict()) if self.rank == source else torch.zeros(0, dtype=torch.uint8)
        length = torch.tensor([blob.numel()], dtype=torch.int64)
        self._broadcast(length, source, "broadcast of the state's size")
        if self.rank != source:
            blob = torch.empty(int(length), dtype=torch.uint8)
        self._broadcast(blob, source, f"broadcast of rank {source}'s state")
        if self.rank in behind:
            self.replica.load_state_dict(_deserialize(blob))
        return behind

    def _launch(self, start: Callable[[], object], what: str) -> "PendingCollective":
        """Start a collective on the current group; a failure becomes :class:`PeerLost`."""
        try:
            return PendingCollective(self, start(), what)
        except RuntimeError as exc:
            raise self._lost(what, exc) from None

    def _broadcast(self, tensor: torch.Tensor, source: int, what: str) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = source
        self._launch(lambda: self.pg.broadcast([tensor], options), what).wait()

    def _retire(self) -> None:
        """Drop the current group from a daemon thread: its sockets close once its
        pending collectives ended, which makes peers still blocked on it fail too."""
        holder = [self.pg] if self.pg is not None else []
        self.pg = None
        if holder:
            threading.Thread(target=holder.clear, name="release old gloo group", daemon=True).start()


class PendingCollective:
    """An asynchronous collective of one epoch; :meth:`wait` raises :class:`PeerLost`."""

    def __init__(self, group: ElasticGroup, work, what: str) -> None:
        self._group, self._work, self._what = group, work, what

    def wait(self) -> None:
        work, self._work = self._work, None   # no reference may keep the old group's sockets open
        try:
            work.wait()
        except RuntimeError as exc:
            del work
            raise self._group._lost(self._what, exc) from None


def _serialize(state: dict) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)


def _deserialize(blob: torch.Tensor) -> dict:
    return torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)


class ElasticWatch:
    """The launcher's half: it tells the group which processes are gone, turns a hang
    into a death, and hands vacant slots to warm spares.

    The launcher calls :meth:`report_exit` as soon as a worker process exited (before
    it starts a replacement) and SIGKILLs, by PID, every slot :meth:`hung` returns.
    """

    def __init__(self, store, config: ElasticConfig) -> None:
        self._store = dist.PrefixStore(config.prefix, store)
        self._liveness = LivenessTracker(lambda m: int(self._store.add(f"hb/{m}", 0)), config.dead_after_s)

    def member(self, slot: int) -> str | None:
        """The newest process of ``slot`` (None before one started)."""
        count = int(self._store.add(f"slot/{slot}/incarnations", 0))
        return member_id(slot, count) if count else None

    def report_exit(self, slot: int) -> None:
        member = self.member(slot)
        if member is not None:
            self._store.set(f"dead/{member}", "1")

    def hung(self, slots: list[int]) -> list[int]:
        """Slots whose newest process has not beaten for ``dead_after_s`` (one that
        never beat is still starting and is not judged)."""
        members = {m: slot for slot in slots if (m := self.member(slot)) and not self._store.check([f"dead/{m}"])}
        return [members[m] for m in self._liveness.dead(sorted(members))]

    def assign_spare(self, spare_id: str, slot: int) -> None:
        """Give a dead worker's slot to the spare ``spare_id`` (after :meth:`report_exit`)."""
        self._store.set(f"spare/{spare_id}/slot", str(slot))


def wait_for_vacancy(store, spare_id: str, config: ElasticConfig, timeout_s: float) -> int:
    """In a warm spare: block until the launcher hands it a slot; return the slot.
    A spare imports, loads and builds everything before it waits, so a dead worker's
    replacement joins in the time of one rendezvous, not of a process start."""
    prefixed = dist.PrefixStore(config.prefix, store)
    key, deadline = f"spare/{spare_id}/slot", time.monotonic() + timeout_s
    while not prefixed.check([key]):
        if time.monotonic() > deadline:
            raise CommTimeout(f"spare {spare_id}: no vacancy within {timeout_s:.0f}s")
        time.sleep(config.join_poll_s)
    return int(prefixed.get(key))
