"""Who of an elastic group is still alive, as everyone outside the group's collectives
sees it: the launcher (:class:`ElasticWatch`: reports exits, turns a hang into a death,
hands vacant slots to warm spares), the parameter servers (:class:`MemberLiveness`:
a dist_sync round does not wait for a member that died) and the group's own
rendezvous. All of it lives in the job's store under the group's prefix
(:mod:`paratrain.comm.elastic` has the table of keys).
"""
from __future__ import annotations

import time

import torch.distributed as dist

from paratrain.comm.elastic_membership import member_id, member_order, newest_per_slot
from paratrain.comm.heartbeat import LivenessTracker
from paratrain.errors import CommTimeout

DEFAULT_PREFIX = "elastic/"


def heartbeat_key(member: str) -> str:
    return f"hb/{member}"


def dead_key(member: str) -> str:
    return f"dead/{member}"


def elastic_store(store, prefix: str = DEFAULT_PREFIX) -> dist.Store:
    """The group's part of the job's store."""
    return dist.PrefixStore(prefix, store)


class MemberLiveness:
    """Which members are gone: the launcher said the process exited, a newer process
    holds its slot, or its heartbeat stood still for ``dead_after_s``."""

    def __init__(self, store: dist.Store, dead_after_s: float) -> None:
        self._store = store
        self._tracker = LivenessTracker(lambda m: int(self._store.add(heartbeat_key(m), 0)), dead_after_s)

    def gone(self, members, *, exclude: str | None = None) -> set[str]:
        members = set(members)
        newest = newest_per_slot(members)
        gone = {m for m in members if member_order(m)[1] < newest[member_order(m)[0]]}
        gone |= {m for m in members if self._store.check([dead_key(m)])}
        gone |= set(self._tracker.dead(sorted(members - gone - {exclude})))
        return gone


class ElasticWatch:
    """The launcher's half: it tells the group which processes are gone, turns a hang
    into a death, and hands vacant slots to warm spares.

    The launcher calls :meth:`report_exit` as soon as a worker process exited (before
    it starts a replacement) and SIGKILLs, by PID, every slot :meth:`hung` returns.
    """

    def __init__(self, store, dead_after_s: float, prefix: str = DEFAULT_PREFIX) -> None:
        self._store = elastic_store(store, prefix)
        self._liveness = LivenessTracker(lambda m: int(self._store.add(heartbeat_key(m), 0)), dead_after_s)

    def member(self, slot: int) -> str | None:
        """The newest process of ``slot`` (None before one started)."""
        count = int(self._store.add(f"slot/{slot}/incarnations", 0))
        return member_id(slot, count) if count else None

    def report_exit(self, slot: int) -> None:
        member = self.member(slot)
        if member is not None:
            self._store.set(dead_key(member), "1")

    def hung(self, slots: list[int]) -> list[int]:
        """Slots whose newest process has not beaten for ``dead_after_s`` (one that
        never beat is still starting and is not judged)."""
        members = {m: slot for slot in slots if (m := self.member(slot)) and not self._store.check([dead_key(m)])}
        return [members[m] for m in self._liveness.dead(sorted(members))]

    def assign_spare(self, spare_id: str, slot: int) -> None:
        """Give a dead worker's slot to the spare ``spare_id`` (after :meth:`report_exit`)."""
        self._store.set(f"spare/{spare_id}/slot", str(slot))

    def finished(self) -> bool:
        """Training is over (a member said so): waiting spares and joiners exit."""
        return self._store.check(["finished"])


def wait_for_vacancy(store, spare_id: str, *, timeout_s: float, poll_s: float = 0.05,
                     prefix: str = DEFAULT_PREFIX) -> int | None:
    """In a warm spare: block until the launcher hands it a slot; return the slot, or
    None once training finished. A spare imports, loads and builds everything before it
    waits, so a dead worker's replacement joins in the time of one rendezvous, not of a
    process start."""
    prefixed = elastic_store(store, prefix)
    key, deadline = f"spare/{spare_id}/slot", time.monotonic() + timeout_s
    while not prefixed.check([key]):
        if prefixed.check(["finished"]):
            return None
        if time.monotonic() > deadline:
            raise CommTimeout(f"spare {spare_id}: no vacancy within {timeout_s:.0f}s")
        time.sleep(poll_s)
    return int(prefixed.get(key))
