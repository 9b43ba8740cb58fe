"""Dynamic dispatch: in dist_async a worker twice as fast takes about twice the batches.

Every worker gets a simulated 50 ms of compute per step (--step-delay), and ranks 1-3
are made 2x slower, so "2x faster" holds in wall-clock time even on 2 shared cores.
"""
import statistics

import pytest

from conftest import run_paratrain, summary_of


@pytest.mark.timeout(200)
def test_twice_as_fast_worker_gets_about_twice_the_batches():
    summary = summary_of(run_paratrain(
        "train", "--strategy", "dist_async", "--workers", "4", "--servers", "1", "--epochs", "3",
        "--straggler", "1:2,2:2,3:2", "--step-delay", "0.05", "--json", "--no-progress", "--log-interval", "1000",
        timeout=180))
    counts = summary["steps_per_worker"]
    # every sample once per epoch: 1437 samples in units of 16 -> 90 units per epoch
    assert sum(counts) == 3 * 90, counts
    ratio = counts[0] / statistics.mean(counts[1:])
    assert 1.6 <= ratio <= 2.4, f"fast worker took {ratio:.2f}x the batches of the slow ones: {counts}"
