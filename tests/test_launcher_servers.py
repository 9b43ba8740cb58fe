"""The launcher watches its parameter servers (issue 14, finding 6): a server that
exits during start-up, or dies mid-run without --max-restarts, ends the job within
10 s, exit non-zero, with the server's own error line; no worker waits for its
network timeout. Real launcher processes; the server is found and killed by PID."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import children_running, clean_env

ARGS = ["train", "--strategy", "dist_sync", "--workers", "2", "--servers", "1", "--model", "mlp", "--no-progress"]
WITHIN_S = 10.0


class Launch:
    """``paratrain train ARGS`` with every output line (stdout and stderr) and the
    monotonic time it arrived."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "paratrain.cli", *ARGS, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=clean_env())
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, predicate, timeout_s: float) -> float:
        """When the first line for which ``predicate`` holds arrived (bounded wait)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if predicate(line):
                    return at
            assert self.proc.poll() is None or self._reader.is_alive(), "\n".join(l for _, l in self.lines[-30:])
            time.sleep(0.01)
        raise AssertionError(f"no such line within {timeout_s}s:\n" + "\n".join(l for _, l in self.lines[-30:]))

    def finish(self, timeout_s: float) -> tuple[int, float, list[str]]:
        """(exit status, when it exited, the launcher's own lines)."""
        try:
            self.proc.wait(timeout=timeout_s)
            ended = time.monotonic()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        return self.proc.returncode, ended, [line for _, line in self.lines if line.startswith("paratrain launch:")]


@pytest.mark.timeout(240)
def test_a_server_that_exits_at_start_up_ends_the_job_with_its_error(tmp_path):
    (tmp_path / "server0.pt").write_bytes(b"not a snapshot")
    job = Launch("--epochs", "1", "--server-snapshot-dir", str(tmp_path))
    said = job.wait_for(lambda line: line.startswith("[server0]: paratrain server: error:"), 180)
    code, ended, launcher_lines = job.finish(60)
    assert code == 2, launcher_lines
    assert ended - said <= WITHIN_S, ended - said
    assert len(launcher_lines) == 1 and "server 0 exit code 2" in launcher_lines[0], launcher_lines
    assert "the snapshot of server 0 cannot be read" in launcher_lines[0]


@pytest.mark.timeout(300)
def test_a_dist_sync_server_killed_mid_run_ends_the_job_at_once_naming_it():
    job = Launch("--epochs", "30", "--step-delay", "0.05", "--log-interval", "1")
    job.wait_for(lambda line: "Epoch[1] Batch [" in line, 180)   # training runs
    servers = children_running(job.proc.pid, b"paratrain.ps.server")
    assert len(servers) == 1, servers
    killed = time.monotonic()
    os.kill(servers[0], signal.SIGKILL)
    code, ended, launcher_lines = job.finish(120)
    assert code == 1, launcher_lines
    assert ended - killed <= WITHIN_S, ended - killed   # the workers' network timeout is 60 s
    assert any("server 0 killed by SIGKILL" in line and "stopped the job" in line for line in launcher_lines), \
        launcher_lines
