"""Elastic groups: gloo groups that lose and regain workers at step boundaries, with no
process restart and no checkpoint read (per-step fault tolerance, ``--min-workers``).

Workers belong to *epochs* of membership. An epoch is a list of members (processes,
:mod:`paratrain.comm.elastic_membership`) decided through the job's TCP store, and a
gloo group of its own under the epoch's store prefix (plus, for pipeline replicas, one
group per stage across the replicas). A step's collectives run in the current epoch's
group; the update is applied only after all of them, and the step's boundary
allreduce, succeeded. When one fails (a peer was SIGKILLed: its sockets close and gloo
fails within milliseconds), the survivor releases the group, so that peers blocked on
it fail too, and meets the others in the store for the next epoch. The members of the
new epoch compare committed step counts; a member holding the most (a healthy peer)
broadcasts its state to every member that is behind. So no member repeats a step, and
all end on the same state. A replacement registers as a joiner; the leader sees it
from a watcher thread and says so in the step's boundary allreduce (which also sums
the step's statistics), so every member grows the group after the same step.

What gloo on torch 2.13 allows, measured (docs/resilience.md): a process whose group
saw a peer die can build a new group and keep working; ``abort()``/``shutdown()`` end
nothing; dropping a group blocks until its pending collectives ended (at worst the
gloo timeout), so old groups are released from a daemon thread. A hung peer (SIGSTOP)
closes nothing: the launcher kills it once its heartbeat stopped
(:class:`~paratrain.comm.elastic_watch.ElasticWatch`), and the hang becomes a death.

Store layout, under ``ElasticConfig.prefix``:

| key | meaning |
|---|---|
| ``slot/<s>/incarnations`` | counter: process n of launcher slot s is member ``"<s>.<n>"`` |
| ``hb/<member>`` | heartbeat counter (:mod:`paratrain.comm.heartbeat`) |
| ``dead/<member>`` | set by the launcher once that process exited or was killed |
| ``joiners``, ``joiner/<i>`` | replacements waiting to be admitted, in order of arrival |
| ``epoch/<n>/arrivals``, ``epoch/<n>/arrival/<i>`` | members that reached rendezvous n |
| ``epoch/<n>/members`` | the decided membership of epoch n (JSON list; the first decider wins) |
| ``epoch/<n>/cause``, ``epoch/<n>/entered`` | why epoch n formed and when it trained (the summary's recoveries) |
| ``pg/<n>/`` | gloo's own keys for epoch n's groups |
| ``spare/<id>/slot`` | the launcher hands a vacant slot to a waiting spare |
| ``steps_repeated`` | counter: steps some member committed a second time |
| ``finished`` | training is over: a replacement still waiting to be admitted exits |
"""
from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from paratrain.comm.elastic_membership import (Reconfiguration, decide_membership, fault_report, member_id,
                                               pending_joiners, sync_plan, waiting_for)
from paratrain.comm.elastic_watch import DEFAULT_PREFIX, MemberLiveness, dead_key, elastic_store, heartbeat_key
from paratrain.comm.heartbeat import HeartbeatSender
from paratrain.comm.process_group import CollectiveFailed, new_gloo_group
from paratrain.errors import CommTimeout, ConfigError, PeerError, check_positive


@dataclass(kw_only=True)
class ElasticConfig:
    """``min_workers``: the fewest complete units that train on (below, the
    rendezvous waits for replacements up to ``timeout_s``, then raises
    :class:`BelowMinWorkers`); ``unit``: slots that live and die together."""

    min_workers: int = 1
    unit: int = 1
    heartbeat_every_s: float = 1.0
    dead_after_s: float = 10.0     # heartbeat silence that makes a member dead (and the launcher kill it)
    timeout_s: float = 60.0        # bound on every wait: one collective, a rendezvous, a join
    poll_s: float = 0.005          # store polling while a rendezvous is open
    join_poll_s: float = 0.05      # the leader's look for joiners, off the step's path
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        for name in ("min_workers", "unit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        for name in ("heartbeat_every_s", "dead_after_s", "timeout_s", "poll_s", "join_poll_s"):
            check_positive(name, getattr(self, name))
        if self.dead_after_s <= 2 * self.heartbeat_every_s:
            raise ConfigError(f"dead_after_s={self.dead_after_s} must exceed two heartbeats "
                              f"(heartbeat_every_s={self.heartbeat_every_s})")


class PeerLost(PeerError):
    """A collective of the current epoch failed: a member died or was cut off."""


class JobFinished(PeerError):
    """A replacement arrived after the members had finished training: nothing to join."""


class BelowMinWorkers(CommTimeout):
    """Fewer than ``min_workers`` live workers for ``timeout_s``: the launcher falls
    back to restarting the group from its checkpoint."""


#: What makes a step (or a collective) start again in a re-formed group.
LOST = (PeerLost, CollectiveFailed, CommTimeout)


class Replica(Protocol):
    """What the group needs from the training state it keeps identical."""

    def committed_steps(self) -> int: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def use_group(self, group: "ElasticGroup | None") -> None:
        """Run collectives on ``group`` now (None: drop every reference to the old one)."""
    def abandon_step(self) -> None:
        """The step in progress failed before its update: drop its pending work."""
    def undo_commit(self) -> None:
        """Take back the last committed step (only units > 1 ever need it)."""


class ElasticGroup:
    """This worker's membership of an elastic group.

    ``slot`` is the launcher's rank for the process (a replacement takes the dead
    one's slot); ``num_slots`` the full size. :meth:`run_step` runs one step to its
    commit; ``pg`` is the current
    epoch's group (``rank``/``size``), ``part_group`` the group of the members that
    hold the same state as this one (``part_rank``/``part_size``: this stage across the
    replicas; the whole group when ``unit`` is 1).
    """

    def __init__(self, store, *, slot: int, num_slots: int, replica: Replica, config: ElasticConfig) -> None:
        if not 0 <= slot < num_slots:
            raise ConfigError(f"slot={slot} must be in [0, num_slots={num_slots})")
        if num_slots % config.unit:
            raise ConfigError(f"num_slots={num_slots} is not a multiple of unit={config.unit}")
        self.config, self.slot, self.num_slots, self.replica = config, slot, num_slots, replica
        self.unit = config.unit
        self._store = elastic_store(store, config.prefix)
        self.incarnation = int(self._store.add(f"slot/{slot}/incarnations", 1))
        self.member = member_id(slot, self.incarnation)
        self._heartbeat = HeartbeatSender(self._store, heartbeat_key(self.member), config.heartbeat_every_s).start()
        self._liveness = MemberLiveness(self._store, config.dead_after_s)
        self.pg = self.part_group = None
        self.epoch, self.members, self.rank, self.size = -1, [], 0, 0
        self.history: list[Reconfiguration] = []
        self._joins_waiting = (-1, 0)            # (epoch, count): written by the watcher thread, read at boundaries
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_joiners, name=f"elastic joiners {self.member}", daemon=True)

    @property
    def part_rank(self) -> int:
        return self.rank // self.unit

    @property
    def part_size(self) -> int:
        return self.size // self.unit

    # -- public API ------------------------------------------------------------------

    def start(self) -> None:
        """Form the first epoch with the other first processes, or join a running job."""
        tic, noticed = time.monotonic(), time.time()
        members: list[str] = []
        if self.incarnation == 1 and not self._store.check(["epoch/0/members"]):
            members = self._rendezvous(0, [member_id(slot, 1) for slot in range(self.num_slots)], "start", noticed)
        if self.member in members:
            self._enter(0, members, kind="start", reason="first epoch", tic=tic)
        else:   # a replacement, or a first process that came too late for epoch 0
            self._join(tic)
        self._watcher.start()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place across the current epoch's members."""
        self._launch(lambda: self.pg.allreduce([tensor]), "allreduce").wait()
        return tensor

    def broadcast(self, tensor: torch.Tensor, source: int = 0, *, part: bool = False) -> None:
        """Rank ``source``'s ``tensor`` to every member (of this part, with ``part``)."""
        options = dist.BroadcastOptions()
        options.rootRank = source
        group = self.part_group if part else self.pg
        self._launch(lambda: group.broadcast([tensor], options), f"broadcast from rank {source}").wait()

    def run_step(self, compute: Callable[[], torch.Tensor | None],
                 commit: Callable[[torch.Tensor | None], None], *, admit_joiners: bool = True) -> torch.Tensor | None:
        """Run steps until this member has committed one more than when it was called,
        re-forming the group after each failure (at most ``2 * num_slots + 2`` attempts).

        ``compute()`` takes this member's share of the global batch of
        ``replica.committed_steps()`` (its rank and size may have changed since the last
        call), runs forward, backward and the gradient collectives, and returns a
        float64 tensor of statistics to sum (or None). ``commit(summed)`` applies the
        update and counts the step (``summed``: the statistics). Joiners the leader
        counted are admitted after it unless ``admit_joiners`` is False (the same on
        every member: the last step of an epoch). Returns the summed statistics, or
        None when a healthy peer's state covered the step (this member was behind).
        """
        start, summed = self.replica.committed_steps(), None
        for _attempt in range(2 * self.num_slots + 2):
            if self.replica.committed_steps() > start:
                return summed
            try:
                stats = compute()
                summed, joins = self._boundary(stats)
            except LOST as lost:
                reason, noticed = str(lost), time.time()
            else:
                commit(summed)
                if joins and admit_joiners:
                    self._grow()
                continue
            # Out of the except block: its traceback held compute()'s frame, whose
            # pending collectives would keep the old group's sockets open.
            summed = None
            self.replica.abandon_step()
            self._recover(reason, noticed)
        raise PeerError(f"member {self.member}: step {start} failed {2 * self.num_slots + 2} times in a row; "
                        f"giving up")

    def count_repeated_step(self) -> None:
        """Record that this member committed a step index it had committed before."""
        self._store.add("steps_repeated", 1)

    def fault_summary(self) -> dict:
        """``worker_failures``, ``recoveries`` and ``steps_repeated`` of the whole job
        so far, from the epochs' records in the store."""
        records = []
        for epoch in range(self.epoch + 1):
            if not self._store.check([f"epoch/{epoch}/cause", f"epoch/{epoch}/entered"]):
                continue
            cause = json.loads(self._store.get(f"epoch/{epoch}/cause"))
            records.append({**cause, **json.loads(self._store.get(f"epoch/{epoch}/entered"))})
        return {**fault_report(records, self.num_slots), "steps_repeated": int(self._store.add("steps_repeated", 0))}

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
        self.replica.use_group(None)
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

    def _recover(self, reason: str, noticed: float, *, admit: bool = True) -> None:
        """A collective failed: meet the survivors in the next epoch, shrinking the group
        (``admit``: a joiner may come in too; its first collectives are a step's)."""
        tic = time.monotonic()
        for _attempt in range(2 * self.num_slots + 2):
            self.replica.use_group(None)
            self._retire()
            next_epoch, previous = self.epoch + 1, self.members
            try:
                members = self._rendezvous(next_epoch, previous, "failure", noticed, admit=admit)
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
        tic, noticed = time.monotonic(), time.time()
        self.replica.use_group(None)
        self._retire()
        next_epoch, previous = self.epoch + 1, self.members
        try:
            members = self._rendezvous(next_epoch, previous, "join", noticed)
            self._enter(next_epoch, members, kind="grow", reason="replacement joined", tic=tic)
        except PeerLost as lost:
            self.epoch, self.members = next_epoch, members
            self._recover(str(lost), time.time())

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
                        self._recover(str(lost), time.time())
                    return
                epoch += 1
            if self._store.check(["finished"]):
                raise JobFinished(f"member {self.member}: the job finished before it was admitted")
            if time.monotonic() > deadline:
                raise BelowMinWorkers(f"member {self.member}: not admitted within {self.config.timeout_s:.0f}s "
                                      f"(newest epoch {epoch - 1}); no member of the group reached a step boundary")
            time.sleep(self.config.join_poll_s)

    def _rendezvous(self, epoch: int, previous: list[str], cause: str, noticed: float, *,
                    admit: bool = True) -> list[str]:
        """Arrive at epoch ``epoch`` and return its membership, decided by the first
        member that saw nobody left to wait for (it also records the ``cause``);
        waiting joiners come in with ``admit``."""
        store, key = self._store, f"epoch/{epoch}/members"
        index = int(store.add(f"epoch/{epoch}/arrivals", 1))
        store.set(f"epoch/{epoch}/arrival/{index}", self.member)
        deadline = time.monotonic() + self.config.timeout_s
        while not store.check([key]):
            arrived = self._read_list(f"epoch/{epoch}/arrival", int(store.add(f"epoch/{epoch}/arrivals", 0)))
            joiners = self._read_list("joiner", int(store.add("joiners", 0))) if admit else []
            gone = self._liveness.gone(set(previous) | set(joiners), exclude=self.member)
            decided = decide_membership(previous, arrived, joiners, gone, self.config.min_workers, self.unit)
            if decided is not None:
                if store.compare_set(key, "", json.dumps(decided)).decode() == json.dumps(decided):
                    store.set(f"epoch/{epoch}/cause", json.dumps({"cause": cause, "noticed_at": noticed,
                                                                  "previous": previous}))
                break
            if time.monotonic() > deadline:
                live = len({m for m in arrived + joiners if m not in gone})
                error = BelowMinWorkers if not waiting_for(previous, arrived, gone) else CommTimeout
                raise error(f"member {self.member}: epoch {epoch} not formed within {self.config.timeout_s:.0f}s; "
                            f"waiting for {waiting_for(previous, arrived, gone) or 'nobody'} of the last epoch; "
                            f"{live} live worker(s), min_workers={self.config.min_workers}")
            time.sleep(self.config.poll_s)
        return json.loads(store.get(key))

    def _read_list(self, prefix: str, count: int) -> list[str]:
        if count == 0:
            return []
        return [value.decode() for value in self._store.multi_get([f"{prefix}/{i}" for i in range(1, count + 1)])]

    def _watch_joiners(self) -> None:
        """The leader's thread: count the joiners that can be admitted."""
        seen: list[str] = []
        while not self._stop.wait(self.config.join_poll_s):
            epoch, members = self.epoch, list(self.members)
            if self.rank != 0 or self.pg is None:
                continue
            try:
                count = int(self._store.add("joiners", 0))
                if count > len(seen):
                    seen += self._read_list("joiner", count)[len(seen):]
                dead = {j for j in seen if j not in members and self._store.check([dead_key(j)])}
                self._joins_waiting = (epoch, len(pending_joiners(seen, members, dead, self.unit)))
            except Exception:   # the store is gone at shutdown: the main thread reports that
                continue

    # -- groups and state --------------------------------------------------------------

    def _enter(self, epoch: int, members: list[str], *, kind: str, reason: str, tic: float) -> None:
        """Build epoch ``epoch``'s groups and bring every member to the healthiest state."""
        self.epoch, self.members = epoch, members
        self.rank, self.size = members.index(self.member), len(members)
        timeout = self.config.timeout_s
        try:
            self.pg = new_gloo_group(dist.PrefixStore(f"pg/{epoch}/", self._store), self.rank, self.size, timeout)
            self.part_group = self.pg if self.unit == 1 else new_gloo_group(
                dist.PrefixStore(f"pg/{epoch}/part{self.rank % self.unit}/", self._store), self.part_rank,
                self.part_size, timeout)
        except RuntimeError as exc:
            raise self._lost("building the group", exc) from None
        self.replica.use_group(self)
        synced = self._sync_state(force=epoch == 0)
        if self.rank == 0:
            self._store.set(f"epoch/{epoch}/entered", json.dumps({"members": members, "entered_at": time.time(),
                                                                  "step": self.replica.committed_steps()}))
        self.history.append(Reconfiguration(kind, epoch, list(members), self.replica.committed_steps(),
                                            round(time.monotonic() - tic, 4), synced, reason))

    def _sync_state(self, force: bool) -> list[int]:
        """A healthy peer's state to every member that is behind (all, when forced),
        within each part (state group)."""
        mine = torch.tensor([self.replica.committed_steps()], dtype=torch.int64)
        steps = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        self._launch(lambda: self.pg.allgather([steps], [mine]), "allgather of committed steps").wait()
        plan = sync_plan([int(s) for s in steps], [rank % self.unit for rank in range(self.size)])
        if self.rank in plan.undo:
            self.replica.undo_commit()
        part = self.rank % self.unit
        source = plan.sources[part]
        behind = [r for r in range(self.size) if r % self.unit == part and r != source] if force else \
            [r for r in plan.behind + plan.undo if r % self.unit == part and r != source]
        if not behind:
            return []
        blob = _serialize(self.replica.state_dict()) if self.rank == source else torch.zeros(0, dtype=torch.uint8)
        length = torch.tensor([blob.numel()], dtype=torch.int64)
        self.broadcast(length, source // self.unit, part=True)
        if self.rank != source:
            blob = torch.empty(int(length), dtype=torch.uint8)
        self.broadcast(blob, source // self.unit, part=True)
        if self.rank in behind:
            self.replica.load_state_dict(_deserialize(blob))
        return behind

    def _launch(self, start: Callable[[], object], what: str) -> "PendingCollective":
        """Start a collective on the current group; a failure becomes :class:`PeerLost`."""
        try:
            return PendingCollective(self, start(), what)
        except RuntimeError as exc:
            raise self._lost(what, exc) from None

    def _retire(self) -> None:
        """Drop the current groups from a daemon thread: their sockets close once their
        pending collectives ended, which makes peers still blocked on them fail too."""
        holder = [g for g in {id(self.pg): self.pg, id(self.part_group): self.part_group}.values() if g is not None]
        self.pg = self.part_group = None
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
