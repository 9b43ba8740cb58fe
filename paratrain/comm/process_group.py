"""torch.distributed process groups, set up from :mod:`paratrain.env`.

The TCP store is keyed by the restart attempt: when torchrun (or our launcher) restarts
a group it reuses the same store, and gloo would otherwise read the dead attempt's
addresses.
"""
from __future__ import annotations

import ipaddress
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from paratrain.env import DistEnv
from paratrain.errors import CommTimeout, PeerError


class CollectiveFailed(PeerError):
    """A collective raised before its timeout: a peer died (its sockets closed) or was
    cut off. Elastic groups re-form on it; elsewhere it stops the job."""


def default_backend(local_world_size: int = 1) -> str:
    """``nccl`` when every local worker has a GPU of its own, else ``gloo`` (NCCL
    refuses two ranks on one GPU; gloo moves the tensors through the host)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size:
        return "nccl"
    return "gloo"


_STORES: dict[tuple, dist.Store] = {}
_GROUP_TIMEOUT_S: float | None = None   # the default group's timeout, when we created it


def store_bind_host(host: str) -> str:
    """The address the store's listening socket binds to for clients that dial ``host``:
    that address itself (so a one-machine job's store, at 127.0.0.1, is reachable from
    this machine only); a wildcard (``0.0.0.0``, ``*``, ``""``) binds every interface."""
    if host in ("", "*", "0.0.0.0", "::"):
        return "0.0.0.0"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return socket.gethostbyname(host)


def host_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """Host the job's TCP store on ``host:port`` (port 0: a free one; ``.port`` says which),
    listening on :func:`store_bind_host` only. torch's own server listens on every
    interface; given a bound socket it listens there instead."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((store_bind_host(host), port))
        listener.listen(socket.SOMAXCONN)
        port = listener.getsockname()[1]
        store = dist.TCPStore(host, port, world_size=None, is_master=True, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False, master_listen_fd=listener.fileno(), use_libuv=True)
    except BaseException:
        listener.close()
        raise
    listener.detach()   # the store's server owns the socket now
    return store


def connect_store(env: DistEnv, *, is_master: bool | None = None) -> dist.Store:
    """Connect to the job's TCP store at ``MASTER_ADDR:MASTER_PORT``.

    Rank 0 hosts it unless the launcher or torchrun's agent already does. The store
    is shared by workers and parameter servers; its keys are namespaced by the
    restart attempt.
    """
    if is_master is None:
        is_master = (not env.store_hosted) and env.rank == 0 and env.role == "worker"
    cache_key = (env.master_addr, env.master_port, env.restart_count)
    if cache_key in _STORES:  # one connection per process; a second master would not bind
        return _STORES[cache_key]
    store = host_store(env.master_addr, env.master_port, env.timeout_s) if is_master else dist.TCPStore(
        env.master_addr, env.master_port, world_size=None, is_master=False,
        timeout=timedelta(seconds=env.timeout_s), wait_for_workers=False,
        use_libuv=True,
    )
    _STORES[cache_key] = dist.PrefixStore(f"paratrain/attempt{env.restart_count}/", store)
    return _STORES[cache_key]


def init_process_group(env: DistEnv, backend: str | None = None) -> bool:
    """Join the default process group when the job has more than one worker.

    Returns True when a group was created (and should be destroyed at the end).
    """
    if not env.distributed or dist.is_initialized():
        return False
    backend = backend or default_backend(env.local_world_size)
    store = connect_store(env)
    global _GROUP_TIMEOUT_S
    _GROUP_TIMEOUT_S = env.timeout_s
    dist.init_process_group(
        backend, store=dist.PrefixStore("pg/", store), rank=env.rank,
        world_size=env.world_size, timeout=timedelta(seconds=env.timeout_s),
    )
    return True


def destroy_process_group() -> None:
    """Leave the default group if one exists."""
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_tensors(tensors, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s values of ``tensors`` (frozen weights, BatchNorm statistics)
    to every worker of ``group``, in place; nothing outside a process group."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=src, group=group)


def collective_device(group=None) -> torch.device:
    """Where a tensor must live for a collective on ``group``: the current GPU under
    NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_ints(value: int) -> list[int]:
    """Every rank's ``value``, in rank order (``[value]`` outside a process group)."""
    if not dist.is_initialized():
        return [value]
    device = collective_device()
    values = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(values, torch.tensor([value], dtype=torch.int64, device=device))
    return [int(v) for v in values]


def new_gloo_group(store: dist.Store, rank: int, size: int, timeout_s: float) -> dist.ProcessGroup:
    """A gloo group of its own on ``store`` (a prefix of the job's store), outside the
    default group: ``dist.all_reduce(t, group=...)`` and the other collectives work on
    it with no default group at all, and dropping the last reference closes its
    sockets. Elastic groups build one per membership (:mod:`paratrain.comm.elastic`)."""
    backend = dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=timeout_s))
    group = dist.ProcessGroup(store, rank, size)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    return group


def group_size(group=None) -> int:
    """Workers in ``group``: a group given (the default one's or one of its own), else
    the default group's size, 1 when torch.distributed is not initialised."""
    if group is not None:
        return group.size()
    return dist.get_world_size() if dist.is_initialized() else 1


def launch_collective(start, what: str):
    """``start()`` a collective; a failure to even start it (the group already saw a
    peer die) becomes :class:`CollectiveFailed` naming ``what``."""
    try:
        return start()
    except RuntimeError as exc:
        raise CollectiveFailed(f"rank {group_rank()}: {what} could not start: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def group_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def wait_work(work, timeout: float, what: str) -> None:
    """Wait at most ``timeout`` seconds for an async collective (None: nothing to wait
    for), raising :class:`CommTimeout` that names what was waited for.

    Where ``timeout`` is at least the process group's own (``PARATRAIN_TIMEOUT``, set in
    :func:`init_process_group`), which every gloo/NCCL collective honours, this is a
    plain ``work.wait()``. A shorter limit polls ``is_completed``. A per-call
    ``timeout`` is never passed to ``Work.wait``: with gloo on torch 2.13 that can
    abort the process at exit ("terminate called without an active exception"; see
    docs/internals.md, "Process exit").
    """
    if work is None:
        return
    if _GROUP_TIMEOUT_S is None or timeout < _GROUP_TIMEOUT_S:
        deadline = time.monotonic() + timeout
        pause = 1e-5
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise CommTimeout(f"rank {group_rank()}: timed out after {timeout:.1f}s waiting for {what} "
                                  f"from the other workers")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
    try:
        work.wait()
    except RuntimeError as exc:
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            raise CommTimeout(f"rank {group_rank()}: timed out after {timeout:.1f}s waiting for {what} "
                              f"from the other workers") from exc
        raise CollectiveFailed(f"rank {group_rank()}: {what} failed: {_first_line(exc)}") from exc
