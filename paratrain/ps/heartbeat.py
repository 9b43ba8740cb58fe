"""Dead-worker detection for the parameter server: heartbeats through the job's store.

Every worker counts a store key up once a second (``ps/heartbeat/<rank>``) from a
daemon thread. A server that parks a ``dist_sync`` (or ``dist_ssp``) pull waiting for
some workers checks their counters; one that has not moved for ``dead_after_s``
seconds, by the server's own clock, is dead, and the parked pulls fail at once with
an error naming it, instead of after the full network timeout. Counters, not
timestamps, so clocks of different hosts never need to agree.
"""
from __future__ import annotations

import atexit
import threading
import time
from typing import Callable

HEARTBEAT_EVERY_S = 1.0
DEAD_AFTER_S = 5.0


def heartbeat_key(rank: int) -> str:
    return f"ps/heartbeat/{rank}"


class HeartbeatSender:
    """A daemon thread that counts ``heartbeat_key(rank)`` up every ``every_s`` seconds."""

    def __init__(self, store, rank: int, every_s: float = HEARTBEAT_EVERY_S):
        self._store, self._key, self._every_s = store, heartbeat_key(rank), every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{rank}", daemon=True)

    def start(self) -> "HeartbeatSender":
        self._thread.start()
        # A thread still inside a store call while the interpreter shuts down aborts
        # the process: stop it first, even when nobody closed the kvstore.
        atexit.register(self.stop)
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._store.add(self._key, 1)
            except Exception:   # store unreachable (partition) or gone: try again later
                pass
            self._stop.wait(self._every_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self._every_s)
        atexit.unregister(self.stop)


class LivenessTracker:
    """Which workers stopped beating. ``read_count(rank)`` returns a worker's counter
    (0: it never beat, so it is not judged); ``clock`` is the server's monotonic time."""

    def __init__(self, read_count: Callable[[int], int], dead_after_s: float = DEAD_AFTER_S,
                 clock: Callable[[], float] = time.monotonic):
        if not dead_after_s > 0:
            raise ValueError(f"dead_after_s={dead_after_s} must be > 0")
        self._read_count, self.dead_after_s, self._clock = read_count, dead_after_s, clock
        self._seen: dict[int, tuple[int, float]] = {}   # rank -> (count, when it last changed)

    def dead(self, ranks: list[int]) -> list[int]:
        """The ranks among ``ranks`` whose counter has not moved for ``dead_after_s``."""
        now, dead = self._clock(), []
        for rank in ranks:
            count = self._read_count(rank)
            previous = self._seen.get(rank)
            if previous is None or previous[0] != count:
                self._seen[rank] = (count, now)
            elif count > 0 and now - previous[1] >= self.dead_after_s:
                dead.append(rank)
        return dead
