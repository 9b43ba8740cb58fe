"""dist_sync / dist_ssp semantics with real processes: a TCP store, ZeroMQ servers
and worker processes on loopback (see ps_harness.py)."""
from __future__ import annotations

import os
import random
import time

import pytest
import torch

from ps_harness import PSJob, pull_error_and_wait, worker_env_kvstore

LR = 2.0
ROUNDS = 3


# ----------------------------------------------------------------------------- worker bodies


def worker_sync_exact(with_optimizer: bool) -> dict:
    """MXNet's dist_sync test on our API, for fp32 and fp16, a small and a split key."""
    kv = worker_env_kvstore("dist_sync")
    rank, n = kv.rank, kv.num_workers
    shapes = {"small": (2, 3), "big": (1200, 1200)}
    dtypes = {"32": torch.float32, "16": torch.float16}
    keys = {f"{name}{bits}": (shape, dtype) for name, shape in shapes.items() for bits, dtype in dtypes.items()}
    for key, (shape, dtype) in keys.items():
        kv.init(key, torch.ones(shape, dtype=dtype))
    if with_optimizer:
        kv.set_optimizer({"type": "sgd", "lr": LR})
    rng = random.Random(rank)
    errors = []
    for i in range(ROUNDS):
        for key, (shape, dtype) in keys.items():
            time.sleep(rng.random() * 0.02)  # vary the arrival order at the servers
            sign = -1 if with_optimizer else 1
            kv.push(key, sign * torch.ones(shape, dtype=dtype) * (rank + 1))
            out = torch.empty(shape, dtype=dtype)
            kv.pull(key, out=out)
            expected = 1 + LR * n * (n + 1) / 2 * (i + 1) if with_optimizer else n * (n + 1) / 2
            if not torch.equal(out, torch.full(shape, expected, dtype=dtype)):
                errors.append(f"round {i} key {key}: got {out.flatten()[:3].tolist()} "
                              f"... expected {expected}")
    split = {k: sorted(s.server for s in kv._keys[k].slices) for k in keys}
    reproducible = _rank_order_rounds(kv) if with_optimizer else {}
    kv.close()
    return {"errors": errors, "servers": split, **reproducible}


def _rank_order_rounds(kv, rounds: int = 3) -> dict:
    """Random fp32 pushes with jittered timing under the server SGD: the result is
    bitwise the rank-order sum, whatever order the pushes arrived in."""
    n = kv.num_workers
    kv.init("random", torch.zeros(1000))
    expected, out = torch.zeros(1000), torch.empty(1000)
    for step in range(rounds):
        grads = [torch.randn(1000, generator=torch.Generator().manual_seed(1000 * step + r)) for r in range(n)]
        time.sleep(random.random() * 0.03)
        kv.push("random", grads[kv.rank])
        kv.pull("random", out=out)
        total = grads[0].clone()
        for g in grads[1:]:
            total.add_(g)
        expected.add_(total, alpha=-LR)
    return {"bitwise_equal": bool(torch.equal(out, expected)), "checksum": float(out.double().sum())}


def worker_dies_early() -> dict:
    kv = worker_env_kvstore("dist_sync")
    kv.init("k", torch.zeros(4))
    if kv.rank == kv.num_workers - 1:
        os._exit(0)   # dies without a goodbye
    kv.push("k", torch.ones(4))
    return pull_error_and_wait(kv, "k", torch.empty(4))


def worker_ssp(mode: str, staleness: int, steps: int, slow_rank: int, slow_s: float) -> dict:
    """Linear regression on the servers; every push and pull is timestamped."""
    kv = worker_env_kvstore(mode, staleness=staleness)
    rank = kv.rank
    true_w = torch.linspace(-1, 1, 8)
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(rank))
    targets = data @ true_w
    kv.init("w", torch.zeros(8))
    kv.set_optimizer({"type": "sgd", "lr": 0.05})
    w = torch.zeros(8)
    pushed_at, pulled_at, min_clocks = [], [], []
    for _ in range(steps):
        if rank == slow_rank:
            time.sleep(slow_s)
        grad = 2 * data.T @ (data @ w - targets) / len(data)
        # Stamped before sending: no server can have the push earlier than this.
        pushed_at.append(time.monotonic())
        kv.push("w", grad)
        kv.pull("w", out=w)
        pulled_at.append(time.monotonic())
        min_clocks.append(kv.last_min_clock["w"])
    kv.barrier()
    kv.pull("w", out=w)
    loss = float(((data @ w - targets) ** 2).mean())
    kv.close()
    return {"pushed_at": pushed_at, "pulled_at": pulled_at, "min_clocks": min_clocks, "loss": loss}


# ----------------------------------------------------------------------------- tests


@pytest.mark.timeout(180)
@pytest.mark.parametrize("with_optimizer", [True, False], ids=["server_sgd", "no_optimizer"])
def test_dist_sync_is_exact_for_fp32_fp16_small_and_split_keys(with_optimizer):
    with PSJob(num_workers=4, num_servers=2) as job:
        job.start_servers()
        results = job.run_workers("test_ps_dist:worker_sync_exact", {"with_optimizer": with_optimizer})
        assert all("error" not in r for r in results), results
        for result in results:
            assert result["errors"] == []
            assert result["servers"]["big32"] == [0, 1] and result["servers"]["big16"] == [0, 1]
            assert len(result["servers"]["small32"]) == 1
        if with_optimizer:  # sums in rank order: bitwise the same on every worker, every run
            assert all(r["bitwise_equal"] for r in results)
            assert len({r["checksum"] for r in results}) == 1
        # Every worker said goodbye: the servers end on their own.
        assert job.wait_servers_exit() == [0, 0]


@pytest.mark.timeout(120)
def test_dead_worker_makes_sync_fail_with_its_rank_not_hang():
    with PSJob(num_workers=2, num_servers=1, timeout_s=3) as job:
        job.start_servers()
        results = job.run_workers("test_ps_dist:worker_dies_early", timeout_s=60)
    assert "missing worker(s) [1]" in results[0]["error"], results[0]
    assert results[0]["waited_s"] < 3 + 10


def _staleness_violations(results: list[dict], staleness: int) -> int:
    """How often a pull returned to a worker at clock c before every worker had
    pushed clock c - staleness (clocks 1-based, times from one monotonic clock)."""
    violations = 0
    for fast in results:
        for c, returned in enumerate(fast["pulled_at"], start=1):
            need = c - staleness
            if need >= 1 and any(other["pushed_at"][need - 1] > returned for other in results):
                violations += 1
    return violations


@pytest.mark.timeout(180)
def test_ssp_keeps_every_worker_within_staleness_and_converges():
    args = {"staleness": 2, "steps": 12, "slow_rank": 2, "slow_s": 0.3}
    with PSJob(num_workers=3, num_servers=1) as job:
        job.start_servers()
        ssp = job.run_workers("test_ps_dist:worker_ssp", {"mode": "dist_ssp", **args})
    assert all("error" not in r for r in ssp), ssp
    assert _staleness_violations(ssp, staleness=2) == 0
    for result in ssp:
        # what the servers reported agrees with the timestamps
        assert all(c - m <= 2 for c, m in enumerate(result["min_clocks"], start=1))
        assert result["loss"] < 0.05 * 8, result["loss"]
    # The same run under dist_async breaks the bound: the check above can fail.
    with PSJob(num_workers=3, num_servers=1) as job:
        job.start_servers()
        unbounded = job.run_workers("test_ps_dist:worker_ssp", {"mode": "dist_async", **args})
    assert all("error" not in r for r in unbounded), unbounded
    assert _staleness_violations(unbounded, staleness=2) > 0
