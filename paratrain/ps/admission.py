"""Who a parameter server admits: the checks on a worker's HELLO against the job.

The first worker to be admitted fixes the job's terms (number of workers, mode,
staleness, backup workers); every later one must agree with them. A pure function,
tested without a network; the handshake that proves the job's secret is the
transport's and the server's business.
"""
from __future__ import annotations

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


def check_hello(hello: dict, terms: JobTerms | None) -> tuple[int, JobTerms]:
    """``(rank, terms)`` for a worker's HELLO fields; :class:`RequestRejected` naming
    the field when they are malformed or disagree with the job's ``terms``."""
    rank, num_workers = hello.get("rank"), hello.get("num_workers")
    mode, staleness = hello.get("mode"), hello.get("staleness", 0)
    if not all(_is_int(v) for v in (rank, num_workers, staleness)):
        raise RequestRejected(f"hello needs integer rank, num_workers and staleness, got {hello}")
    if not 0 < num_workers <= MAX_WORKERS or not 0 <= rank < num_workers:
        raise RequestRejected(f"rank={rank} must be in [0, num_workers={num_workers})")
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
