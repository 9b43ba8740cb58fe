"""Requests a parameter server cannot answer yet, parked with a deadline.

A sync pull waits for its round, an ssp pull for the slowest worker, an init for
rank 0's value, a barrier for every worker. Each is parked here with a deadline;
the server asks which ones are due (:meth:`ParkedRequests.due`) and answers them
with an error naming whom they waited for, so nothing waits forever.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from paratrain.ps.protocol import Message

PULL, INIT = "pull", "init"


@dataclass
class Waiter:
    """A request parked until it can be answered."""

    peer: bytes
    message: Message
    rank: int
    deadline: float


class ParkedRequests:
    """Parked pulls and inits per key, and barriers per generation."""

    def __init__(self) -> None:
        self.pulls: dict[str, list[Waiter]] = defaultdict(list)
        self.inits: dict[str, list[Waiter]] = defaultdict(list)
        self.barriers: dict[int, dict[int, Waiter]] = defaultdict(dict)

    def due(self, now: float) -> list[tuple[str, str, Waiter]]:
        """Remove and return ``(kind, key, waiter)`` for every pull and init whose
        deadline has passed."""
        due = []
        for kind, table in ((PULL, self.pulls), (INIT, self.inits)):
            for key, waiters in list(table.items()):
                for waiter in [w for w in waiters if w.deadline <= now]:
                    waiters.remove(waiter)
                    due.append((kind, key, waiter))
                if not waiters:
                    del table[key]
        return due

    def arrive(self, generation: int, waiter: Waiter, num_workers: int, excused=frozenset()) -> list[Waiter]:
        """Park ``waiter`` at barrier ``generation``; when every worker but the
        ``excused`` ones has arrived, the barrier is released and its waiters returned."""
        self.barriers[generation][waiter.rank] = waiter
        return self.release(generation, num_workers, excused)

    def release(self, generation: int, num_workers: int, excused=frozenset()) -> list[Waiter]:
        """Release barrier ``generation`` if nobody it waits for is missing any more."""
        arrived = self.barriers.get(generation, {})
        if not arrived or set(range(num_workers)) - set(arrived) - set(excused):
            return []
        del self.barriers[generation]
        return list(arrived.values())

    def due_barriers(self, now: float, num_workers: int) -> list[tuple[int, list[int], list[Waiter]]]:
        """Remove and return ``(generation, missing ranks, waiters)`` for every barrier
        one of whose waiters is past its deadline."""
        due = []
        for generation, arrived in list(self.barriers.items()):
            if any(w.deadline <= now for w in arrived.values()):
                missing = sorted(set(range(num_workers)) - set(arrived))
                due.append((generation, missing, list(arrived.values())))
                del self.barriers[generation]
        return due
