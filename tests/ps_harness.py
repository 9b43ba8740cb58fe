"""Start a real parameter-server job from a test: a TCP store in the test process,
M ``python -m paratrain.ps.server`` processes and N worker processes, all on
loopback with ports chosen at run time, all killed (by their own PIDs) at the end
(``PSJob``); or the same servers on threads in the test process (``InprocJob``).

A worker runs ``module:function(**args)`` from the tests folder and writes the JSON
of its return value (or the text of its exception) to a file the test reads.
"""
from __future__ import annotations

import importlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent


class PSJob:
    """One job: ``with PSJob(num_workers=4, num_servers=2) as job: job.run_workers(...)``."""

    def __init__(self, num_workers: int, num_servers: int, *, timeout_s: float = 20.0,
                 secret: str | None = None, server_args: list[str] | None = None, extra_env: dict | None = None):
        import torch.distributed as dist

        self.num_workers, self.num_servers = num_workers, num_servers
        self.secret = secret or secrets.token_hex(16)
        self.timeout_s = timeout_s
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
        self.port = self.store.port
        self.tmp = tempfile.TemporaryDirectory(prefix="ps_job_")
        self.extra_env = extra_env or {}
        self.servers: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self._server_args = server_args or []

    def env(self, **overrides) -> dict:
        env = dict(os.environ)
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.port), "WORLD_SIZE": str(self.num_workers),
                    "PARATRAIN_STORE_HOSTED": "1", "PARATRAIN_NUM_SERVERS": str(self.num_servers),
                    "PARATRAIN_SECRET": self.secret, "PARATRAIN_TIMEOUT": str(self.timeout_s),
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([str(REPO_DIR), str(TESTS_DIR), env.get("PYTHONPATH", "")])})
        env.update({k: str(v) for k, v in self.extra_env.items()})
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    def start_servers(self) -> list[str]:
        """Start the servers and return their announced addresses."""
        from datetime import timedelta

        for rank in range(self.num_servers):
            env = self.env(PARATRAIN_ROLE="server", PARATRAIN_SERVER_RANK=rank, RANK=0)
            self.servers.append(subprocess.Popen([sys.executable, "-m", "paratrain.ps.server", *self._server_args],
                                                 env=env, stdin=subprocess.DEVNULL))
        import torch.distributed as dist

        store = dist.PrefixStore("paratrain/attempt0/", self.store)  # as connect_store names it
        keys = [f"ps/server/{i}" for i in range(self.num_servers)]
        # The epoch counter is each server's last start-up write: after it, it serves.
        store.wait(keys + [f"{key}/epoch" for key in keys], timedelta(seconds=60))
        return [store.get(k).decode() for k in keys]

    def start_worker(self, rank: int, target: str, args: dict, **env) -> subprocess.Popen:
        out = Path(self.tmp.name) / f"worker{rank}.json"
        proc = subprocess.Popen([sys.executable, str(Path(__file__)), target, json.dumps(args), str(out)],
                                env=self.env(RANK=rank, LOCAL_RANK=rank, **env), stdin=subprocess.DEVNULL)
        self.workers.append(proc)
        return proc

    def run_workers(self, target: str, args: dict | None = None, *, timeout_s: float = 120.0,
                    per_rank_env: dict | None = None) -> list:
        """Run ``target`` on every rank and return each rank's result (in rank order).
        A rank that failed gives ``{"error": "<its exception>"}``."""
        procs = [self.start_worker(rank, target, args or {}, **(per_rank_env or {}).get(rank, {}))
                 for rank in range(self.num_workers)]
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return [self.result(rank) for rank in range(self.num_workers)]

    def result(self, rank: int):
        path = Path(self.tmp.name) / f"worker{rank}.json"
        if not path.exists():
            return {"error": f"worker {rank} wrote no result"}
        return json.loads(path.read_text())

    def wait_servers_exit(self, timeout_s: float = 15.0) -> list[int | None]:
        deadline = time.monotonic() + timeout_s
        for proc in self.servers:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [proc.poll() for proc in self.servers]

    def close(self) -> None:
        for proc in self.workers + self.servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        self.store = None
        self.tmp.cleanup()

    def __enter__(self) -> "PSJob":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InprocJob:
    """Servers on threads in this process, workers (``DistKVStore``s) made on demand, all
    over the inproc transport: the server's whole request path without a process start.
    Tests get it through conftest's ``job`` fixture, which closes every one it made."""

    def __init__(self, num_servers: int, timeout_s: float = 5.0, max_workers: int = 8, **server_options):
        import threading

        from paratrain.comm.security import JobKeys, new_secret
        from paratrain.comm.transport import get_transport
        from paratrain.ps.parameter_server import ParameterServer, ServerConfig
        transport = get_transport("inproc")
        secret = new_secret()
        self.servers = []
        self.stop = threading.Event()
        self.threads = []
        for rank in range(num_servers):
            channel = transport.listen("127.0.0.1", max_message_bytes=1 << 24,
                                       keys=JobKeys(secret).ps_server(rank, max_workers))
            server = ParameterServer(ServerConfig(server_rank=rank, num_servers=num_servers, timeout_s=timeout_s,
                                                  **server_options), channel)
            thread = threading.Thread(target=server.serve, kwargs=dict(
                keep_running=lambda: not self.stop.is_set(), poll_s=0.02, liveness_every_s=0.05), daemon=True)
            thread.start()
            self.servers.append(server)
            self.threads.append(thread)
        self.addresses = [s.channel.address for s in self.servers]
        self.secret, self.timeout_s = secret, timeout_s

    def worker(self, rank: int, num_workers: int, mode: str = "dist_sync", secret: str | None = None,
               rejoin: bool = False, **options):
        from paratrain.kvstore.dist import DistKVStore, DistKVStoreConfig
        return DistKVStore(DistKVStoreConfig(mode=mode, transport="inproc", **options), rank=rank,
                           num_workers=num_workers, addresses=self.addresses,
                           secret=self.secret if secret is None else secret, timeout_s=self.timeout_s, rejoin=rejoin)

    def close(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)


def pull_error_and_wait(kv, key, out) -> dict:
    """Pull once and report how it ended: ``{"error": None}`` or the error text and
    how long the pull waited before failing. Closes ``kv``."""
    start = time.monotonic()
    try:
        kv.pull(key, out=out)
        return {"error": None}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "waited_s": time.monotonic() - start}
    finally:
        kv.close()


def worker_env_kvstore(mode: str, **options):
    """In a worker: the KVStore the launcher's environment describes."""
    from paratrain.kvstore.dist import create_dist_kvstore
    return create_dist_kvstore(mode, **options)


def _worker_main(target: str, args_json: str, out_path: str) -> int:
    import torch

    torch.set_num_threads(1)
    module_name, function_name = target.split(":")
    try:
        result = getattr(importlib.import_module(module_name), function_name)(**json.loads(args_json))
        code = 0
    except Exception as exc:  # the test reads the message
        traceback.print_exc()
        result, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
    Path(out_path).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    raise SystemExit(_worker_main(*sys.argv[1:4]))
