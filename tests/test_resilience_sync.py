"""Synchronous training survives dead workers: the launcher restarts the group from the
last checkpoint (--max-restarts, --checkpoint-every), and torchrun's restarts resume the
same way. Workers are killed with SIGKILL by PID (children of the launcher we started)."""
import json
import random
import subprocess
import sys

import pytest

from conftest import SCRIPTS, clean_env, in_background, json_objects, run_paratrain, run_with_kills, summary_of

STEPS_PER_EPOCH = 23        # 1437 digits / global batch 64, rounded up
ARGS = ("train", "--workers", "2", "--model", "mlp", "--epochs", "6", "--json", "--no-progress")


@pytest.fixture(scope="module")
def reference():
    """The undisturbed run of ARGS, started when first asked for and overlapping that
    test's own run."""
    return in_background(run_paratrain, *ARGS)


def _step_of(line: str) -> int | None:
    # "[rank0]: Epoch[2] Batch [4-5]\tSpeed: ..." -> global step 2 * 23 + 5
    if "Epoch[" not in line or "Batch [" not in line:
        return None
    epoch = int(line.split("Epoch[")[1].split("]")[0])
    batch = int(line.split("Batch [")[1].split("]")[0].split("-")[1])
    return epoch * STEPS_PER_EPOCH + batch


def _train_with_kills(tmp_path, args, kills_wanted: int, every: int, seed: int) -> dict:
    """Run ``args`` with checkpoints and restarts; SIGKILL a random worker (by PID) at
    ``kills_wanted`` random steps; check each kill lost at most ``every`` steps. Return
    the --json summary."""
    rng = random.Random(seed)
    kill_steps = sorted(rng.sample(range(8, 40 if kills_wanted == 1 else 120), kills_wanted))
    cmd = [sys.executable, "-m", "paratrain.cli", *args, "--checkpoint-dir", str(tmp_path / "ck"),
           "--checkpoint-every", str(every), "--max-restarts", str(kills_wanted), "--log-interval", "1",
           "--log-dir", str(tmp_path / "logs")]
    # Workers only: servers run paratrain.ps.server, not paratrain.cli.
    lines, stderr, code, kills = run_with_kills(cmd, kill_steps, 2, rng, progress=_step_of)
    assert code == 0, stderr[-3000:]
    assert len(kills) == kills_wanted, f"only killed at {kills}"
    assert stderr.count("restarting the workers") == kills_wanted
    steps = [json.loads(l)["step"] for l in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    rewinds = [(before, after) for before, after in zip(steps, steps[1:]) if after <= before]
    assert len(rewinds) == kills_wanted, rewinds
    for before, after in rewinds:   # each kill lost at most the checkpoint interval
        assert before - (after - 1) <= every, f"lost {before - after + 1} steps (> {every})"
    return json.loads(lines[-1])


@pytest.mark.timeout(300)
def test_chaos_three_sigkills_allreduce_recovers_exactly(tmp_path, reference):
    summary = _train_with_kills(tmp_path, ARGS, kills_wanted=3, every=5, seed=1234)
    reference = summary_of(reference.result())
    # Resume is exact, so recovery costs nothing in the result: same parameters bit for bit.
    assert summary["param_checksum"] == reference["param_checksum"]
    assert abs(summary["accuracy"] - reference["accuracy"]) <= 0.01


@pytest.mark.timeout(240)
def test_dist_sync_group_restarts_from_checkpoint_with_fresh_servers(tmp_path):
    """dist_sync's policy for a dead worker: the launcher restarts the workers from
    their checkpoint and starts new servers; with --max-restarts the optimizer runs on
    the workers, so the checkpoint holds all the state and recovery is exact."""
    args = ("train", "--strategy", "dist_sync", "--servers", "1", "--workers", "2", "--model", "mlp",
            "--epochs", "2", "--json", "--no-progress")
    reference = in_background(run_paratrain, *args, "--max-restarts", "1", timeout=150)
    summary = _train_with_kills(tmp_path, args, kills_wanted=1, every=5, seed=7)
    assert summary["param_checksum"] == summary_of(reference.result())["param_checksum"]


@pytest.mark.timeout(200)
def test_torchrun_max_restarts_resumes_from_checkpoint(tmp_path, reference):
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           str(SCRIPTS / "flaky_train.py"), *ARGS, "--checkpoint-dir", str(ck), "--checkpoint-every", "5"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=clean_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "flaky_train: killing myself" in result.stdout + result.stderr
    summary = json_objects(result.stdout)[-1]   # both ranks share torchrun's stdout
    assert summary["param_checksum"] == summary_of(reference.result())["param_checksum"]
