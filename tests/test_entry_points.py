"""The command-line entry points (issue 10, findings 7 and 8): ``paratrain server``
parses its own arguments, and a parameter-server job under torchrun is one command."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, clean_env, json_objects, run_paratrain


def test_paratrain_server_parses_its_own_arguments():
    assert run_paratrain("server", "--help", timeout=60).returncode == 0
    outside = run_paratrain("server", "--snapshot-every", "5", timeout=60)   # not started as a server
    assert outside.returncode == 2, outside.stderr
    assert "PARATRAIN_ROLE" in outside.stderr and len(outside.stderr.strip().splitlines()) == 1, outside.stderr


@pytest.mark.timeout(240)
def test_dist_sync_under_torchrun_is_one_command():
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "paratrain.cli", "train", "--strategy", "dist_sync", "--servers", "1",
                             "--epochs", "1", "--json", "--no-progress"],
                            capture_output=True, text=True, timeout=220, env=clean_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json_objects(result.stdout)[-1]   # the server shares the workers' stdout
    assert summary["strategy"] == "dist_sync" and summary["steps_per_worker"] == [23, 23]
    assert "server 0 done" in result.stdout   # rank 0's server finished after every goodbye
