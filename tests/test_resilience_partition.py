"""A network partition between namespace hosts (host 1's link down for 10 s) during a
two-host dist_sync run: the run recovers, or stops with an error naming the workers it
could not reach; it never hangs. Skips when network namespaces are unavailable."""
from __future__ import annotations

import importlib.util
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("netns_hosts", ROOT / "scripts" / "netns_hosts.py")
netns_hosts = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("netns_hosts", netns_hosts)
_spec.loader.exec_module(netns_hosts)
_REASON = netns_hosts.unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"netns unavailable: {_REASON}")

ENV = {"PARATRAIN_TIMEOUT": "60", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
PARTITION_S = 10


def _set_link(hosts, index: int, state: str) -> None:
    subprocess.run(["ip", "-n", hosts.config.host(index), "link", "set", netns_hosts.HOST_INTERFACE, state],
                   check=True, timeout=10)


@pytest.mark.timeout(420)
def test_partition_of_a_host_for_10s_recovers_or_names_the_unreachable_workers():
    with netns_hosts.NetnsHosts(2) as hosts:
        port = hosts.free_port(0)
        secret = {"PARATRAIN_SECRET": secrets.token_hex(16)}
        argv = lambda i: [sys.executable, "-m", "paratrain.cli", "launch", "-n", "2", "--servers", "1",
                          "--nnodes", "2", "--node-rank", str(i), "--master-addr", hosts.address(0),
                          "--master-port", str(port), "--bind", hosts.address(0), "--", "-mparatrain.cli",
                          "train", "--strategy", "dist_sync", "--servers", "1", "--model", "mlp", "--epochs", "3",
                          "--step-delay", "0.1", "--log-interval", "1", "--json", "--no-progress"]
        procs = [hosts.popen(i, argv(i), env={**ENV, **secret}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=ROOT) for i in range(2)]
        outputs: list[list[str]] = [[], []]
        started = threading.Event()

        def read(index: int) -> None:
            for line in procs[index].stdout:
                outputs[index].append(line)
                if "Epoch[" in line:
                    started.set()

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
        for reader in readers:
            reader.start()
        assert started.wait(240), "".join(outputs[0])[-3000:]
        _set_link(hosts, 1, "down")
        partitioned_at = time.monotonic()
        time.sleep(PARTITION_S)
        _set_link(hosts, 1, "up")
        codes = [proc.wait(timeout=200) for proc in procs]   # never hangs: bounded here
        ended_after = time.monotonic() - partitioned_at
        for reader in readers:
            reader.join(timeout=5)
    text = "".join(outputs[0]) + "".join(outputs[1])
    print("host 1, last lines:\n" + "".join(outputs[1][-40:]))
    print(f"exit codes {codes}, ended {ended_after:.0f}s after the partition began")
    print("\n".join(line for line in text.splitlines() if ("Error:" in line or "paratrain launch" in line) and "frame #" not in line))
    if codes == [0, 0]:
        assert '"param_checksum"' in text   # recovered and finished
    else:
        # Stopped: the error names the workers on the cut-off host (ranks 2 and 3).
        named = re.findall(r"worker\(s\) \[([\d, ]+)\] died or are unreachable", text)
        assert named, text[-4000:]
        assert all({int(r) for r in ranks.split(",")} <= {2, 3} for ranks in named), named
        # And the cut-off host's workers name what they lost: node 0 (its store, or a peer there).
        host1_errors = [line for line in outputs[1] if "Error:" in line and "frame #" not in line]
        assert host1_errors and all(hosts.address(0) in line for line in host1_errors), host1_errors
