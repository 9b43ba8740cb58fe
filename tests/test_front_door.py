"""fit takes what PyTorch users have (issue 10): a transformers GPT-2 with dict batches
and its own loss, under every strategy, with clipping and an LR schedule; and
2 workers x B equal 1 worker x 2B. Real processes on loopback."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SCRIPTS, clean_env

pytest.importorskip("transformers")

STRATEGIES = {            # name -> (launcher flags, worker flags)
    "allreduce": ((), ()),
    "dist_sync": (("--servers", "1"), ()),
    "dist_async": (("--servers", "1"), ()),
    "dist_ssp": (("--servers", "1"), ()),
    "local_sgd": ((), ("--sync-every", "4")),
    "allreduce+powersgd": ((), ("--compression", "powersgd:4")),
}


def run_gpt2(tmp_path, name: str, workers: int = 2) -> list[dict]:
    strategy = name.split("+")[0] if workers > 1 else "local"
    launcher, extra = STRATEGIES[name] if workers > 1 else ((), ())
    out = tmp_path / name
    worker = [str(SCRIPTS / "front_door_worker.py"), "--strategy", strategy, "--out", str(out), *extra]
    command = ([sys.executable, "-m", "paratrain.cli", "launch", "-n", str(workers), *launcher, *worker]
               if workers > 1 else [sys.executable, *worker])
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=clean_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [dict(json.loads((tmp_path / f"{name}.rank{r}.json").read_text()),
                 params=torch.load(tmp_path / f"{name}.rank{r}.pt")) for r in range(workers)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run_gpt2(tmp_path_factory.mktemp("one"), "allreduce", workers=1)[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_gpt2_trains_under_every_strategy(tmp_path, name, one_process):
    ranks = run_gpt2(tmp_path, name)
    for rank in ranks:
        losses = rank["losses"]
        assert len(losses) >= 15 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
        assert rank["tied"], "lm_head and wte are no longer one tensor"
        assert rank["accuracy"] is None   # a language model is not scored as classification
    # Every strategy ends with one model on every rank: lockstep ones step together,
    # async ones pull the servers' final weights once every worker finished.
    assert len({rank["checksum"] for rank in ranks}) == 1, [rank["checksum"] for rank in ranks]
    if name in ("allreduce", "dist_sync"):
        # 2 workers x 8 against 1 worker x 16, 20 steps with clipping and a cosine schedule.
        worst = max((ranks[0]["params"][k] - one_process["params"][k]).abs().max().item()
                    for k in one_process["params"])
        assert worst <= 1e-5, f"max abs difference {worst} from one process"
