"""The Chrome trace writer: structure, lanes, atomic saves, per-rank files, merging."""
from __future__ import annotations

import json
import threading
import time

import pytest

from paratrain.errors import ConfigError
from paratrain.timeline import (NullTimeline, Timeline, build_timeline, merge_timelines,
                                      now, timeline_path)


def _spans(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def _thread_names(trace: dict) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name"}


def test_span_records_duration_category_and_args(tmp_path):
    timeline = Timeline(str(tmp_path / "t.json"), rank=0)
    with timeline.span("forward", "compute", step=3):
        time.sleep(0.01)
    (span,) = _spans(timeline.to_dict())
    assert span["name"] == "forward" and span["cat"] == "compute"
    assert span["args"] == {"step": 3}
    assert span["pid"] == 0
    assert 9_000 <= span["dur"] < 1_000_000  # microseconds
    assert _thread_names(timeline.to_dict())[span["tid"]] == "main"


def test_span_is_recorded_even_when_the_block_raises(tmp_path):
    timeline = Timeline(str(tmp_path / "t.json"), rank=0)
    with pytest.raises(RuntimeError):
        with timeline.span("backward", "compute"):
            raise RuntimeError("boom")
    assert [s["name"] for s in _spans(timeline.to_dict())] == ["backward"]


def test_comm_goes_to_its_own_thread_and_overlapping_buckets_get_lanes(tmp_path):
    timeline = Timeline(str(tmp_path / "t.json"), rank=1)
    t0 = now()
    timeline.complete("backward", "compute", t0, t0 + 1.0)
    timeline.complete("allreduce bucket 0", "comm", t0 + 0.2, t0 + 0.7, bucket=0)
    timeline.complete("allreduce bucket 1", "comm", t0 + 0.5, t0 + 1.2, bucket=1)  # overlaps bucket 0
    timeline.complete("allreduce bucket 2", "comm", t0 + 0.8, t0 + 1.3, bucket=2)  # after bucket 0
    trace = timeline.to_dict()
    names = _thread_names(trace)
    lanes = {s["name"]: names[s["tid"]] for s in _spans(trace)}
    assert lanes == {"backward": "main", "allreduce bucket 0": "comm",
                     "allreduce bucket 1": "comm #2", "allreduce bucket 2": "comm"}
    assert all(s["pid"] == 1 for s in _spans(trace))
    process = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
    assert process == [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0,
                        "args": {"name": "rank 1"}}]


def test_complete_from_other_threads_is_safe(tmp_path):
    timeline = Timeline(str(tmp_path / "t.json"), rank=0)

    def record(index: int) -> None:
        for _ in range(200):
            start = now()
            timeline.complete(f"key {index}", "comm", start, start + 1e-6)

    workers = [threading.Thread(target=record, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert len(_spans(timeline.to_dict())) == 800


def test_save_writes_valid_json_atomically_and_can_repeat(tmp_path):
    path = tmp_path / "sub" / "trace.json"
    timeline = Timeline(str(path), rank=0)
    timeline.instant("epoch 0", "compute")
    assert timeline.save() == str(path)
    first = json.loads(path.read_text())
    with timeline.span("step", "compute"):
        pass
    timeline.save()
    second = json.loads(path.read_text())
    assert len(second["traceEvents"]) == len(first["traceEvents"]) + 1
    assert [p.name for p in path.parent.iterdir()] == ["trace.json"]  # no temp files left
    instant = [e for e in second["traceEvents"] if e["ph"] == "i"]
    assert instant[0]["name"] == "epoch 0" and instant[0]["s"] == "t"


def test_per_rank_files_and_merge_give_one_track_per_rank(tmp_path):
    base = str(tmp_path / "trace.json")
    for rank in range(3):
        timeline = build_timeline(base, rank)
        with timeline.span("forward", "compute"):
            pass
        assert timeline.save() == timeline_path(base, rank)
    assert timeline_path(base, 0) == base and timeline_path(base, 2) == base + ".rank2"
    merged = json.loads(open(merge_timelines(base, str(tmp_path / "all.json"))).read())
    assert sorted({s["pid"] for s in _spans(merged)}) == [0, 1, 2]
    assert merged["otherData"]["ranks"] == 3


def test_ranks_on_one_machine_share_a_time_axis(tmp_path):
    first, second = Timeline(str(tmp_path / "a"), 0), Timeline(str(tmp_path / "b"), 1)
    t = now()
    first.complete("x", "compute", t, t)
    second.complete("x", "compute", t, t)
    assert abs(_spans(first.to_dict())[0]["ts"] - _spans(second.to_dict())[0]["ts"]) < 5_000


def test_max_events_bounds_memory_and_counts_the_rest(tmp_path):
    timeline = Timeline(str(tmp_path / "t.json"), rank=0, max_events=10)
    for _ in range(50):
        timeline.instant("tick", "data")
    trace = timeline.to_dict()
    assert len(trace["traceEvents"]) == 10
    assert trace["otherData"]["dropped_events"] > 0


def test_bad_input_is_rejected_with_a_clear_message(tmp_path):
    timeline = Timeline(str(tmp_path / "t.json"), rank=0)
    with pytest.raises(ConfigError, match="cat='network'"):
        timeline.complete("x", "network", 0.0, 1.0)
    with pytest.raises(ValueError, match="end_s=1.0 is before start_s=2.0"):
        timeline.complete("x", "comm", 2.0, 1.0)
    with pytest.raises(ValueError, match="rank=-1"):
        Timeline(str(tmp_path / "t.json"), rank=-1)
    with pytest.raises(ValueError, match="path=''"):
        Timeline("", rank=0)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        merge_timelines(str(tmp_path / "missing.json"), str(tmp_path / "out.json"))


def test_null_timeline_has_the_same_methods_and_writes_nothing(tmp_path):
    null = build_timeline(None, rank=0)
    assert isinstance(null, NullTimeline) and not null.enabled
    with null.span("forward", "compute", step=1):
        pass
    null.complete("bucket", "comm", 0.0, 1.0, tid="comm")
    null.instant("epoch", "compute")
    assert null.save() is None and list(tmp_path.iterdir()) == []
    assert isinstance(build_timeline(str(tmp_path / "t.json"), rank=0), Timeline)
    public = {name for name in dir(Timeline) if not name.startswith("_")}
    assert public <= set(dir(NullTimeline))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_worker_allreduce_run_has_a_track_per_rank_and_comm_overlapping_backward(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    base = tmp_path / "trace.json"
    result = subprocess.run(
        [sys.executable, "-m", "paratrain.cli", "train", "--workers", "2", "--strategy", "allreduce",
         "--model", "mlp", "--epochs", "1", "--no-progress", "--timeline", str(base)],
        capture_output=True, text=True, timeout=200, cwd=root,
        env={**os.environ, "PARATRAIN_TIMEOUT": "60", "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    merged = json.loads(pathlib.Path(merge_timelines(str(base), str(tmp_path / "all.json"))).read_text())
    spans = _spans(merged)
    assert sorted({s["pid"] for s in spans}) == [0, 1]  # one track per rank
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in merged["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    for rank in (0, 1):
        mine = [s for s in spans if s["pid"] == rank]
        backward = [s for s in mine if s["name"] == "backward"]
        comm = [s for s in mine if s["cat"] == "comm"]
        assert len(backward) == 23 and len([s for s in mine if s["name"] == "forward"]) == 23
        assert len([s for s in mine if s["name"] == "optimizer"]) == 23
        assert comm and all(names[(rank, s["tid"])].startswith("comm") for s in comm)
        assert all(names[(rank, s["tid"])] == "main" for s in backward)
        assert all(s["args"].get("bytes", 0) > 0 for s in comm)
        # every step's allreduce is launched from a backward hook, so it starts while that
        # step's backward is still running: communication overlaps backward
        # (one or more buckets per step: the MLP's 4 MB weight closes a bucket of its own)
        overlapped = [b for b in backward if any(b["ts"] < c["ts"] < b["ts"] + b["dur"] for c in comm)]
        assert len(overlapped) == len(backward), (len(overlapped), len(backward))
        # and, as in DDP, the step's sums are complete when its backward returns (so
        # whatever reads the gradients next sees them on every rank): the comm spans end
        # within their backward, whose last part is the "gradient wait" for the buckets
        waits = [s for s in mine if s["name"] == "gradient wait"]
        for b in backward:
            inside = [c for c in comm if b["ts"] < c["ts"] < b["ts"] + b["dur"]]
            assert all(c["ts"] + c["dur"] <= b["ts"] + b["dur"] + 1.0 for c in inside), (b, inside)
            assert any(b["ts"] <= w["ts"] and w["ts"] + w["dur"] <= b["ts"] + b["dur"] + 1.0 for w in waits), b
