"""Liveness through the job's store: heartbeat counters and who stopped beating.

A process counts a store key up once a second from a daemon thread
(:class:`HeartbeatSender`); a watcher reads the counters (:class:`LivenessTracker`)
and calls a process dead when its counter has not moved for ``dead_after_s`` seconds
by the watcher's own clock. Counters, not timestamps, so clocks of different hosts
never need to agree. Users: the parameter server (a parked ``dist_sync`` pull fails
at once naming the dead worker, instead of after the full network timeout; workers
beat under :func:`heartbeat_key`) and elastic data parallelism
(:mod:`paratrain.comm.elastic`).
"""
from __future__ import annotations

import atexit
import threading
import time
from typing import Callable, Hashable

HEARTBEAT_EVERY_S = 1.0
DEAD_AFTER_S = 5.0


def heartbeat_key(rank: int) -> str:
    """The key a parameter-server client (worker ``rank``) beats under."""
    return f"ps/heartbeat/{rank}"


class HeartbeatSender:
    """A daemon thread that counts ``key`` up every ``every_s`` seconds."""

    def __init__(self, store, key: str, every_s: float = HEARTBEAT_EVERY_S):
        self._store, self._key, self._every_s = store, key, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {key}", daemon=True)

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
    """Which processes stopped beating. ``read_count(name)`` returns a process's counter
    (0: it never beat, so it is not judged); ``clock`` is the watcher's monotonic time.
    Names are worker ranks for the parameter server, member ids for elastic groups."""

    def __init__(self, read_count: Callable[[Hashable], int], dead_after_s: float = DEAD_AFTER_S,
                 clock: Callable[[], float] = time.monotonic):
        if not dead_after_s > 0:
            raise ValueError(f"dead_after_s={dead_after_s} must be > 0")
        self._read_count, self.dead_after_s, self._clock = read_count, dead_after_s, clock
        self._seen: dict[Hashable, tuple[int, float]] = {}   # name -> (count, when it last changed)

    def dead(self, names: list) -> list:
        """The names among ``names`` whose counter has not moved for ``dead_after_s``."""
        now, dead = self._clock(), []
        for name in names:
            count = self._read_count(name)
            previous = self._seen.get(name)
            if previous is None or previous[0] != count:
                self._seen[name] = (count, now)
            elif count > 0 and now - previous[1] >= self.dead_after_s:
                dead.append(name)
        return dead
