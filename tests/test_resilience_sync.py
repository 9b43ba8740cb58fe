"""Synchronous training survives dead workers: the launcher restarts the group from the
last checkpoint (--max-restarts, --checkpoint-every), and torchrun's restarts resume the
same way. Workers are killed with SIGKILL by PID (children of the launcher we started)."""
import json
import os
import random
import signal
import subprocess
import sys

import pytest

from conftest import SCRIPTS, children_running, clean_env, run_paratrain, summary_of

STEPS_PER_EPOCH = 23        # 1437 digits / global batch 64, rounded up
ARGS = ("train", "--workers", "2", "--model", "mlp", "--epochs", "6", "--json", "--no-progress")


def _step_of(line: str) -> int | None:
    # "[rank0]: Epoch[2] Batch [4-5]\tSpeed: ..." -> global step 2 * 23 + 5
    if "Epoch[" not in line or "Batch [" not in line:
        return None
    epoch = int(line.split("Epoch[")[1].split("]")[0])
    batch = int(line.split("Batch [")[1].split("]")[0].split("-")[1])
    return epoch * STEPS_PER_EPOCH + batch


@pytest.mark.timeout(300)
def test_chaos_three_sigkills_allreduce_recovers_exactly(tmp_path):
    reference = summary_of(run_paratrain(*ARGS))
    every = 5
    rng = random.Random(1234)
    kill_steps = sorted(rng.sample(range(8, 120), 3))
    cmd = [sys.executable, "-m", "paratrain.cli", *ARGS, "--checkpoint-dir", str(tmp_path / "ck"),
           "--checkpoint-every", str(every), "--max-restarts", "3", "--log-interval", "1",
           "--log-dir", str(tmp_path / "logs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    lines, kills = [], []
    try:
        for line in proc.stdout:
            lines.append(line)
            step = _step_of(line)
            if step is not None and kill_steps and step >= kill_steps[0]:
                victims = children_running(proc.pid)
                if len(victims) == 2:
                    victim = rng.choice(victims)
                    os.kill(victim, signal.SIGKILL)
                    kills.append(step)
                    kill_steps.pop(0)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr[-3000:]
    assert len(kills) == 3, f"only killed at {kills}"
    assert stderr.count("restarting the workers") == 3
    summary = json.loads(lines[-1])
    # Resume is exact, so recovery costs nothing in the result: same parameters bit for bit.
    assert summary["param_checksum"] == reference["param_checksum"]
    assert abs(summary["accuracy"] - reference["accuracy"]) <= 0.01
    # Each kill lost at most the checkpoint interval: rank 0's metrics restart at the last checkpoint.
    steps = [json.loads(l)["step"] for l in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    rewinds = [(before, after) for before, after in zip(steps, steps[1:]) if after <= before]
    assert len(rewinds) == 3, rewinds
    for before, after in rewinds:
        assert before - (after - 1) <= every, f"lost {before - after + 1} steps (> {every})"


@pytest.mark.timeout(200)
def test_torchrun_max_restarts_resumes_from_checkpoint(tmp_path):
    reference = summary_of(run_paratrain(*ARGS))
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           str(SCRIPTS / "flaky_train.py"), *ARGS, "--checkpoint-dir", str(ck), "--checkpoint-every", "5"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=clean_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "flaky_train: killing myself" in result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["param_checksum"] == reference["param_checksum"]
