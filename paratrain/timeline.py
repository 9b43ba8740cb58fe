"""Chrome trace timelines: where each rank's time goes.

``paratrain train --timeline FILE`` gives every rank a :class:`Timeline`; the fit loop
and the gradient syncs record spans into it, and ``save()`` writes a Chrome trace
(``{"traceEvents": [...]}``) that opens in chrome://tracing or https://ui.perfetto.dev.

* one file per rank: ``FILE`` for rank 0, ``FILE.rank<r>`` for rank r (callers name
  it with :func:`timeline_path`); :func:`merge_timelines` joins them into one file;
* one track (trace ``pid``) per rank, so merged files show the ranks one above the
  other;
* threads inside a track: ``main`` for what the training loop itself does
  (categories ``compute``, ``data``, ``wait``) and ``comm`` for communication, which
  runs while the loop goes on. Communication spans that overlap each other (two
  buckets in flight) go to extra lanes ``comm #2``, ``comm #3``..., because trace
  viewers only draw properly nested spans on one thread.

Times are ``time.perf_counter()`` seconds (use :func:`now`), shifted onto the wall
clock so that the files of ranks on one machine line up.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from typing import Any, Iterator

from paratrain.atomic import write_json_atomic
from paratrain.errors import check_choice

CATEGORIES = ("compute", "comm", "data", "wait")
MAIN_THREAD = "main"
COMM_THREAD = "comm"
DEFAULT_MAX_EVENTS = 1_000_000

# Which thread a category lands on when the caller names none: communication runs
# beside the loop, everything else is the loop itself.
_THREAD_OF_CATEGORY = {"compute": MAIN_THREAD, "data": MAIN_THREAD, "wait": MAIN_THREAD,
                       "comm": COMM_THREAD}


def now() -> float:
    """The clock that :meth:`Timeline.complete` expects (``time.perf_counter``)."""
    return time.perf_counter()


def timeline_path(path: str, rank: int) -> str:
    """The file rank ``rank`` writes: ``path`` itself for rank 0, ``path.rank<r>`` else."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank={rank!r} must be an integer >= 0")
    return path if rank == 0 else f"{path}.rank{rank}"


class Timeline:
    """Records spans for one rank and writes them as a Chrome trace.

    ``span()`` times a block on the calling thread; ``complete()`` records a span
    measured elsewhere (a bucket's allreduce, from launch to completion) and may be
    called from any thread.
    """

    enabled = True

    def __init__(self, path: str, rank: int, *, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"timeline path={path!r} must be a non-empty file path")
        if not isinstance(max_events, int) or max_events < 1:
            raise ValueError(f"max_events={max_events!r} must be an integer >= 1")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"rank={rank!r} must be an integer >= 0")
        self.rank = rank
        self.path = os.fspath(path)  # the caller picks the per-rank name (timeline_path)
        self._max_events = max_events
        self._events: list[dict] = []
        self._dropped = 0
        self._lock = threading.Lock()
        self._thread_ids: dict[str, int] = {}
        # (start_us, end_us) of spans recorded per thread lane, to keep lanes nested.
        self._lane_spans: dict[str, list[tuple[float, float]]] = {}
        # perf_counter is precise but has an arbitrary origin; anchor it to the wall
        # clock once so ranks on one machine share a time axis.
        self._wall_minus_perf_us = (time.time() - time.perf_counter()) * 1e6
        self._add_metadata("process_name", self._thread_id(MAIN_THREAD), name=f"rank {rank}")
        self._add_metadata("process_sort_index", self._thread_id(MAIN_THREAD), sort_index=rank)
        self._thread_id(COMM_THREAD)  # comm track is listed even before its first span

    # -- recording -------------------------------------------------------------

    @contextlib.contextmanager
    def span(self, name: str, cat: str, *, thread: str | None = None, **args: Any) -> Iterator[None]:
        """Time the ``with`` block as one span of category ``cat``."""
        check_choice("cat", cat, CATEGORIES)
        start_s = now()
        try:
            yield
        finally:
            self.complete(name, cat, start_s, now(), tid=thread, **args)

    def complete(self, name: str, cat: str, start_s: float, end_s: float, *,
                 tid: int | str | None = None, **args: Any) -> None:
        """Record a span from ``start_s`` to ``end_s`` (:func:`now` seconds).

        ``tid`` picks the thread: a name (``"comm"``), an int (``comm #<n>``-style
        lanes are created as needed) or None for the category's default thread.
        """
        check_choice("cat", cat, CATEGORIES)
        if end_s < start_s:
            raise ValueError(f"span {name!r}: end_s={end_s} is before start_s={start_s}")
        start_us = start_s * 1e6 + self._wall_minus_perf_us
        duration_us = (end_s - start_s) * 1e6
        thread = _THREAD_OF_CATEGORY[cat] if tid is None else str(tid)
        event = {"name": name, "cat": cat, "ph": "X", "ts": start_us, "dur": duration_us,
                 "pid": self.rank, "args": args}
        with self._lock:
            lane = self._free_lane(thread, start_us, start_us + duration_us)
            event["tid"] = self._thread_id(lane)
            self._append(event)

    def instant(self, name: str, cat: str, *, thread: str | None = None, **args: Any) -> None:
        """Record a point in time (a checkpoint written, an epoch boundary)."""
        check_choice("cat", cat, CATEGORIES)
        thread = _THREAD_OF_CATEGORY[cat] if thread is None else thread
        event = {"name": name, "cat": cat, "ph": "i", "s": "t",
                 "ts": now() * 1e6 + self._wall_minus_perf_us, "pid": self.rank, "args": args}
        with self._lock:
            event["tid"] = self._thread_id(thread)
            self._append(event)

    # -- output ----------------------------------------------------------------

    def to_dict(self) -> dict:
        """The trace as a JSON-ready dict."""
        with self._lock:
            events = list(self._events)
            dropped = self._dropped
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"rank": self.rank, "dropped_events": dropped}}

    def save(self) -> str:
        """Write the trace to :attr:`path` atomically; may be called more than once.
        Returns the path written."""
        write_json_atomic(self.path, self.to_dict())
        return self.path

    # -- internals -------------------------------------------------------------

    def _append(self, event: dict) -> None:
        # A bound on memory: a long run keeps its first events and counts the rest.
        if len(self._events) >= self._max_events:
            self._dropped += 1
        else:
            self._events.append(event)

    def _thread_id(self, thread: str) -> int:
        if thread not in self._thread_ids:
            tid = len(self._thread_ids)
            self._thread_ids[thread] = tid
            self._add_metadata("thread_name", tid, name=thread)
            self._add_metadata("thread_sort_index", tid, sort_index=tid)
        return self._thread_ids[thread]

    def _add_metadata(self, kind: str, tid: int, **args: Any) -> None:
        self._events.append({"name": kind, "ph": "M", "pid": self.rank, "tid": tid, "args": args})

    def _free_lane(self, thread: str, start_us: float, end_us: float) -> str:
        """The first lane of ``thread`` where this span nests with every span there."""
        index = 1
        while True:
            lane = thread if index == 1 else f"{thread} #{index}"
            spans = self._lane_spans.setdefault(lane, [])
            if all(_nested_or_disjoint(start_us, end_us, s, e) for s, e in spans[-64:]):
                spans.append((start_us, end_us))
                return lane
            index += 1


def _nested_or_disjoint(a_start: float, a_end: float, b_start: float, b_end: float) -> bool:
    disjoint = a_end <= b_start or b_end <= a_start
    nested = (a_start >= b_start and a_end <= b_end) or (b_start >= a_start and b_end <= a_end)
    return disjoint or nested


class NullTimeline:
    """A timeline that records nothing: the default when ``--timeline`` is not given,
    so callers never branch on whether tracing is on."""

    enabled = False
    path = None

    def __init__(self, path: str | None = None, rank: int = 0, **_: Any) -> None:
        self.rank = rank

    def span(self, name: str, cat: str, *, thread: str | None = None, **args: Any):
        return _NOTHING

    def complete(self, name: str, cat: str, start_s: float, end_s: float, *,
                 tid: int | str | None = None, **args: Any) -> None:
        pass

    def instant(self, name: str, cat: str, *, thread: str | None = None, **args: Any) -> None:
        pass

    def to_dict(self) -> dict:
        return {"traceEvents": []}

    def save(self) -> None:
        return None


_NOTHING = contextlib.nullcontext()
#: The timeline every component records into unless it is given a real one.
NULL_TIMELINE = NullTimeline()


def build_timeline(path: str | None, rank: int) -> Timeline | NullTimeline:
    """Rank ``rank``'s :class:`Timeline` for ``--timeline path`` (it writes
    :func:`timeline_path`), or a :class:`NullTimeline` when ``path`` is None."""
    return NullTimeline(rank=rank) if path is None else Timeline(timeline_path(path, rank), rank)


def merge_timelines(path: str, out_path: str) -> str:
    """Join ``path`` and its ``path.rank<r>`` siblings into one trace at ``out_path``,
    one track per rank. Returns ``out_path``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"timeline {path!r} does not exist (rank 0 writes it)")
    events: list[dict] = []
    rank = 0
    while os.path.exists(timeline_path(path, rank)):
        with open(timeline_path(path, rank)) as handle:
            events.extend(json.load(handle)["traceEvents"])
        rank += 1
    write_json_atomic(out_path, {"traceEvents": events, "displayTimeUnit": "ms",
                                      "otherData": {"ranks": rank}})
    return out_path


if __name__ == "__main__":  # python -m paratrain.timeline FILE OUT
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m paratrain.timeline FILE OUT  (merge FILE, FILE.rank1, ... into OUT)")
    print(merge_timelines(sys.argv[1], sys.argv[2]))
