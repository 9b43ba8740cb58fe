"""The README's "From Python" snippet and every script in examples/ run, as users
would run them (issue 10)."""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, clean_env, json_objects

EXAMPLES = REPO / "examples"


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run(*command: str, timeout: float = 200) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout,
                            env=clean_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.timeout(120)
def test_the_readme_snippet_runs_as_written():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_snippet(), "README.md", "exec"), {"__name__": "readme"})
    accuracy = float(out.getvalue().split()[0])
    assert accuracy > 0.8, out.getvalue()


@pytest.mark.timeout(200)
def test_custom_loop_under_the_launcher():
    lines = [line for line in run("-m", "paratrain.cli", "launch", "-n", "2", str(EXAMPLES / "custom_loop.py")).stdout
             .splitlines() if "held-out accuracy" in line]
    assert len(lines) == 2 and len({line.split("checksum")[1] for line in lines}) == 1, lines   # replicas equal
    assert all(float(line.split("accuracy ")[1].split()[0]) > 0.8 for line in lines), lines


@pytest.mark.timeout(300)
def test_one_script_runs_unchanged_under_paratrain_launch_and_torchrun():
    def results(output: str) -> list[dict]:
        # both ranks share torchrun's stdout (seen in CI: "{rank 1}{rank 0}" on one line)
        return sorted((r for r in json_objects(output) if "checksum" in r), key=lambda r: r["rank"])
    launched = results(run("-m", "paratrain.cli", "launch", "-n", "2", str(EXAMPLES / "any_launcher.py")).stdout)
    torchrun = results(run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(EXAMPLES / "any_launcher.py")).stdout)
    assert [(r["rank"], r["world"]) for r in launched] == [(r["rank"], r["world"]) for r in torchrun] == [(0, 2), (1, 2)]
    assert len({r["checksum"] for r in launched + torchrun}) == 1   # the same run, whoever launched it


@pytest.mark.timeout(200)
def test_kvstore_basics_on_real_servers():
    output = run("-m", "paratrain.cli", "launch", "-n", "2", "--servers", "1", str(EXAMPLES / "kvstore_basics.py")).stdout
    assert output.count("w=6.0") == 2


@pytest.mark.timeout(200)
def test_gpt2_example_trains():
    pytest.importorskip("transformers")
    result = run(str(EXAMPLES / "gpt2_fit.py"), "--max-bytes", "16000")
    summary = json.loads(result.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["tied"] and summary["accuracy"] is None and summary["heldout_loss"] < 5.0, summary
