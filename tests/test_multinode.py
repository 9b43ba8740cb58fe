"""Multi-node training across hosts in network namespaces (scripts/netns_hosts.py).

2 hosts x 2 processes must end with the same parameters, bit for bit, as 4 processes
on one host: the ranks, the data each rank reads and the collectives are the same;
only the network between the processes differs. Skips when not root.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import secrets
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("netns_hosts", ROOT / "scripts" / "netns_hosts.py")
netns_hosts = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("netns_hosts", netns_hosts)
_spec.loader.exec_module(netns_hosts)

_REASON = netns_hosts.unavailable_reason()
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=f"netns unavailable: {_REASON}"),
              pytest.mark.slow]

# Small and fast: the MLP on digits for one epoch (23 steps of 64).
TRAIN_ARGS = ["--model", "mlp", "--epochs", "1", "--batch-size", "64", "--seed", "7",
              "--json", "--no-progress"]
ENV = {"PARATRAIN_TIMEOUT": "60", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _summary(output: str) -> dict | None:
    """The ``--json`` summary: the last line of rank 0's output that is a JSON object."""
    for line in reversed(output.splitlines()):
        line = line.split("]: ", 1)[-1].strip()  # paratrain launch prefixes "[rank0]: "
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "param_checksum" in record:
                return record
    return None


def _one_host(strategy: str, workers: int, *extra: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "paratrain.cli", "train", "--strategy", strategy,
                             "--workers", str(workers), *extra, *TRAIN_ARGS],
                            capture_output=True, text=True, timeout=240, cwd=ROOT, env={**os.environ, **ENV})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = _summary(result.stdout)
    assert summary is not None, result.stdout[-3000:]
    return summary


def _on_hosts(hosts, argv_for_host, timeout: float = 240, extra_env: dict | None = None
              ) -> list[tuple[int, str]]:
    """Start one command per host, wait for all; (returncode, output) per host."""
    processes = [hosts.popen(i, argv_for_host(i), env={**ENV, **(extra_env or {})}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=ROOT)
                 for i in range(hosts.num_hosts)]
    results = []
    for process in processes:
        output, _ = process.communicate(timeout=timeout)  # teardown kills the rest on timeout
        results.append((process.returncode, output))
    return results


def _only_summary(results: list[tuple[int, str]]) -> dict:
    for code, output in results:
        assert code == 0, output[-4000:]
    summaries = [s for s in (_summary(output) for _, output in results) if s is not None]
    assert len(summaries) == 1, [output[-2000:] for _, output in results]  # rank 0 alone prints it
    return summaries[0]


@pytest.mark.timeout(420)
def test_allreduce_two_hosts_via_torchrun_matches_one_host():
    with netns_hosts.NetnsHosts(2) as hosts:
        port = hosts.free_port(0)
        run_id = hosts.config.prefix
        results = _on_hosts(hosts, lambda i: [
            *hosts.torchrun_argv(i, nproc_per_node=2, port=port, run_id=run_id),
            "-m", "paratrain.cli", "train", "--strategy", "allreduce", *TRAIN_ARGS])
        across_hosts = _only_summary(results)
    one_host = _one_host("allreduce", 4)
    assert across_hosts["steps"] == one_host["steps"] == 23
    assert across_hosts["param_checksum"] == one_host["param_checksum"]
    assert across_hosts["final_loss"] == one_host["final_loss"]


@pytest.mark.timeout(420)
def test_dist_sync_two_hosts_via_paratrain_launch_matches_one_host():
    pytest.importorskip("paratrain.ps.server")
    pytest.importorskip("paratrain.parallel.ps_sync")  # the worker side of the parameter server
    with netns_hosts.NetnsHosts(2) as hosts:
        port = hosts.free_port(0)
        # node 0 hosts the store and the server; the server binds host 0's address so
        # host 1's workers can reach it. Each node's launcher would make up its own job
        # secret, so the nodes are given one.
        secret = {"PARATRAIN_SECRET": secrets.token_hex(16)}
        results = _on_hosts(hosts, extra_env=secret, argv_for_host=lambda i: [
            sys.executable, "-m", "paratrain.cli", "launch", "-n", "2", "--servers", "1",
            "--nnodes", "2", "--node-rank", str(i), "--master-addr", hosts.address(0),
            "--master-port", str(port), "--bind", hosts.address(0),
            "--", "-mparatrain.cli", "train", "--strategy", "dist_sync", "--servers", "1", *TRAIN_ARGS])
        across_hosts = _only_summary(results)
    one_host = _one_host("dist_sync", 4, "--servers", "1")
    assert across_hosts["steps"] == one_host["steps"] == 23
    assert across_hosts["param_checksum"] == one_host["param_checksum"]
