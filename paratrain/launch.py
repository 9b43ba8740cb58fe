"""Start N worker processes (and M parameter servers) on this machine with the
torchrun environment, prefix their output with their rank, and fail fast.

The launcher hosts the job's TCP store (``MASTER_ADDR:MASTER_PORT`` on a free port,
listening on ``MASTER_ADDR`` only: loopback for a one-machine job), so workers and
servers are all clients of it. When a worker or a server dies, the others are stopped
within seconds and the launcher exits non-zero, naming the process, how it died and
the last line it printed (its own error); with ``max_restarts`` it instead restarts
the worker group (with fresh parameter servers) and bumps
``TORCHELASTIC_RESTART_COUNT``, which keys the process group's store; or, with
``restart_policy="worker"`` (async training), the dead worker alone. A process that
exits with status 2 reported a usage error (one line): restarting cannot fix it, so the
launcher ends the job with status 2 at once.

The job secret (every CURVE key of the job derives from it) comes from
``--secret-file``, else ``PARATRAIN_SECRET``, else a fresh one for a one-machine job;
a job across machines needs one of the first two, since nothing secret goes through
the store. ``PARATRAIN_RUN_ID`` names the job in every incarnation of every rank.
"""
from __future__ import annotations

import collections
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Sequence

from paratrain.env import ALLOCATOR_ENV
from paratrain.errors import ConfigError

POLL_S = 0.05
RESTART_POLICIES = ("group", "worker")
STOP_GRACE_S = 5.0
#: The exit status of a usage error (one line on stderr): no restart can fix it.
EXIT_USAGE = 2
_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and ask)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the launcher dies, so no worker is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


@dataclass(kw_only=True)
class LaunchConfig:
    num_workers: int
    num_servers: int = 0
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0            # 0: pick a free one (single node only)
    max_restarts: int = 0
    restart_policy: str = "group"   # group: restart every worker; worker: only the dead one
    bind: str | None = None         # address parameter servers bind to
    server_args: tuple = ()         # extra arguments of every parameter server (snapshots)
    server_restarts: int = 0        # a dead server is restarted (from its snapshot) this often
    secret_file: str | None = None  # the job secret, given out of band (every node the same)
    run_id: str = ""                # the job's PARATRAIN_RUN_ID (default: a fresh one)
    extra_env: dict = field(default_factory=dict)
    # Per-step fault tolerance (paratrain.launch_elastic): min_workers > 0 keeps the
    # survivors of a dead worker running and replaces it (with `spares` warm spares);
    # heartbeat_timeout_s bounds a hang before the kill.
    min_workers: int = 0
    spares: int = 0
    heartbeat_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("num_workers", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name.replace('num_', '')}={value!r} must be an integer >= 1")
        for name in ("num_servers", "max_restarts", "master_port", "server_restarts", "min_workers", "spares"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0")
        if self.restart_policy not in RESTART_POLICIES:
            raise ConfigError(f"restart_policy={self.restart_policy!r}; allowed: {', '.join(RESTART_POLICIES)}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank={self.node_rank} must be in [0, nnodes={self.nnodes})")
        if self.nnodes > 1 and self.master_port == 0:
            raise ConfigError("multi-node launch needs --master-port (the same on every node)")
        if not self.heartbeat_timeout_s > 0:
            raise ConfigError(f"heartbeat_timeout_s={self.heartbeat_timeout_s!r} must be > 0")


@dataclass(frozen=True)
class Failure:
    """A child that ended badly: who (``rank 1``, ``server 0``), how, its exit status
    and the last line it printed."""

    label: str
    how: str
    code: int
    last_line: str = ""

    def __str__(self) -> str:
        said = f" ({self.last_line})" if self.last_line else ""
        return f"{self.label} {self.how}{said}"


class _Child:
    def __init__(self, label: str, argv: Sequence[str], env: dict, pass_stderr: bool = False) -> None:
        self.label = label
        self.last_lines: collections.deque[str] = collections.deque(maxlen=20)
        # Rank 0's stderr goes straight to an interactive terminal so its progress bar
        # renders; everything else is prefixed line by line.
        stderr = None if pass_stderr else subprocess.STDOUT
        self.proc = subprocess.Popen(list(argv), env=env, stdout=subprocess.PIPE, stderr=stderr,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.strip():
                self.last_lines.append(line.strip())
            sys.stdout.write(f"[{self.label}]: {line}\n")
            sys.stdout.flush()

    def failure(self, label: str) -> Failure:
        """How this (ended) child failed; its error line, when it printed one."""
        code = self.proc.poll()
        self.reader.join(timeout=1.0)   # its last lines are read once its output closed
        lines = list(self.last_lines)
        said = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        return Failure(label, describe_exit(code), code, said[:500])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def _stop_all(children: Sequence[_Child]) -> None:
    for child in children:
        child.stop()
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.proc.wait(timeout=STOP_GRACE_S)
    for child in children:
        child.reader.join(timeout=1.0)


def wait_children(children: Sequence[_Child], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for ``children`` to end by themselves; stop the rest."""
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    _stop_all(children)


class Launcher:
    """Runs one job: servers once, workers once per attempt."""

    def __init__(self, config: LaunchConfig, worker_argv: Sequence[str]) -> None:
        self.config = config
        self.worker_argv = list(worker_argv)
        from paratrain.comm.security import resolve_job_secret
        self.secret = resolve_job_secret(secret_file=config.secret_file, env_secret=os.environ.get("PARATRAIN_SECRET",
                                                                                                  ""),
                                         nnodes=config.nnodes)
        self.run_id = config.run_id or os.environ.get("PARATRAIN_RUN_ID") or secrets.token_hex(8)
        self.store = None
        self._attempt = 0   # servers register under this attempt's store namespace

    def _base_env(self, port: int) -> dict:
        env = dict(os.environ)
        env.update({k: str(v) for k, v in self.config.extra_env.items()})
        world = self.config.num_workers * self.config.nnodes
        env.update({"MASTER_ADDR": self.config.master_addr, "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                    "LOCAL_WORLD_SIZE": str(self.config.num_workers), "GROUP_RANK": str(self.config.node_rank),
                    "PARATRAIN_STORE_HOSTED": "1", "PARATRAIN_NUM_SERVERS": str(self.config.num_servers),
                    "PARATRAIN_SECRET": self.secret, "PARATRAIN_RUN_ID": self.run_id,
                    "PARATRAIN_HEARTBEAT_TIMEOUT": str(self.config.heartbeat_timeout_s),
                    "PYTHONUNBUFFERED": "1"})
        env.setdefault("OMP_NUM_THREADS", "1")   # one thread per process unless the user says otherwise
        if not any(name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in env):
            env.update(ALLOCATOR_ENV)   # reuse freed big blocks (paratrain.env.ALLOCATOR_ENV)
        if self.config.bind:
            env["PARATRAIN_BIND"] = self.config.bind
        return env

    def _host_store(self) -> int:
        import torch.distributed as dist
        from paratrain.comm.process_group import host_store
        if self.config.node_rank == 0:
            self.store = host_store(self.config.master_addr, self.config.master_port, timeout_s=60)
            return self.store.port
        self.store = dist.TCPStore(self.config.master_addr, self.config.master_port, is_master=False,
                                   wait_for_workers=False, timeout=timedelta(seconds=60), use_libuv=True)
        return self.config.master_port

    def run(self) -> int:
        self._restarts_left = self.config.max_restarts
        port = self._host_store()
        base = self._base_env(port)
        self._base = base
        self._server_restarts_left = self.config.server_restarts
        self.servers = [self._start_server(base, index) for index in range(self.config.num_servers)
                        if self.config.node_rank == 0]
        try:
            for attempt in range(self.config.max_restarts + 1):
                failed = self._run_workers(base, attempt)
                if failed is None:
                    return 0
                if failed.code == EXIT_USAGE:   # a usage error: the same on every attempt
                    print(f"paratrain launch: {failed}; stopped the job", file=sys.stderr, flush=True)
                    return EXIT_USAGE
                if self.config.restart_policy == "group" and attempt < self.config.max_restarts:
                    print(f"paratrain launch: {failed}; restarting the workers "
                          f"(attempt {attempt + 1} of {self.config.max_restarts})", file=sys.stderr, flush=True)
                    self._fresh_servers(attempt + 1)
                    continue
                print(f"paratrain launch: {failed}; stopped the job", file=sys.stderr, flush=True)
                return 1
            return 1
        finally:
            _stop_all(self.servers)

    def _fresh_servers(self, attempt: int) -> None:
        """A group restart starts new, empty servers under the new attempt's store
        namespace: the old ones hold a round the dead worker never finished, and the
        restarted workers resume from their own checkpoint and init the keys again."""
        if not self.servers:
            return
        _stop_all(self.servers)
        self._attempt = attempt
        self.servers = [self._start_server(self._base, index) for index in range(len(self.servers))]

    def _start_server(self, base: dict, index: int) -> _Child:
        env = dict(base, PARATRAIN_ROLE="server", PARATRAIN_SERVER_RANK=str(index), RANK="0", LOCAL_RANK="0",
                   TORCHELASTIC_RESTART_COUNT=str(self._attempt))
        return _Child(f"server{index}", [sys.executable, "-m", "paratrain.ps.server", *self.config.server_args], env)

    def _watch_servers(self) -> Failure | None:
        """A server that died (not one that finished) comes back from its snapshot,
        while restarts are left; workers notice its new epoch in the store and resend
        what it did not answer. Otherwise (or after a usage error, exit 2) the job
        cannot go on without it: returns how it failed."""
        for index, server in enumerate(self.servers):
            code = server.proc.poll()
            if code in (None, 0):
                continue
            if self._server_restarts_left <= 0 or code == EXIT_USAGE:
                return server.failure(f"server {index}")
            self._server_restarts_left -= 1
            print(f"paratrain launch: server {index} {describe_exit(code)}; restarting it from its snapshot "
                  f"({self._server_restarts_left} restarts left)", file=sys.stderr, flush=True)
            server.reader.join(timeout=1.0)
            self.servers[index] = self._start_server(self._base, index)
        return None

    def _start_worker(self, base: dict, local_rank: int, attempt: int, rejoin: bool = False) -> _Child:
        rank = self.config.node_rank * self.config.num_workers + local_rank
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(local_rank), TORCHELASTIC_RESTART_COUNT=str(attempt),
                   PARATRAIN_ROLE="worker", PARATRAIN_REJOIN="1" if rejoin else "0")
        return _Child(f"rank{rank}", self.worker_argv, env, pass_stderr=rank == 0 and sys.stderr.isatty())

    def _run_workers(self, base: dict, attempt: int) -> Failure | None:
        """Run every local worker to the end; return the first failure (of a worker or
        a server) that is not handled by restarting that process alone (or, with
        ``min_workers``, by the survivors training on)."""
        if self.config.min_workers:
            from paratrain.launch_elastic import run_elastic_workers
            return run_elastic_workers(self, base, attempt)
        workers = [self._start_worker(base, local_rank, attempt) for local_rank in range(self.config.num_workers)]
        try:
            while True:
                server_failure = self._watch_servers()
                if server_failure is not None:
                    return server_failure
                codes = [w.proc.poll() for w in workers]
                for local_rank, (worker, code) in enumerate(zip(workers, codes)):
                    if code in (None, 0):
                        continue
                    label, how = worker.label.replace("rank", "rank "), describe_exit(code)
                    if self.config.restart_policy == "worker" and self._restarts_left > 0 and code != EXIT_USAGE:
                        # Async training: the others keep going; this rank rejoins the
                        # same job (same store namespace, so same servers and queue).
                        self._restarts_left -= 1
                        print(f"paratrain launch: worker {label} {how}; restarting it alone "
                              f"({self._restarts_left} restarts left)", file=sys.stderr, flush=True)
                        worker.reader.join(timeout=1.0)
                        workers[local_rank] = self._start_worker(base, local_rank, attempt, rejoin=True)
                        break
                    return worker.failure(f"worker {label}")
                else:
                    if all(code == 0 for code in codes):
                        return None
                time.sleep(POLL_S)
        finally:
            _stop_all(workers)


def launch(worker_argv: Sequence[str], config: LaunchConfig) -> int:
    """Run ``worker_argv`` as ``config.num_workers`` ranks; return the exit status."""
    launcher = Launcher(config, worker_argv)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the finally blocks: stop children
    try:
        return launcher.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_servers_under_torchrun(env, num_servers: int, server_args: Sequence[str] = (), *,
                                 server_env: dict | None = None, secret: str | None = None):
    """Make ``torchrun ... paratrain train --strategy dist_* --servers M`` one command:
    global rank 0 starts the M parameter servers as its children (they die with it,
    with ``server_env`` added) and every rank learns the job's secret, which never goes
    through the store: ``secret`` (from ``--secret-file``), else ``PARATRAIN_SECRET``;
    on one machine without either, rank 0 leaves a fresh one in a folder only this user
    can read (mode 0700), named by the job's run id and port. Returns the environment
    this worker now runs with and the started servers."""
    import dataclasses
    import tempfile
    from pathlib import Path

    secret = secret or os.environ.get("PARATRAIN_SECRET")
    if env.local_world_size != env.world_size and not secret:
        raise ConfigError("torchrun across machines with parameter servers: give every node the same job secret, "
                          "--secret-file PATH (mode 0600) or PARATRAIN_SECRET (e.g. `openssl rand -hex 32`), so "
                          "the servers can tell the job's workers from anyone else")
    folder = Path(tempfile.gettempdir()) / f"paratrain-{os.getuid()}" / f"torchrun-{env.run_id}-{env.master_port}"
    secret = secret or _share_secret(folder, is_creator=env.rank == 0, timeout_s=env.timeout_s)
    os.environ.update(PARATRAIN_SECRET=secret, PARATRAIN_NUM_SERVERS=str(num_servers))
    servers = []
    if env.rank == 0:
        base = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                    **(server_env or {}))
        for index in range(num_servers):
            child_env = dict(base, PARATRAIN_ROLE="server", PARATRAIN_SERVER_RANK=str(index))
            servers.append(_Child(f"server{index}", [sys.executable, "-m", "paratrain.ps.server", *server_args],
                                  child_env))
    return dataclasses.replace(env, secret=secret, num_servers=num_servers), servers


def _share_secret(folder, *, is_creator: bool, timeout_s: float) -> str:
    """The creator writes a fresh secret into ``folder`` (mode 0700, file 0600); the
    others wait (bounded) for it and read it."""
    path = folder / "secret"
    if is_creator:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        secret = secrets.token_hex(32)
        tmp = folder / f".secret.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret)
        os.replace(tmp, path)
        return secret
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise ConfigError(f"rank 0 did not leave the job's secret at {path} within {timeout_s}s")
        time.sleep(0.05)
    return path.read_text().strip()
