"""dist_async and dist_ssp keep their semantics for row-sparse keys, with real processes
(a TCP store, ZeroMQ servers and worker processes on loopback, ps_harness.py): a
200,000 x 8 table on 2 servers, pushes that touch both servers' ranges, one slow worker.

* dist_async: each push is applied on arrival; a worker's pull sees its own pushes;
  after a barrier every row is its initial value minus lr times every push to it.
* dist_ssp: no row_sparse_pull returns to a worker at clock c before every worker
  pushed clock c - staleness, and the clocks the servers report agree. The same run
  under dist_async breaks that bound, so the check can fail.
"""
from __future__ import annotations

import time

import pytest
import torch

from ps_harness import PSJob, worker_env_kvstore
from test_ps_dist import _staleness_violations

TABLE = (200_000, 8)
LR = 0.5
STALENESS = 1


def _own_rows(rank: int) -> list[int]:
    """Rows only worker ``rank`` pushes: one on each server's range."""
    return [1_000 + rank, 150_000 + rank]


SHARED = [7, 99_999, 100_000, 199_999]        # every worker pushes these (both ranges' edges)
UNTOUCHED = [0, 50_000, 100_001, 199_998]


def worker_sparse_modes(mode: str, steps: int, slow_rank: int, slow_s: float) -> dict:
    kv = worker_env_kvstore(mode, staleness=STALENESS)
    rank, n = kv.rank, kv.num_workers
    kv.init("table", torch.zeros(TABLE, layout=torch.sparse_coo), initializer={"kind": "zeros"})
    kv.set_optimizer({"type": "sgd", "lr": LR})
    ids = torch.tensor(_own_rows(rank) + SHARED + [SHARED[0]])       # one id twice: summed
    grad = torch.sparse_coo_tensor(ids[None], torch.ones(len(ids), TABLE[1]), TABLE)
    own = torch.empty(2, TABLE[1])
    pushed_at, pulled_at, min_clocks, own_seen = [], [], [], []
    for _ in range(steps):
        if rank == slow_rank:
            time.sleep(slow_s)
        pushed_at.append(time.monotonic())
        kv.push("table", grad)
        kv.row_sparse_pull("table", out=own, row_ids=torch.tensor(_own_rows(rank)))
        pulled_at.append(time.monotonic())
        min_clocks.append(kv.last_min_clock["table"])
        own_seen.append(own.unique().tolist())
    kv.barrier()
    every = torch.tensor([row for r in range(n) for row in _own_rows(r)] + SHARED + UNTOUCHED)
    final = torch.empty(len(every), TABLE[1])
    kv.row_sparse_pull("table", out=final, row_ids=every)
    kv.close()
    return {"pushed_at": pushed_at, "pulled_at": pulled_at, "min_clocks": min_clocks, "own_seen": own_seen,
            "final": final[:, 0].tolist(), "final_uniform": bool((final == final[:, :1]).all())}


def _run(mode: str, steps: int = 8, slow_rank: int = 2, slow_s: float = 0.25) -> list[dict]:
    with PSJob(num_workers=3, num_servers=2, timeout_s=60) as job:
        job.start_servers()
        results = job.run_workers("test_row_sparse_modes:worker_sparse_modes",
                                  {"mode": mode, "steps": steps, "slow_rank": slow_rank, "slow_s": slow_s},
                                  timeout_s=150)
    for rank, result in enumerate(results):
        assert "error" not in result, f"worker {rank}: {result['error']}"
    return results


def _expected_final(n: int, steps: int) -> list[float]:
    own = [-LR * steps] * (2 * n)
    shared = [-LR * steps * n * (2 if row == SHARED[0] else 1) for row in SHARED]
    return own + shared + [0.0] * len(UNTOUCHED)


@pytest.fixture(scope="module")
def unbounded():
    return _run("dist_async")


@pytest.mark.timeout(200)
def test_dist_async_applies_every_sparse_push_on_arrival(unbounded):
    for result in unbounded:
        # a worker reads its own writes at once: its own rows after push k are -lr * k
        assert result["own_seen"] == [[-LR * (k + 1)] for k in range(8)]
        assert result["final"] == _expected_final(3, 8) and result["final_uniform"]


@pytest.mark.timeout(400)
def test_dist_ssp_bounds_the_clocks_of_sparse_pulls_and_async_does_not(unbounded):
    ssp = _run("dist_ssp")
    assert _staleness_violations(ssp, staleness=STALENESS) == 0
    for result in ssp:
        assert all(c - m <= STALENESS for c, m in enumerate(result["min_clocks"], start=1)), result["min_clocks"]
        assert result["final"] == _expected_final(3, 8)
    assert _staleness_violations(unbounded, staleness=STALENESS) > 0
