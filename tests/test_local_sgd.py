"""Local SGD over real gloo processes: workers step alone, models are averaged every H."""
import traceback

import pytest
import torch

from conftest import run_workers
from paratrain.errors import ConfigError
from paratrain.parallel.local_sgd import LocalSGDSync

WORLD, SYNC_EVERY, STEPS, BATCH, LR = 3, 3, 7, 8, 0.1


def make_model(rank: int) -> torch.nn.Module:
    torch.manual_seed(rank)            # different on purpose: attach must broadcast rank 0's
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def batch(rank: int, step: int):
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, 5, generator=generator), torch.randn(BATCH, 2, generator=generator)


def sum_loss(model, x, y):
    return ((model(x) - y) ** 2).sum()   # a sum over the batch, as the Trainer expects


def simulate(world: int):
    """All workers in one process: local steps with the local mean gradient, average every H."""
    models = [make_model(0) for _ in range(world)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR) for m in models]
    for step in range(1, STEPS + 1):
        for rank, (model, optimizer) in enumerate(zip(models, optimizers)):
            sum_loss(model, *batch(rank, step)).div(BATCH).backward()
            optimizer.step()
            optimizer.zero_grad()
        if step % SYNC_EVERY == 0:
            with torch.no_grad():
                for tensors in zip(*(m.parameters() for m in models)):
                    mean = sum(tensors) / world
                    for tensor in tensors:
                        tensor.copy_(mean)
    return [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models]


def local_sgd_worker(rank, world, port, queue):
    try:
        torch.set_num_threads(1)
        from datetime import timedelta
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=timedelta(seconds=30))
        model = make_model(rank)
        sync = LocalSGDSync(sync_every=SYNC_EVERY, timeout_s=30)
        sync.attach(list(model.parameters()))
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        snapshots = {}
        for step in range(1, STEPS + 1):
            sum_loss(model, *batch(rank, step)).backward()
            sync.reduce(1.0 / (BATCH * world))     # the Trainer's scale: 1 / global batch
            optimizer.step()
            sync.after_step()
            optimizer.zero_grad()
            snapshots[step] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        before_final = snapshots[STEPS].clone()
        sync.average_now()
        after_final = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.distributed.destroy_process_group()
        # plain lists: a tensor in a Queue is shared through this process's memory,
        # which is gone once it exits
        queue.put((rank, {"snapshots": {k: v.tolist() for k, v in snapshots.items()},
                          "before_final": before_final.tolist(),
                          "after_final": after_final.tolist(), "bytes": sync.bytes_sent,
                          "payload": sync.payload_bytes,
                          "averages": sync.averages}))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


@pytest.mark.timeout(120)
def test_local_sgd_matches_a_simulation_and_averages_every_h_steps():
    results = run_workers(local_sgd_worker, WORLD, 110)
    for rank, result in enumerate(results):
        assert isinstance(result, dict), f"rank {rank} failed:\n{result}"
        result["before_final"] = torch.tensor(result["before_final"])
        result["after_final"] = torch.tensor(result["after_final"])
        result["snapshots"] = {k: torch.tensor(v) for k, v in result["snapshots"].items()}
    expected = simulate(WORLD)
    numel = expected[0].numel()
    for rank, result in enumerate(results):
        # after 7 steps (averaged at 3 and 6) every worker holds its own model
        assert torch.allclose(result["before_final"], expected[rank], atol=1e-6), rank
        assert result["averages"] == STEPS // SYNC_EVERY + 1
        assert result["payload"] == result["averages"] * numel * 4
        assert result["bytes"] == result["averages"] * (2 * (WORLD - 1) * numel * 4 // WORLD)   # ring
    for step in (SYNC_EVERY, 2 * SYNC_EVERY):   # right after an average: identical everywhere
        assert all(torch.equal(r["snapshots"][step], results[0]["snapshots"][step]) for r in results)
    assert not torch.equal(results[0]["snapshots"][1], results[1]["snapshots"][1])
    mean = sum(expected) / WORLD
    for result in results:
        assert torch.allclose(result["after_final"], mean, atol=1e-6)


def test_single_worker_scales_by_its_own_batch_and_never_talks():
    model = torch.nn.Linear(3, 1)
    sync = LocalSGDSync(sync_every=2)
    sync.attach(list(model.parameters()))
    sum_loss(model, torch.ones(4, 3), torch.zeros(4, 1)).backward()
    grad = model.weight.grad.clone()
    sync.reduce(0.25)
    assert torch.allclose(model.weight.grad, grad * 0.25)
    for _ in range(4):
        sync.after_step()
    assert sync.bytes_sent == 0 and sync.steps == 4


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_bad_sync_every_is_rejected_by_name(value):
    with pytest.raises(ConfigError, match="sync_every"):
        LocalSGDSync(sync_every=value)


@pytest.mark.timeout(120)
def test_fit_with_local_sgd_ends_with_one_agreed_model():
    """23 steps per epoch with H=5: the epoch's end is no sync point, yet every worker
    must evaluate and save the same (averaged) model."""
    import subprocess
    import sys
    from conftest import SCRIPTS, clean_env
    result = subprocess.run([sys.executable, "-m", "paratrain.cli", "launch", "-n", "2",
                             str(SCRIPTS / "fit_replicas_worker.py"), "local_sgd", "5"],
                            capture_output=True, text=True, timeout=100, env=clean_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [l.split("CHECKSUMS ")[1].split() for l in result.stdout.splitlines() if "CHECKSUMS" in l]
    assert len(lines) == 2 and len(set(lines[0])) == 1, lines
