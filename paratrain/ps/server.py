"""A parameter-server process: ``python -m paratrain.ps.server`` (or ``paratrain server``).

Run by the launcher with ``PARATRAIN_ROLE=server``. It binds to ``PARATRAIN_BIND``
(default loopback) on a free port, announces the address in the job's TCP store under
``ps/server/<rank>`` (and announces it again whenever someone rewrote it), serves only
the job's workers, each proving its own CURVE key derived from ``PARATRAIN_SECRET``
(:class:`~paratrain.ps.parameter_server.ParameterServer` holds the state and the
handlers), and exits when every worker said goodbye or the store went away. A bad
setting, an address it cannot bind or a snapshot it cannot read ends it at start-up
with one line (exit 2), which the launcher shows when it ends the job.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

import torch
import zmq

from paratrain.comm.security import JobKeys
from paratrain.comm.heartbeat import LivenessTracker, heartbeat_key
from paratrain.comm.transport import get_transport
from paratrain.errors import ConfigError
from paratrain.optimizers import import_optimizer_plugins
from paratrain.ps.parameter_server import DEFAULT_MAX_MESSAGE_BYTES, ParameterServer, ServerConfig
from paratrain.ps.snapshot import SnapshotConfig, load_snapshot, restore_state

log = logging.getLogger("paratrain.ps.server")
DEFAULT_MAX_MESSAGE_MB = DEFAULT_MAX_MESSAGE_BYTES >> 20


def _watch_store(store, key: str, address: str) -> Callable[[], bool]:
    """``alive()``: whether the job's store still answers; on the way it puts this
    server's address back under ``key`` if anyone rewrote it (workers that read a
    rewritten address find no server with this job's key there, and read again)."""
    def alive() -> bool:
        try:
            announced = store.get(key).decode("utf-8", "replace")
            if announced != address:
                log.warning("the address under %s was rewritten to %r; announcing %s again", key, announced[:200],
                            address)
                store.set(key, address)
            return True
        except Exception:  # any failure of the store connection means the job is gone
            return False
    return alive


def _job_spec(name: str, text: str) -> dict | None:
    """A JSON spec from the environment (``PARATRAIN_SERVER_OPTIMIZER``, ...), or None."""
    if not text:
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name}={text!r} is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{name}={text!r} must be a JSON object")
    return spec


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m paratrain.ps.server`` / ``paratrain server``."""
    from paratrain.comm.process_group import connect_store
    from paratrain.env import read_env

    parser = argparse.ArgumentParser(prog="paratrain server", description="run one parameter server (started by "
                                     "the launcher with PARATRAIN_ROLE=server and the job's PARATRAIN_* variables)")
    parser.add_argument("--max-message-mb", type=int, default=None,
                        help="largest message accepted, in MiB (default PARATRAIN_MAX_MESSAGE_MB, else 64); "
                             "bigger ones drop the connection")
    parser.add_argument("--snapshot-dir", default=None,
                        help="snapshot the state here; a restarted server resumes from it")
    parser.add_argument("--snapshot-every", type=int, default=100,
                        help="snapshot after at most this many applied pushes (sooner when idle)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[ps-server %(process)d] %(message)s")
    torch.set_num_threads(1)
    env = read_env()
    if env.role != "server":
        raise ConfigError(f"PARATRAIN_ROLE={env.role!r}: the parameter server runs with PARATRAIN_ROLE=server")
    import_optimizer_plugins(env.server_imports)
    config = ServerConfig(server_rank=env.server_rank, num_servers=max(env.num_servers, 1), timeout_s=env.timeout_s,
                          max_message_bytes=(args.max_message_mb or env.max_message_mb or DEFAULT_MAX_MESSAGE_MB) << 20,
                          num_workers=env.world_size if env.launched else None,
                          optimizer=_job_spec("PARATRAIN_SERVER_OPTIMIZER", env.server_optimizer),
                          compression=_job_spec("PARATRAIN_SERVER_COMPRESSION", env.server_compression),
                          locked=env.server_locked)
    snapshots = SnapshotConfig(args.snapshot_dir, args.snapshot_every) if args.snapshot_dir else None
    keys = JobKeys(env.secret).ps_server(env.server_rank, env.world_size)
    try:
        channel = get_transport("zmq").listen(env.bind_addr, max_message_bytes=config.max_message_bytes, keys=keys)
    except zmq.ZMQError as exc:
        raise ConfigError(f"server {env.server_rank} cannot listen on PARATRAIN_BIND={env.bind_addr!r} "
                          f"(--bind): {exc}") from None
    try:
        server = ParameterServer(config, channel, snapshots)
        saved = _read_snapshot(snapshots, env.server_rank)
        if saved is not None:
            restore_state(server, saved)
            log.info("server %d resumed from its snapshot: %d pushes applied", env.server_rank,
                     saved["applied_pushes"])
        store = connect_store(env, is_master=False)
        key = f"ps/server/{env.server_rank}"
        store.set(key, channel.address)
        # Workers watch this counter: a change means "reconnect, say hello, resend".
        store.add(f"{key}/epoch", 1)
        log.info("server %d of %d listening at %s", env.server_rank, config.num_servers, channel.address)
        server.liveness = LivenessTracker(lambda rank: store.add(heartbeat_key(rank), 0))
        server.serve(keep_running=_watch_store(store, key, channel.address))
        server.flush()   # the final snapshot, and the last goodbyes
    finally:
        channel.close()
    log.info("server %d done: %s", env.server_rank, dict(server.stats))
    return 0


def _read_snapshot(snapshots: SnapshotConfig | None, server_rank: int) -> dict | None:
    if snapshots is None:
        return None
    try:
        return load_snapshot(snapshots.directory, server_rank)
    except Exception as exc:   # torch.load raises many kinds for a file that is not a snapshot
        raise ConfigError(f"--server-snapshot-dir {snapshots.directory!r}: the snapshot of server {server_rank} "
                          f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                          ) from None


def run(argv: list[str] | None = None) -> int:
    """:func:`main` with a bad setting reported in one line (exit 2), not a traceback."""
    try:
        return main(argv)
    except ConfigError as exc:
        print(f"paratrain server: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(run())
