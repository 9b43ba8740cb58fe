"""Shared test helpers: run the CLI or a launched script as real processes, with a
hard timeout (or in this process, for what is refused before anything starts), overlap a
reference run with the run under test, and parse the --json summary."""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def clean_env(**extra: str) -> dict:
    """The test process's environment without launcher variables (tests run under
    pytest, not under a launcher), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
           and not k.startswith(("PARATRAIN_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def cli_in_process(*argv: str) -> tuple[int, str, str]:
    """``paratrain ARGV`` in this process: (exit code, stdout, stderr). For what is
    refused before anything starts, where a new interpreter would cost a few seconds."""
    import contextlib
    import io

    from paratrain import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:   # argparse's own errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def run_paratrain(*args: str, timeout: float = 120, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m paratrain.cli ARGS`` to completion (killed after ``timeout``)."""
    return subprocess.run([sys.executable, "-m", "paratrain.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env(), cwd=cwd or REPO)


_BACKGROUND = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-background")


def in_background(fn, *args, **kwargs) -> concurrent.futures.Future:
    """Call ``fn(*args, **kwargs)`` on a thread while the test goes on, so that a
    reference run overlaps the run under test (most of either is waiting: process
    start-up, step delays, restarts). ``fn`` must bound itself in time, as
    ``run_paratrain`` does with its timeout."""
    return _BACKGROUND.submit(fn, *args, **kwargs)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    """The --json summary: the last JSON object printed."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    found = json_objects(result.stdout)
    assert found, f"no JSON summary in stdout:\n{result.stdout[-3000:]}"
    return found[-1]


def json_objects(text: str) -> list[dict]:
    """Every JSON object printed in ``text``, in order, wherever it lies on its line.
    Processes that share one unbuffered stdout write an object and its newline in two
    writes, so another process's line can land between them."""
    decoder, found, at = json.JSONDecoder(), [], text.find('{"')
    while at >= 0:
        try:
            obj, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            end = at + 1
        else:
            found.append(obj)
        at = text.find('{"', end)
    return found


def newest_checkpoint(directory, shard: str = "model") -> dict:
    """The newest sealed checkpoint of ``shard`` in ``directory``, verified and loaded."""
    from paratrain.train import checkpoint
    return checkpoint.load_entry(directory, checkpoint.read_manifest(directory, shard).entries[0])


@pytest.fixture
def paratrain_cli():
    return run_paratrain


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(target, world: int, timeout: float, *args) -> list:
    """Start ``world`` spawned processes running ``target(rank, world, port, queue, *args)``;
    return their results in rank order. Kills (by PID) whatever is left at the end."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, world, port, queue, *args), daemon=True)
             for rank in range(world)]
    for proc in procs:
        proc.start()
    results = {}
    try:
        deadline = time.monotonic() + timeout
        while len(results) < world:
            rank, value = queue.get(timeout=max(deadline - time.monotonic(), 0.1))
            results[rank] = value
        for proc in procs:
            proc.join(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)
    return [results[rank] for rank in range(world)]


def children_running(launcher_pid: int, marker: bytes = b"paratrain.cli") -> list[int]:
    """Children of a launcher we started whose command line contains ``marker``
    (default: paratrain workers), so tests kill only their own processes by PID."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    pids = []
    for pid in map(int, children):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except FileNotFoundError:
            pass
    return pids


def run_with_kills(cmd: list[str], kills_at: list[int], expected: int, rng, *, progress,
                   marker: bytes = b"paratrain.cli") -> tuple[list[str], str, int, list[int]]:
    """Run the launcher ``cmd``; each time ``progress(line)`` (rank 0's step, or None
    for other lines) reaches ``kills_at[0]`` while ``expected`` children matching
    ``marker`` run, SIGKILL one of them at random (by PID). Bounded: the launcher is
    killed if it has not ended 60 s after its output closed.
    Returns (stdout lines, stderr, returncode, the steps at which it killed)."""
    kills_at = list(kills_at)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    lines, kills = [], []
    try:
        for line in proc.stdout:
            lines.append(line)
            step = progress(line)
            if step is not None and kills_at and step >= kills_at[0]:
                victims = children_running(proc.pid, marker)
                if len(victims) == expected:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                    kills.append(step)
                    kills_at.pop(0)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return lines, proc.stderr.read(), proc.returncode, kills


def worker_pids_of(line: str, pids: dict[int, int]) -> None:
    """Track ``paratrain launch: rank R runs as pid P`` lines (elastic jobs) into ``pids``."""
    if line.startswith("paratrain launch: rank ") and " runs as pid " in line:
        rank, pid = line.split("rank ", 1)[1].split(" runs as pid ")
        pids[int(rank)] = int(pid)


def run_with_elastic_kills(cmd: list[str], kills_at: list[int], rng, *, progress, signal_name: str = "KILL",
                           timeout: float = 300) -> tuple[list[str], str, int, list[dict]]:
    """Run an elastic launcher ``cmd`` (``--min-workers``); each time ``progress(line)``
    (rank 0's step) reaches ``kills_at[0]``, send a random worker (never an idle spare)
    SIGKILL or SIGSTOP by PID. Returns (stdout lines, stderr, returncode, kills as
    ``{"step", "rank", "pid", "t"}``). Bounded by ``timeout``."""
    import threading
    kills_at, pids, kills = list(kills_at), {}, []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            worker_pids_of(line, pids)
            step = progress(line)
            if step is not None and kills_at and step >= kills_at[0]:
                rank = rng.choice(sorted(pids))
                os.kill(pids[rank], getattr(signal, f"SIG{signal_name}"))
                kills.append({"step": step, "rank": rank, "pid": pids.pop(rank), "t": time.time()})
                kills_at.pop(0)
        proc.wait(timeout=60)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return lines, proc.stderr.read(), proc.returncode, kills


@pytest.fixture
def job():
    """``job(num_servers=2, **server_options)`` makes a ``ps_harness.InprocJob``: servers
    on threads over the inproc transport; every one made is closed after the test."""
    from ps_harness import InprocJob
    made = []

    def make(num_servers=2, **kwargs):
        made.append(InprocJob(num_servers, **kwargs))
        return made[-1]
    yield make
    for j in made:
        j.close()
