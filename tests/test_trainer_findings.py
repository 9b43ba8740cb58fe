"""The Trainer and fit findings of issue 10, each with real processes on loopback:
clipping between backward and step, LR schedules and callbacks reaching every rank (and
the servers), frozen weights and BatchNorm buffers, and async's final weights."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, SCRIPTS, clean_env


def run_parts(tmp_path, kvstore: str) -> list[dict]:
    servers = ("--servers", "1") if kvstore.startswith("dist_") else ()
    out = tmp_path / kvstore
    result = subprocess.run([sys.executable, "-m", "paratrain.cli", "launch", "-n", "2", *servers,
                             str(SCRIPTS / "trainer_findings_worker.py"), "--kvstore", kvstore, "--out", str(out)],
                            capture_output=True, text=True, timeout=200, env=clean_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((tmp_path / f"{kvstore}.rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("findings")
    return {kvstore: run_parts(tmp, kvstore) for kvstore in ("allreduce", "dist_sync", "dist_async")}


@pytest.mark.timeout(600)
def test_clipping_between_backward_and_step_keeps_replicas_identical(runs):
    """Finding 1: the gradients seen after backward are already the workers' sums."""
    a, b = runs["allreduce"]
    assert a["clip"] == b["clip"]


@pytest.mark.timeout(600)
def test_a_scheduler_on_trainer_optimizer_changes_dist_sync_as_it_changes_allreduce(runs):
    """Finding 2: StepLR on trainer.optimizer reaches the servers (the learning rate
    travels with each commit), so dist_sync matches allreduce with the same schedule."""
    sync, allreduce = runs["dist_sync"][0], runs["allreduce"][0]
    assert sync["scheduler"] != sync["no_scheduler"]
    worst = max(abs(x - y) for p, q in zip(sync["scheduler_params"], allreduce["scheduler_params"])
                for x, y in zip(_flat(p), _flat(q)))
    assert worst <= 1e-6, worst


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kvstore", ["allreduce", "dist_sync"])
def test_an_lr_change_in_a_fit_callback_happens_on_every_rank(runs, kvstore):
    """Finding 3: callbacks run on every rank (logging ones on rank 0 only)."""
    a, b = runs[kvstore]
    assert a["callback"] == b["callback"]
    assert runs["dist_sync"][0]["callback"] == runs["allreduce"][0]["callback"]   # and on the servers


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kvstore", ["dist_sync", "dist_async"])
def test_frozen_weights_and_buffers_follow_rank0_under_dist(runs, kvstore):
    """Finding 4 (and 5: async workers pull the final weights with pull_weights)."""
    a, b = runs[kvstore]
    assert a["frozen"] == b["frozen"]
    assert a["buffers"] == b["buffers"]
    assert a["params"] == b["params"]


def _flat(value):
    if isinstance(value, list):
        return [x for item in value for x in _flat(item)]
    return [value]
