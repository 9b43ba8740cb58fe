"""Pipeline and hybrid parallelism with real processes over real sockets.

Each test starts S*D worker processes (spawn), which join a gloo group through a
TCP store the test hosts on a free port, and run several strategies one after the
other to pay the process start-up once. Results come back as files; the test
compares them with the same model trained in this process.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

from paratrain.train.pipeline_strategy import PipelineStrategy, assemble_stage_states
from paratrain.train.strategy import TrainSpec

STEPS = 5
LR = {"lr": 0.1, "momentum": 0.9}


def make_model(seed: int = 0, width: int = 32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def make_data(samples: int, seed: int = 1):
    """Digits (8x8 images, 10 classes) without a download, standardised."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    x = torch.tensor(x, dtype=torch.float32)[order]
    x = (x - x.mean(0)) / (x.std(0) + 1.0)   # +1: some pixels are constant
    return x[:samples], torch.tensor(y)[order][:samples]


def train_reference(model, x, y, batch: int, steps: int, tail: int = 0):
    """One process, whole global batch per step (then a short ``tail`` batch, if
    given): what every parallel run must match."""
    optimizer = torch.optim.SGD(model.parameters(), **LR)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    bounds = [(step * batch, (step + 1) * batch) for step in range(steps)]
    bounds += [(steps * batch, steps * batch + tail)] if tail else []
    for begin, end in bounds:
        optimizer.zero_grad()
        loss_fn(model(x[begin:end]), y[begin:end]).backward()
        for p in model.parameters():
            p.grad /= end - begin
        optimizer.step()
    return model


def count_correct(model, x, y) -> int:
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum())


# ------------------------------------------------------------- worker side


def _worker(rank: int, world: int, port: int, runs: list[dict], data, out_dir: str) -> None:
    from paratrain.comm.process_group import init_process_group
    from paratrain.env import read_env
    torch.set_num_threads(1)
    try:
        env = read_env({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "PARATRAIN_STORE_HOSTED": "1", "PARATRAIN_TIMEOUT": "30"})
        init_process_group(env)   # the test owns the group, so strategies can come and go
        x, y = data
        for run in runs:
            result = _run_strategy(env, run, x, y)
            torch.save(result, os.path.join(out_dir, f"{run['name']}.rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"error.rank{rank}"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run_strategy(env, run: dict, x, y) -> dict:
    if run.get("peer_gone"):
        return _run_with_peer_gone(env, run, x, y)
    strategy = PipelineStrategy(stages=run["stages"], micro_batches=run["micro_batches"],
                                schedule=run["schedule"], replicas=run.get("replicas", 1),
                                balance=run.get("balance", "params"), transport=run.get("transport", "zmq"),
                                sample_input=x[:8] if run.get("balance") == "time" else None, env=env)
    model = make_model(seed=run.get("seed", 0))
    strategy.setup(model, TrainSpec(optimizer="sgd", optimizer_params=LR))
    if "resume_from" in run:
        strategy.load_state_dict(torch.load(run["resume_from"].format(stage=strategy.stage)))
    batch, first = run["batch"], run.get("start_step", 0)
    share = batch // strategy.data_world
    peaks, losses = [], []
    for step in range(first, first + run["steps"]):
        begin = step * batch + strategy.data_rank * share   # this replica's contiguous slice
        result = strategy.train_step((x[begin:begin + share], y[begin:begin + share]), batch)
        peaks.append(strategy.last_timing.peak_activation_bytes)
        losses.append(result.loss)
    if run.get("tail"):   # an epoch's short last batch: uneven micro-batches
        begin, share = (first + run["steps"]) * batch, run["tail"] // strategy.data_world
        begin += strategy.data_rank * share
        losses.append(strategy.train_step((x[begin:begin + share], y[begin:begin + share]), run["tail"]).loss)
    held_out = None
    if run.get("held_out"):   # this replica's share of the held-out set, as fit cuts it
        mine = torch.arange(run["held_out"]).tensor_split(strategy.data_world)[strategy.data_rank]
        held_out = strategy.evaluate([(x[-run["held_out"]:][mine], y[-run["held_out"]:][mine])])
    out = {"stage": strategy.stage, "replica": strategy.data_rank, "peak": max(peaks), "losses": losses,
           "full_state": strategy.full_model_state(), "checksum": strategy.param_checksum(),
           "shard": strategy.checkpoint_shard(), "state": strategy.state_dict(), "counts": strategy.counts,
           "eval": None if held_out is None else (held_out.correct, held_out.samples, held_out.loss)}
    if "save_to" in run and strategy.checkpoint_shard() is not None:
        torch.save(strategy.state_dict(), run["save_to"].format(stage=strategy.stage))
    strategy.close()
    return out


def _run_with_peer_gone(env, run: dict, x, y) -> dict:
    """Stage 1 leaves right after setup; stage 0 must fail within its timeout, naming it."""
    from paratrain.errors import CommTimeout
    env = dataclasses.replace(env, timeout_s=2.0)
    strategy = PipelineStrategy(stages=2, micro_batches=2, schedule=run["schedule"], env=env)
    strategy.setup(make_model(), TrainSpec(optimizer="sgd", optimizer_params=LR))
    out = {"stage": strategy.stage}
    if strategy.stage == 0:
        start = time.monotonic()
        try:
            strategy.train_step((x[:8], y[:8]), 8)
        except CommTimeout as error:
            out.update(error=str(error), seconds=time.monotonic() - start)
    strategy.close()
    return out


def run_job(world: int, runs: list[dict], data, tmp_path, timeout_s: float = 240.0) -> dict:
    """Start ``world`` workers, wait for them (bounded), return results per run and rank."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, store.port, runs, data, str(tmp_path)))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        errors = [(tmp_path / f"error.rank{r}").read_text() for r in range(world)
                  if (tmp_path / f"error.rank{r}").exists()]
        assert not errors, "worker failed:\n" + "\n".join(errors)
        assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}"
    finally:
        for p in procs:   # only the processes this test started
            if p.is_alive():
                p.kill()
                p.join(5)
    return {run["name"]: [torch.load(tmp_path / f"{run['name']}.rank{r}.pt") for r in range(world)]
            for run in runs}


def max_diff(state_a: dict, state_b: dict) -> float:
    assert state_a.keys() == state_b.keys()
    return max(float((state_a[k] - state_b[k]).abs().max()) for k in state_a)


def checksum_of(model) -> str:
    from paratrain.train.trainer import param_checksum
    return param_checksum(model.parameters())


# ------------------------------------------------------------------ tests


@pytest.mark.timeout(300)
def test_two_stages_match_one_process_resume_and_checkpoint_accuracy(tmp_path):
    x, y = make_data(32 * 40 + 200)
    batch = 16
    runs = [
        {"name": "gpipe", "stages": 2, "micro_batches": 8, "schedule": "gpipe", "batch": batch, "steps": STEPS},
        {"name": "1f1b", "stages": 2, "micro_batches": 8, "schedule": "1f1b", "batch": batch, "steps": STEPS},
        {"name": "gloo", "stages": 2, "micro_batches": 4, "schedule": "1f1b", "batch": batch, "steps": STEPS,
         "transport": "gloo"},
        {"name": "timed", "stages": 2, "micro_batches": 2, "schedule": "gpipe", "batch": batch, "steps": STEPS,
         "balance": "time"},
        {"name": "long", "stages": 2, "micro_batches": 4, "schedule": "1f1b", "batch": 32, "steps": 40,
         "held_out": 200},
        # Resume: stop after 3 steps, save per-stage checkpoints, continue in a fresh
        # strategy built from a different seed: must match 6 uninterrupted steps.
        {"name": "first_half", "stages": 2, "micro_batches": 4, "schedule": "gpipe", "batch": batch, "steps": 3,
         "save_to": str(tmp_path / "stage{stage}.pt")},
        {"name": "second_half", "stages": 2, "micro_batches": 4, "schedule": "gpipe", "batch": batch, "steps": 3,
         "start_step": 3, "seed": 99, "resume_from": str(tmp_path / "stage{stage}.pt")},
        {"name": "peer_gone", "schedule": "1f1b", "peer_gone": True},
    ]
    results = run_job(2, runs, (x, y), tmp_path)
    # A stage whose neighbour is gone does not hang: it raises within its timeout, naming the peer.
    gone = results["peer_gone"][0]
    assert "rank 1" in gone["error"] and gone["seconds"] < 10, gone

    reference = train_reference(make_model(), x, y, batch, STEPS)
    six_steps = train_reference(make_model(), x, y, batch, 6).state_dict()
    assert max_diff(results["second_half"][0]["full_state"], six_steps) <= 1e-5
    # Rank 0 times the layers and every rank uses its cut.
    assert results["timed"][0]["counts"] == results["timed"][1]["counts"]
    for name in ("gpipe", "1f1b", "gloo", "timed"):
        for rank_result in results[name]:
            assert max_diff(rank_result["full_state"], reference.state_dict()) <= 1e-5, name
        # 1e-5 equal, not bitwise: sums over micro-batches round differently.
        assert len({r["checksum"] for r in results[name]}) == 1
    # Memory measured by the stages: 1F1B holds at most S micro-batches, GPipe all M.
    for gpipe, one_f in zip(results["gpipe"], results["1f1b"]):
        assert one_f["peak"] < gpipe["peak"], (one_f["peak"], gpipe["peak"])
    # Bitwise-equal parameters give the one-process model's checksum exactly.
    single = make_model()
    single.load_state_dict(results["gpipe"][0]["full_state"])
    assert results["gpipe"][0]["checksum"] == checksum_of(single)

    # Checkpoint: per-stage shards assembled into one state dict a one-process model loads.
    long = results["long"]
    assert [r["shard"] for r in long] == ["stage0", "stage1"]
    assembled = assemble_stage_states([r["state"] for r in long])
    single = make_model(seed=123)
    single.load_state_dict(assembled)
    held_x, held_y = x[-200:], y[-200:]
    correct, samples, _ = long[0]["eval"]
    assert long[1]["eval"] == long[0]["eval"]
    assert samples == 200 and correct / samples > 0.5   # it learned something
    assert count_correct(single, held_x, held_y) == correct   # the same held-out accuracy
    assert max_diff(assembled, long[0]["full_state"]) == 0.0


@pytest.mark.timeout(300)
def test_four_stages_and_hybrid_2x2_match_one_process(tmp_path):
    x, y = make_data(16 * STEPS + 10)
    runs = [
        {"name": "gpipe4", "stages": 4, "micro_batches": 8, "schedule": "gpipe", "batch": 16, "steps": STEPS,
         "balance": "uniform"},
        {"name": "1f1b4", "stages": 4, "micro_batches": 8, "schedule": "1f1b", "batch": 16, "steps": STEPS,
         "balance": "uniform"},
        # Then a tail of 10 samples: 5 per replica in micro-batches of 3 and 2.
        {"name": "hybrid", "stages": 2, "replicas": 2, "micro_batches": 2, "schedule": "1f1b", "batch": 16,
         "steps": STEPS, "tail": 10},
        {"name": "hybrid_gpipe", "stages": 2, "replicas": 2, "micro_batches": 4, "schedule": "gpipe", "batch": 16,
         "steps": STEPS},
    ]
    results = run_job(4, runs, (x, y), tmp_path)
    reference = train_reference(make_model(), x, y, 16, STEPS).state_dict()
    with_tail = train_reference(make_model(), x, y, 16, STEPS, tail=10).state_dict()
    for name, expected in (("gpipe4", reference), ("1f1b4", reference), ("hybrid", with_tail),
                           ("hybrid_gpipe", reference)):
        for rank_result in results[name]:
            assert max_diff(rank_result["full_state"], expected) <= 1e-5, name
        assert len({r["checksum"] for r in results[name]}) == 1, name
    assert results["gpipe4"][0]["counts"] == [2, 2, 2, 1]
    for gpipe, one_f in zip(results["gpipe4"], results["1f1b4"]):
        assert one_f["peak"] < gpipe["peak"], (one_f["stage"], one_f["peak"], gpipe["peak"])
    hybrid = results["hybrid"]
    assert [(r["replica"], r["stage"]) for r in hybrid] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["shard"] for r in hybrid] == ["stage0", "stage1", None, None]
    # Both replicas report the same global loss on every rank.
    assert len({tuple(r["losses"]) for r in hybrid}) == 1
