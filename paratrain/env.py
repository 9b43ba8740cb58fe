"""The one reader of launcher environment variables.

Every process paratrain starts (or that ``torchrun`` starts) learns its place in the
job from these variables, and nothing else in paratrain reads ``os.environ`` for them.

| variable | set by | meaning |
|---|---|---|
| ``RANK`` | launcher / torchrun | global rank of this worker, 0..WORLD_SIZE-1 |
| ``WORLD_SIZE`` | launcher / torchrun | number of worker processes |
| ``LOCAL_RANK`` | launcher / torchrun | rank on this machine (selects the GPU) |
| ``LOCAL_WORLD_SIZE`` | launcher / torchrun | workers on this machine |
| ``MASTER_ADDR`` | launcher / torchrun | host of the rendezvous TCP store |
| ``MASTER_PORT`` | launcher / torchrun | port of the rendezvous TCP store |
| ``TORCHELASTIC_RESTART_COUNT`` | torchrun / launcher | restart attempt, 0 for the first run |
| ``GROUP_RANK`` | torchrun | node rank (informational) |
| ``PARATRAIN_ROLE`` | launcher | ``worker`` (default) or ``server`` |
| ``PARATRAIN_NUM_SERVERS`` | launcher | number of parameter-server processes (0: none) |
| ``PARATRAIN_SERVER_RANK`` | launcher | index of this server, for ``PARATRAIN_ROLE=server`` |
| ``PARATRAIN_SECRET`` | launcher / user | the job secret (>= 32 bytes): every CURVE key of the job is derived from it; across machines the user gives the same one to every node (or ``--secret-file``), it never goes through the store |
| ``PARATRAIN_BIND`` | user / launcher | address servers bind to (default ``127.0.0.1``) |
| ``TORCHELASTIC_USE_AGENT_STORE`` | torchrun | ``True``: the agent hosts the TCP store; every rank is a client |
| ``TORCHELASTIC_RUN_ID`` | torchrun | the job's id (names the folder where a torchrun job's rank 0 leaves the secret for its servers) |
| ``PARATRAIN_STORE_HOSTED`` | launcher | ``1``: paratrain's launcher hosts the TCP store; every rank is a client |
| ``PARATRAIN_TIMEOUT`` | user | seconds any network wait may take (default 60) |
| ``PARATRAIN_REJOIN`` | launcher | ``1``: this worker was restarted alone and rejoins a running async job |
| ``PARATRAIN_SUMMARY_FILE`` | launcher | ``paratrain train``: rank 0 writes the run's summary (JSON) here for the launcher to print |
| ``PARATRAIN_HEARTBEAT_TIMEOUT`` | launcher | seconds without a heartbeat after which a member of an elastic group counts as dead (hung), default 10 |
| ``PARATRAIN_SPARE_ID`` | launcher | this worker is a warm spare of an elastic job: it builds everything, then waits for the launcher to hand it a dead worker's slot |
| ``PARATRAIN_SERVER_IMPORTS`` | user / launcher | comma-separated modules a parameter server imports at start-up (to register update rules: ``paratrain.optimizers.register_optimizer``) |
| ``PARATRAIN_SERVER_OPTIMIZER`` | launcher | the server optimizer spec the job's configuration fixes (JSON, ``{"type": "sgd", "lr": 0.1}``): servers run it from the start, so no worker needs to send it |
| ``PARATRAIN_SERVER_LOCKED`` | launcher | ``1``: a running job's control settings never change (``paratrain train`` jobs); unset: worker 0 may change them, as in MXNet, and the server says so |
| ``PARATRAIN_SERVER_COMPRESSION`` | launcher | the gradient compression the job's configuration fixes (JSON, ``{"type": "2bit", "threshold": 0.5}``) |
| ``PARATRAIN_MAX_MESSAGE_MB`` | launcher / user | the largest message (MiB) a parameter server accepts (``paratrain train`` derives it from the model's largest key slice; default 64) |
| ``PARATRAIN_RUN_ID`` | launcher | the job's id, the same in every incarnation of every rank (a restart resumes only its own job's checkpoints) |
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0
VALID_ROLES = ("worker", "server")

#: What the launcher gives its workers and servers unless the user set any MALLOC_*
#: variable or GLIBC_TUNABLES: glibc then keeps freed blocks up to 256 MB in the heap
#: and returns heap memory to the system only beyond 1 GB free, instead of mapping and
#: unmapping big blocks (or trimming the heap) each time. A training step frees and
#: allocates the same large blocks (gradients, received messages) over and over;
#: without this each of them faults its pages in afresh, which cost a parameter
#: server's I/O thread about as much time as its copies (docs/parameter_server.md,
#: "Where the time went"). The price: a process keeps the memory of its peak step, as
#: caching allocators (PyTorch's on GPU, MXNet's pool) do.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job, as the launcher described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    restart_count: int = 0
    role: str = "worker"
    num_servers: int = 0
    server_rank: int = 0
    secret: str = ""
    bind_addr: str = "127.0.0.1"
    store_hosted: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    rejoin: bool = False
    server_imports: tuple[str, ...] = ()
    summary_file: str = ""
    run_id: str = ""
    server_optimizer: str = ""
    server_compression: str = ""
    server_locked: bool = False
    max_message_mb: int = 0
    job_id: str = ""
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    spare_id: str = ""
    launched: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"WORLD_SIZE={self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK={self.rank} must be in [0, WORLD_SIZE={self.world_size})")
        if self.role not in VALID_ROLES:
            raise ValueError(f"PARATRAIN_ROLE={self.role!r}; allowed: {', '.join(VALID_ROLES)}")
        if self.num_servers < 0:
            raise ValueError(f"PARATRAIN_NUM_SERVERS={self.num_servers} must be >= 0")
        if self.timeout_s <= 0:
            raise ValueError(f"PARATRAIN_TIMEOUT={self.timeout_s} must be > 0")
        if self.max_message_mb < 0:
            raise ValueError(f"PARATRAIN_MAX_MESSAGE_MB={self.max_message_mb} must be >= 1 (or unset)")
        if self.heartbeat_timeout_s <= 0:
            raise ValueError(f"PARATRAIN_HEARTBEAT_TIMEOUT={self.heartbeat_timeout_s} must be > 0")

    @property
    def under_torchrun(self) -> bool:
        """Started by torchrun (its agent hosts the store), not by paratrain's launcher."""
        return self.launched and bool(self.run_id) and not self.secret

    @property
    def job_run_id(self) -> str:
        """The job's id across restarts: paratrain's launcher's, else torchrun's ("" when
        neither started this process)."""
        return self.job_id or self.run_id

    @property
    def distributed(self) -> bool:
        """True when more than one worker takes part (collectives are needed)."""
        return self.world_size > 1


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Build a :class:`DistEnv` from ``environ`` (default: ``os.environ``)."""
    environ = os.environ if environ is None else environ
    timeout_s = _float(environ, "PARATRAIN_TIMEOUT", DEFAULT_TIMEOUT_S)
    world_size = _int(environ, "WORLD_SIZE", 1)
    return DistEnv(
        rank=_int(environ, "RANK", 0),
        world_size=world_size,
        local_rank=_int(environ, "LOCAL_RANK", 0),
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE", world_size),
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(environ, "MASTER_PORT", 0),
        restart_count=_int(environ, "TORCHELASTIC_RESTART_COUNT", 0),
        role=environ.get("PARATRAIN_ROLE", "worker"),
        num_servers=_int(environ, "PARATRAIN_NUM_SERVERS", 0),
        server_rank=_int(environ, "PARATRAIN_SERVER_RANK", 0),
        secret=environ.get("PARATRAIN_SECRET", ""),
        bind_addr=environ.get("PARATRAIN_BIND", "127.0.0.1"),
        store_hosted=(environ.get("TORCHELASTIC_USE_AGENT_STORE", "") == "True"
                      or environ.get("PARATRAIN_STORE_HOSTED", "") == "1"),
        timeout_s=timeout_s,
        rejoin=environ.get("PARATRAIN_REJOIN", "") == "1",
        server_imports=tuple(name.strip() for name in environ.get("PARATRAIN_SERVER_IMPORTS", "").split(",")
                             if name.strip()),
        summary_file=environ.get("PARATRAIN_SUMMARY_FILE", ""),
        run_id=environ.get("TORCHELASTIC_RUN_ID", ""),
        server_optimizer=environ.get("PARATRAIN_SERVER_OPTIMIZER", ""),
        server_compression=environ.get("PARATRAIN_SERVER_COMPRESSION", ""),
        server_locked=environ.get("PARATRAIN_SERVER_LOCKED", "") == "1",
        max_message_mb=_int(environ, "PARATRAIN_MAX_MESSAGE_MB", 0),
        job_id=environ.get("PARATRAIN_RUN_ID", ""),
        heartbeat_timeout_s=_float(environ, "PARATRAIN_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT_S),
        spare_id=environ.get("PARATRAIN_SPARE_ID", ""),
        launched="RANK" in environ,
    )
