"""Elastic data parallelism (paratrain.comm.elastic): survivors of a dead worker train
on at the next step, a replacement (or a warm spare) joins at a step boundary with
the live state from a healthy peer, and the result equals a run without failures.

Real processes on loopback; kills are SIGKILL/SIGSTOP by PID of processes the test
started, at random steps and at fixed points of a step (a deterministic injector)."""
import os
import random
import signal
import time
from datetime import timedelta

import pytest
import torch

from conftest import run_workers
from elastic_harness import GLOBAL_BATCH, ElasticJob, LinearReplica, default_options
from paratrain.comm.elastic import ElasticConfig, ElasticGroup
from paratrain.comm.elastic_membership import (decide_membership, member_order, pending_joiners, sync_plan,
                                               waiting_for)
from paratrain.errors import ConfigError

NUM_SLOTS = 3


# -- pure logic ----------------------------------------------------------------------


def test_config_names_the_bad_field():
    with pytest.raises(ConfigError, match="min_workers=0"):
        ElasticConfig(min_workers=0)
    with pytest.raises(ConfigError, match="timeout_s"):
        ElasticConfig(timeout_s=-1)
    with pytest.raises(ConfigError, match="dead_after_s=1.5 must exceed two heartbeats"):
        ElasticConfig(dead_after_s=1.5, heartbeat_every_s=1.0)


def test_membership_waits_for_each_member_of_the_last_epoch_until_it_arrives_or_is_gone():
    previous = ["0.1", "1.1", "2.1"]
    assert waiting_for(previous, ["0.1", "2.1"], set()) == ["1.1"]
    assert decide_membership(previous, ["0.1", "2.1"], [], set(), min_units=2) is None
    assert decide_membership(previous, ["2.1", "0.1"], [], {"1.1"}, min_units=2) == ["0.1", "2.1"]


def test_membership_admits_live_joiners_and_waits_below_min_workers():
    previous = ["0.1", "1.1", "2.1"]
    assert decide_membership(previous, ["0.1"], [], {"1.1", "2.1"}, min_units=2) is None
    assert decide_membership(previous, ["0.1"], ["1.2", "2.2"], {"1.1", "2.1", "2.2"}, min_units=2) == ["0.1", "1.2"]
    # rank follows the launcher slot, so a full group has rank == slot
    assert decide_membership(["0.1", "2.1"], ["2.1", "0.1"], ["1.3"], set(), min_units=1) == ["0.1", "1.3", "2.1"]
    assert sorted(["10.1", "2.4", "2.3"], key=member_order) == ["2.3", "2.4", "10.1"]


def test_pending_joiners_skip_members_the_dead_and_the_replaced():
    assert pending_joiners(["1.2", "2.2"], ["0.1", "1.2"], set()) == ["2.2"]
    assert pending_joiners(["2.2"], ["0.1"], {"2.2"}) == []
    assert pending_joiners(["2.2", "2.3"], ["0.1"], set()) == ["2.3"]


def test_sync_plan_picks_the_lowest_rank_with_the_most_committed_steps():
    def plan(steps):
        result = sync_plan(steps, [0] * len(steps))
        assert result.target == max(steps) and result.undo == []
        return result.sources[0], result.behind

    assert plan([5, 6, 6]) == (1, [0])
    assert plan([4, 4]) == (0, [])
    assert plan([0, 9, 3]) == (1, [0, 2])


# -- real processes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def unkilled_params():
    """Final parameters of a run without failures (the same options as the others)."""
    result = ElasticJob(NUM_SLOTS, default_options()).run([], random.Random(0))
    params = [torch.tensor(result.done[slot]["params"]) for slot in range(NUM_SLOTS)]
    assert all(torch.equal(params[0], p) for p in params[1:])
    return params[0]


def _check_consistent(result, unkilled: torch.Tensor, steps: int) -> None:
    """Every slot finished, all identical after every step and at the end, equal to the
    unkilled run up to summation order, every step summed the whole global batch, and
    no step was ever repeated."""
    assert sorted(result.done) == list(range(NUM_SLOTS)), (result.done.keys(), "too late:", result.too_late)
    params = [torch.tensor(result.done[slot]["params"]) for slot in range(NUM_SLOTS)]
    for slot, p in enumerate(params):
        assert torch.equal(p, params[0]), f"slot {slot} differs from slot 0 by {(p - params[0]).abs().max()}"
    assert (params[0] - unkilled).abs().max() <= 1e-5, (params[0] - unkilled).abs().max()
    assert {event.samples for event in result.steps} == {GLOBAL_BATCH}
    finishers = {(slot, report["incarnation"]) for slot, report in result.done.items()}
    checksums = {}
    for event in result.steps:   # the finishers that committed step s hold bitwise the same parameters after it
        if (event.slot, event.incarnation) in finishers:   # (a dead worker may have committed a step the others redid)
            assert checksums.setdefault(event.step, event.checksum) == event.checksum, f"differ after step {event.step}"
    for slot, report in result.done.items():
        committed, loads = report["committed"], report["loads"]
        assert committed[-1] == steps
        assert all(after >= before for before, after in loads), loads   # a state sync never goes back
        for before, after in zip(committed, committed[1:]):   # +1 per step, or a jump forward at a sync
            assert after == before + 1 or (after > before and any(a == after - 1 for _, a in loads)), (slot, before, after)
    per_process = set()
    for event in result.steps:   # no process commits a step twice
        key = (event.slot, event.incarnation, event.step)
        assert key not in per_process, f"step {event.step} committed twice by {event.slot}.{event.incarnation}"
        per_process.add(key)


@pytest.mark.timeout(240)
def test_sigkill_at_random_steps_survivors_go_on_and_a_replacement_joins(unkilled_params):
    rng = random.Random(20261201)
    plan = [{"step": rng.randrange(10, 30), "signal": "KILL", "jitter_s": 0.02},
            {"step": rng.randrange(70, 90), "signal": "KILL", "jitter_s": 0.02}]
    options = default_options()
    result = ElasticJob(NUM_SLOTS, options).run(plan, rng)
    assert len(result.kills) == 2
    _check_consistent(result, unkilled_params, options["steps"])
    for kill in result.kills:
        recovery = result.recovery(kill, NUM_SLOTS)
        print("recovery after SIGKILL (new process):", recovery)
        assert recovery["first_step_s"] is not None and recovery["first_step_s"] < 5, recovery
        assert recovery["full_size_s"] is not None, recovery
    never_killed = set(range(NUM_SLOTS)) - {kill["slot"] for kill in result.kills}
    for slot in never_killed:   # it saw both: the group shrank and grew back twice
        kinds = [h["kind"] for h in result.done[slot]["history"]]
        assert kinds.count("shrink") == 2 and kinds.count("grow") == 2, kinds


@pytest.mark.timeout(240)
def test_failures_at_every_point_of_a_step_leave_identical_exact_replicas(unkilled_params):
    """Deterministic injector: a worker dies before its gradient allreduce, after it,
    between the step's last collective and its optimizer step, and after that step
    (the leader, slot 0, among them); warm spares take the slots."""
    fail_at = [[1, 1, 12, "before_allreduce"], [2, 1, 40, "after_allreduce"], [0, 1, 70, "before_commit"],
               [1, 2, 100, "after_commit"]]
    options = default_options(fail_at=fail_at)
    result = ElasticJob(NUM_SLOTS, options, spares=1).run([], random.Random(0))
    _check_consistent(result, unkilled_params, options["steps"])
    assert {(r["incarnation"]) for r in result.done.values()} == {2, 3}, result.done   # 0.2, 1.3, 2.2
    leader_history = result.done[0]["history"]
    assert leader_history[0]["kind"] == "rejoin" and leader_history[0]["synced"] == [0], leader_history[0]


@pytest.mark.timeout(240)
def test_a_hung_worker_is_killed_by_the_launcher_watch_and_replaced_by_a_spare(unkilled_params):
    options = default_options()
    dead_after = options["elastic"]["dead_after_s"]
    result = ElasticJob(NUM_SLOTS, options, spares=1).run([{"step": 25, "signal": "STOP"}], random.Random(3))
    _check_consistent(result, unkilled_params, options["steps"])
    stop, killed = result.kills[0], result.hung_killed[0]
    assert killed["slot"] == stop["slot"]
    beat = options["elastic"]["heartbeat_every_s"]
    assert dead_after - beat - 0.2 <= killed["t"] - stop["t"] <= dead_after + 3, killed["t"] - stop["t"]
    recovery = result.recovery(stop, NUM_SLOTS)
    print("recovery after SIGSTOP (warm spare):", recovery)
    assert recovery["full_size_s"] is not None and recovery["full_size_s"] < dead_after + 5, recovery


def _diverged_regroup(rank, world, port, queue):
    """3 members form an epoch; slot 1 takes one step the others did not (its
    allreduce completed, theirs failed); they re-form: slot 1's state wins."""
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=rank == 0, wait_for_workers=False,
                                       timeout=timedelta(seconds=20))
    replica = LinearReplica(seed=rank)   # different initial weights: epoch 0 makes them equal
    group = ElasticGroup(store, slot=rank, num_slots=world, replica=replica,
                         config=ElasticConfig(min_workers=world, timeout_s=20, dead_after_s=4, heartbeat_every_s=0.5))
    group.start()
    after_start = replica.flat_params()
    if rank == 1:
        with torch.no_grad():
            for param in replica.model.parameters():
                param.add_(0.5)
        replica.step += 1
    group._recover("test: slot 1 committed a step the others did not", time.time())
    queue.put((rank, {"after_start": after_start, "params": replica.flat_params(), "step": replica.step,
                      "history": [vars(r) for r in group.history], "epoch": group.epoch}))
    time.sleep(0.5)   # let the others read from the store before rank 0 (its host) exits
    group.close()
    os._exit(0)


@pytest.mark.timeout(120)
def test_the_member_with_the_most_committed_steps_gives_its_state_to_those_behind():
    results = run_workers(_diverged_regroup, NUM_SLOTS, 90)
    assert all(r["after_start"] == results[0]["after_start"] for r in results)
    assert all(r["params"] == results[1]["params"] and r["step"] == 1 and r["epoch"] == 1 for r in results)
    assert results[1]["params"] != results[0]["after_start"]
    assert results[0]["history"][-1]["synced"] == [0, 2]
