"""What a gloo process group on this torch does when a peer dies or hangs: the facts
paratrain.comm.elastic is built on, as a probe to rerun on a new torch release.

  python bench/gloo_failure_probe.py                 # every scenario
  python bench/gloo_failure_probe.py kill stop       # some of them

Each scenario spawns ``world`` processes on loopback that share a TCP store hosted
here, runs a few allreduces in a ``ProcessGroupGloo``, then SIGKILLs or SIGSTOPs the
last rank (by PID) 0.3 s after the others began to wait in an allreduce, and prints
one JSON line per observation (seconds from the start of that wait, so 0.34 means
40 ms after the signal; the exception verbatim, first line).

| scenario | what it shows |
|---|---|
| kill | SIGKILL: how fast the survivors' collective fails; a new group on a fresh prefix works |
| kill4 | 4 ranks: a rank not next to the dead one in the ring waits until the timeout |
| kill4_release | the same, but the failing ranks drop their group: everyone fails at once |
| stop | SIGSTOP: nothing fails before gloo's timeout |
| stopkill | SIGSTOP, then SIGKILL 3 s later: the survivors fail as soon as it is killed |
| destroy_pending | dropping a group whose collective is pending blocks until it ends |
| abort, shutdown | ``Backend.abort()`` / ``shutdown()``: do they end a pending collective? |
| queued | four async allreduces queued when the peer dies: do all fail? |
| new_group | the default group, and ``dist.new_group`` after a failure |
| dist_api | ``dist.all_reduce(t, group=ProcessGroupGloo(...))`` without a default group |
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

SCENARIOS = {   # name: (world, signal to the last rank, gloo timeout s)
    "kill": (3, "KILL", 20), "kill4": (4, "KILL", 20), "kill4_release": (4, "KILL", 20), "stop": (3, "STOP", 8),
    "stopkill": (3, "STOP", 20), "destroy_pending": (3, "STOP", 15), "abort": (4, "STOP", 15),
    "shutdown": (4, "STOP", 15), "queued": (3, "KILL", 20), "new_group": (3, "KILL", 20), "dist_api": (3, "KILL", 20),
}


def _log(scenario: str, rank: int, **fields) -> None:
    print(json.dumps({"scenario": scenario, "rank": rank, **fields}), flush=True)


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:220]}"


def _drop_in_thread(holder: list, timeout: float) -> tuple[bool, float]:
    tic = time.monotonic()
    thread = threading.Thread(target=holder.clear, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), round(time.monotonic() - tic, 3)


def _worker(scenario: str, rank: int, world: int, port: int, timeout_s: float, pids) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=30))
    timeout = timedelta(seconds=timeout_s)
    if scenario == "new_group":
        dist.init_process_group("gloo", store=dist.PrefixStore("default/", store), rank=rank, world_size=world,
                                timeout=timeout)
        pg = None
    else:
        pg = dist.ProcessGroupGloo(dist.PrefixStore("first/", store), rank, world, timeout)
    if rank == 0 and pg is not None:
        _log(scenario, rank, supports_shrinking=pg.supports_shrinking)
    pids.put((rank, os.getpid()))
    tensor = torch.ones(1000)
    for _ in range(3):
        dist.all_reduce(tensor, group=pg)
    store.add("ready", 1)
    while not store.check(["signalled"]):
        time.sleep(0.01)
    if rank == world - 1:
        time.sleep(3600)   # the victim: killed or stopped by the parent
    groups = [pg]   # the only reference from here on, so that dropping it closes the group
    del pg
    if scenario in ("destroy_pending", "abort", "shutdown"):
        _pending(scenario, rank, groups, tensor, timeout_s)
    elif scenario == "queued":
        tic = time.monotonic()
        works = [groups[0].allreduce([torch.ones(100_000)]) for _ in range(4)]
        for index, work in enumerate(works):
            try:
                work.wait()
                _log(scenario, rank, work=index, result="ok")
            except RuntimeError as exc:
                _log(scenario, rank, work=index, failed_after_s=round(time.monotonic() - tic, 3), error=_error(exc))
    else:
        _fail_then_regroup(scenario, rank, world, groups, store, tensor, timeout_s)
    os._exit(0)


def _fail_then_regroup(scenario, rank, world, groups, store, tensor, timeout_s) -> None:
    import torch
    import torch.distributed as dist

    tic = time.monotonic()
    try:
        dist.all_reduce(tensor, group=groups[0])
        _log(scenario, rank, result="allreduce completed")
    except RuntimeError as exc:
        _log(scenario, rank, failed_after_s=round(time.monotonic() - tic, 3), error=_error(exc))
    if scenario == "kill4_release":
        groups.clear()   # drop the failed group: its sockets close
    if scenario == "new_group":
        for local in (True, False):
            tic = time.monotonic()
            try:
                group = dist.new_group(list(range(world - 1)), use_local_synchronization=local,
                                       timeout=timedelta(seconds=8))
                dist.all_reduce(tensor, group=group)
                _log(scenario, rank, new_group=f"use_local_synchronization={local}", result="ok",
                     seconds=round(time.monotonic() - tic, 3))
            except RuntimeError as exc:
                _log(scenario, rank, new_group=f"use_local_synchronization={local}", error=_error(exc))
        return
    tic = time.monotonic()
    second = dist.ProcessGroupGloo(dist.PrefixStore("second/", store), rank, world - 1, timedelta(seconds=timeout_s))
    small = torch.ones(10)
    second.allreduce([small]).wait()
    _log(scenario, rank, new_group_built_s=round(time.monotonic() - tic, 3), new_group_sum=float(small[0]))
    if scenario == "dist_api":
        dist.all_reduce(small, group=second)
        _log(scenario, rank, dist_all_reduce_on_bare_group=float(small[0]), default_group=dist.is_initialized())
    if groups:
        returned, seconds = _drop_in_thread(groups, 30)
        _log(scenario, rank, dropped_failed_group=returned, seconds=seconds)


def _pending(scenario, rank, groups, tensor, timeout_s) -> None:
    work = groups[0].allreduce([tensor])
    time.sleep(1.0)
    if rank == 0:
        if scenario == "destroy_pending":
            groups.append(work)
            del work
            returned, seconds = _drop_in_thread(groups, timeout_s + 10)
            _log(scenario, rank, dropped_group_with_pending_work=returned, seconds=seconds)
            return
        tic = time.monotonic()
        getattr(groups[0], scenario)()
        _log(scenario, rank, call=f"{scenario}()", returned_after_s=round(time.monotonic() - tic, 3))
    tic = time.monotonic()
    try:
        work.wait()
        _log(scenario, rank, pending_work="completed")
    except RuntimeError as exc:
        _log(scenario, rank, pending_work_failed_after_s=round(time.monotonic() - tic, 3), error=_error(exc))


def run(scenario: str) -> None:
    import torch.distributed as dist

    world, how, timeout_s = SCENARIOS[scenario]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    pids = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(scenario, rank, world, port, timeout_s, pids), daemon=True)
             for rank in range(world)]
    for proc in procs:
        proc.start()
    try:
        by_rank = dict(pids.get(timeout=120) for _ in range(world))
        deadline = time.monotonic() + 60
        while store.add("ready", 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
        store.set("signalled", "1")
        time.sleep(0.3)   # the others are inside their collective now
        victim = by_rank[world - 1]
        os.kill(victim, signal.SIGKILL if how == "KILL" else signal.SIGSTOP)
        _log(scenario, world - 1, parent=f"SIG{how} rank {world - 1}")
        if scenario == "stopkill":
            time.sleep(3)
            os.kill(victim, signal.SIGKILL)
            _log(scenario, world - 1, parent=f"SIGKILL rank {world - 1}, 3 s after SIGSTOP")
        for proc in procs[:-1]:
            proc.join(timeout_s + 40)
    finally:
        for proc in procs:   # only the processes started here
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)


if __name__ == "__main__":
    for name in sys.argv[1:] or list(SCENARIOS):
        run(name)
