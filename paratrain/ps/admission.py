"""Who a parameter server admits, and who may change what: pure functions, tested
without a network.

The transport proves each peer's role at its handshake (CURVE keys derived from the
job secret, :mod:`paratrain.comm.security`), so a HELLO must speak for the rank its key
belongs to. The first worker to be admitted fixes the job's terms (number of
workers, mode, staleness, backup workers); every later one must agree with them.

Control operations (the server optimizer, gradient compression) are part of the job,
not of any one message: the job's configuration may fix them at start-up; otherwise
worker 0 sets them once, before any push was applied. Repeating what runs is always
accepted (a rank 0 that rejoins says it again); any other change is refused, so a
running job never changes silently.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from paratrain.errors import ConfigError
from paratrain.ps.policies import UpdatePolicy, build_policy
from paratrain.ps.protocol import RequestRejected

MAX_WORKERS = 65536


@dataclass(frozen=True)
class JobTerms:
    """The job as its first admitted worker described it."""

    num_workers: int
    mode: str
    staleness: int
    backup_workers: int


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_hello(hello: dict, terms: JobTerms | None, *, proved_rank: int,
                job_workers: int | None = None) -> tuple[int, JobTerms]:
    """``(rank, terms)`` for a worker's HELLO fields; :class:`RequestRejected` naming
    the field when they are malformed, speak for another rank than the one the peer's
    key proved (``proved_rank``), or disagree with the job: its ``terms``, and the
    number of workers the server was started for (``job_workers``, when known)."""
    rank, num_workers = hello.get("rank"), hello.get("num_workers")
    mode, staleness = hello.get("mode"), hello.get("staleness", 0)
    if not all(_is_int(v) for v in (rank, num_workers, staleness)):
        raise RequestRejected(f"hello needs integer rank, num_workers and staleness, got {hello}")
    if not 0 < num_workers <= MAX_WORKERS or not 0 <= rank < num_workers:
        raise RequestRejected(f"rank={rank} must be in [0, num_workers={num_workers})")
    if rank != proved_rank:
        raise RequestRejected(f"hello says rank {rank}, but the peer's key is worker {proved_rank}'s")
    if job_workers is not None and num_workers != job_workers:
        raise RequestRejected(f"num_workers={num_workers} differs from the {job_workers} workers this server "
                              f"was started for")
    backup = hello.get("backup_workers", 0)
    if not _is_int(backup) or not 0 <= backup < num_workers:
        raise RequestRejected(f"backup_workers={backup!r} must be an int in [0, num_workers={num_workers})")
    if terms is not None:
        if num_workers != terms.num_workers:
            raise RequestRejected(f"num_workers={num_workers} differs from the job's {terms.num_workers}")
        if (mode, staleness) != (terms.mode, terms.staleness):
            raise RequestRejected(f"mode={mode!r}/staleness={staleness} differs from the job's "
                                  f"{(terms.mode, terms.staleness)}")
        if backup != terms.backup_workers:
            raise RequestRejected(f"backup_workers={backup} differs from the job's {terms.backup_workers}")
        return rank, terms
    return rank, JobTerms(num_workers, mode, staleness, backup)


def policy_for(terms: JobTerms) -> UpdatePolicy:
    """The update policy the job's terms ask for."""
    try:
        return build_policy(terms.mode, terms.staleness, terms.backup_workers)
    except ConfigError as exc:
        raise RequestRejected(str(exc)) from None


def control_change(what: str, *, rank: int, current, requested, fixed: bool, started: bool,
                   locked: bool = True) -> bool:
    """Whether a control request (``what``: ``SET_OPTIMIZER``, ``SET_COMPRESSION``)
    from worker ``rank`` changes anything: False when ``requested`` is what runs
    (``current``), True when it may be applied; :class:`RequestRejected` when the
    job's configuration ``fixed`` it, when it is not worker 0's, or when pushes were
    applied already (``started``) in a ``locked`` job. Unlocked (a job whose
    configuration does not forbid it, as MXNet's KVStore allows), worker 0 may change
    it after pushes, and the server prints the change: never silent."""
    if requested == current:
        return False
    if fixed:
        raise RequestRejected(f"{what} {requested} refused: the job's configuration fixes it to {current}")
    if rank != 0:
        raise RequestRejected(f"{what} from worker {rank} refused: only worker 0 sets it")
    if started and locked:
        raise RequestRejected(f"{what} {requested} refused: pushes were applied already with {current}, and a "
                              f"running job's {what} never changes")
    if started:
        print(f"[ps-server] {what} changed by worker 0 after pushes were applied: {current} -> {requested}",
              file=sys.stderr, flush=True)
    return True
