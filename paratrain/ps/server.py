"""A parameter-server process: ``python -m paratrain.ps.server`` (or ``paratrain server``).

Run by the launcher with ``PARATRAIN_ROLE=server``. It binds to ``PARATRAIN_BIND``
(default loopback) on a free port, announces the address in the job's TCP store under
``ps/server/<rank>``, serves only clients that prove they hold ``PARATRAIN_SECRET``
(:class:`~paratrain.ps.parameter_server.ParameterServer` holds the state and the
handlers), and exits when every worker said goodbye or the store went away.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

import torch

from paratrain.comm.heartbeat import LivenessTracker, heartbeat_key
from paratrain.comm.transport import get_transport
from paratrain.errors import ConfigError
from paratrain.optimizers import import_optimizer_plugins
from paratrain.ps.parameter_server import DEFAULT_MAX_MESSAGE_BYTES, ParameterServer, ServerConfig
from paratrain.ps.snapshot import SnapshotConfig, load_snapshot, restore_state

log = logging.getLogger("paratrain.ps.server")


def _store_alive(store) -> Callable[[], bool]:
    def alive() -> bool:
        try:
            store.check(["ps/alive"])
            return True
        except Exception:  # any failure of the store connection means the job is gone
            return False
    return alive


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m paratrain.ps.server`` / ``paratrain server``."""
    from paratrain.comm.process_group import connect_store
    from paratrain.env import read_env

    parser = argparse.ArgumentParser(prog="paratrain server", description="run one parameter server (started by "
                                     "the launcher with PARATRAIN_ROLE=server and the job's PARATRAIN_* variables)")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_BYTES >> 20,
                        help="largest message accepted; bigger ones drop the connection")
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
    config = ServerConfig(server_rank=env.server_rank, num_servers=max(env.num_servers, 1),
                          secret=env.secret, timeout_s=env.timeout_s,
                          max_message_bytes=args.max_message_mb << 20)
    snapshots = SnapshotConfig(args.snapshot_dir, args.snapshot_every) if args.snapshot_dir else None
    channel = get_transport("zmq").listen(env.bind_addr, max_message_bytes=config.max_message_bytes)
    server = ParameterServer(config, channel, snapshots)
    saved = load_snapshot(snapshots.directory, env.server_rank) if snapshots else None
    if saved is not None:
        restore_state(server, saved)
        log.info("server %d resumed from its snapshot: %d pushes applied", env.server_rank, saved["applied_pushes"])
    store = connect_store(env, is_master=False)
    store.set(f"ps/server/{env.server_rank}", channel.address)
    # Workers watch this counter: a change means "reconnect, authenticate, resend".
    store.add(f"ps/server/{env.server_rank}/epoch", 1)
    log.info("server %d of %d listening at %s", env.server_rank, config.num_servers, channel.address)
    server.liveness = LivenessTracker(lambda rank: store.add(heartbeat_key(rank), 0))
    try:
        server.serve(keep_running=_store_alive(store))
        server.flush()   # the final snapshot, and the last goodbyes
    finally:
        channel.close()
    log.info("server %d done: %s", env.server_rank, dict(server.stats))
    return 0


def run(argv: list[str] | None = None) -> int:
    """:func:`main` with a bad setting reported in one line (exit 2), not a traceback."""
    try:
        return main(argv)
    except ConfigError as exc:
        print(f"paratrain server: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(run())
