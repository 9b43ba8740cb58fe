"""``paratrain train --model gpt`` under every strategy (issue 11): each run trains the
built-in GPT on a few kilobytes of pytext in real processes (gloo on loopback, real
ZeroMQ servers) and reports the language-model summary."""
from __future__ import annotations

import math
import os

import pytest

from conftest import REPO, clean_env, run_paratrain, summary_of

TINY = ("--model", "gpt", "--dataset", "factory_example:tinytext", "--n-layer", "1", "--n-embd", "16",
        "--n-head", "2", "--context", "16", "--batch-size", "16", "--epochs", "1", "--warmup-steps", "4",
        "--json", "--no-progress")


def _tests_on_path() -> dict:
    path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    return clean_env(PYTHONPATH=path)


@pytest.mark.parametrize("argv", [
    ("--strategy", "local", "--workers", "1"),
    ("--strategy", "allreduce", "--workers", "2"),
    ("--strategy", "allreduce", "--workers", "2", "--compression", "2bit"),
    ("--strategy", "allreduce", "--workers", "2", "--compression", "powersgd"),
    ("--strategy", "local_sgd", "--workers", "2", "--sync-every", "4"),
    ("--strategy", "dist_sync", "--workers", "2"),
    ("--strategy", "dist_async", "--workers", "2"),
    ("--strategy", "dist_ssp", "--workers", "2", "--compression", "fp16"),
], ids=lambda argv: "-".join(a.lstrip("-") for a in argv[1::2] if a != "2"))
def test_the_gpt_trains_and_reports_bits_per_byte(argv):
    summary = summary_of(run_paratrain("train", *TINY, *argv, timeout=170, env=_tests_on_path()))
    # 511 windows of 16 bytes at batch 16: 32 steps in lockstep; asynchronous workers take
    # their 64 batches of 8 as they come. Bytes start at 8 bits per byte.
    if argv[1] in ("dist_async", "dist_ssp"):
        assert sum(summary["steps_per_worker"]) == 64, summary
    else:
        assert summary["steps"] == 32 and summary["steps_per_worker"] == [32] * int(argv[3]), summary
    assert math.isfinite(summary["heldout_bpb"]) and 3.0 < summary["heldout_bpb"] < 8.0, summary
    assert summary["heldout_loss"] == pytest.approx(summary["heldout_bpb"] * math.log(2), rel=1e-6)
    assert summary["tokens_per_sec"] > 0 and summary["accuracy"] is None, summary
