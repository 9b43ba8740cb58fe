"""The built-in recommendation workload: its options and their rules, its defaults, the
held-out AUC from a histogram summed over ranks, and ``paratrain train --model dlrm``
end to end (in one process, and on 2 workers with a server under dist_ssp)."""
from __future__ import annotations

import json

import pytest
import torch

from paratrain import config as cfg
from paratrain.errors import ConfigError
from paratrain.metrics import auc_from_histogram, histogram_auc_bound, roc_auc, score_histogram
from paratrain.train.objective import StepResult
from conftest import cli_in_process, run_paratrain, summary_of

TINY = ("--table-sizes", "20000,500,50", "--train-samples", "8192", "--heldout-samples", "2048",
        "--batch-size", "256", "--json", "--no-progress")


def resolve(**values):
    return cfg.resolve_run_config(cfg.parse_run_config(values))


@pytest.mark.parametrize("values, match", [
    (dict(table_sizes="10,20"), "--table-sizes '10,20' applies to --model dlrm, not to --model cnn"),
    (dict(embedding_dim=8, model="mlp"), "--embedding-dim 8 applies to --model dlrm"),
    (dict(train_samples=100), "--train-samples 100 applies to --dataset clicks, not to --dataset digits"),
    (dict(model="dlrm", table_sizes="10,x"), "--table-sizes '10,x'"),
    (dict(model="dlrm", table_sizes="0"), "comma-separated ints"),
])
def test_dlrm_options_are_refused_elsewhere_and_checked(values, match):
    with pytest.raises(ConfigError, match=match):
        resolve(**values)


def test_workload_defaults_fill_only_the_options_not_given():
    config = resolve(model="dlrm", lr=0.01, epochs=2)
    assert (config.data.dataset, config.optim.optimizer, config.optim.lr_schedule, config.job.batch_size) == \
        ("clicks", "adam", "linear", 512)
    assert (config.optim.lr, config.job.epochs) == (0.01, 2)          # given: kept
    assert resolve(dataset="clicks").model.model == "dlrm"            # the dataset's own model
    assert resolve(model="dlrm", optimizer="sgd").optim.momentum == 0.9
    assert resolve().model.model == "cnn" and resolve().job.epochs == 8   # other workloads untouched


def test_auc_from_summed_histograms_is_close_to_the_exact_auc_and_says_how_close():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50_000, generator=g) * 2
    labels = (torch.rand(50_000, generator=g) < torch.sigmoid(logits)).float()
    parts = [score_histogram(logits[i::3], labels[i::3]) for i in range(3)]   # three workers' shares
    total = sum(parts)
    exact, bound = roc_auc(logits, labels), histogram_auc_bound(total)
    assert abs(auc_from_histogram(total) - exact) <= bound < 1e-3
    assert auc_from_histogram(score_histogram(torch.tensor([-3.0, 3.0]), torch.tensor([0.0, 1.0]))) == 1.0
    with pytest.raises(ConfigError, match="both classes"):
        auc_from_histogram(score_histogram(torch.zeros(3), torch.zeros(3)))


def test_heldout_stats_travel_in_the_summed_vector():
    totals = StepResult(1.5, 3, stats=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), metrics={"m": 0.5})
    back = totals.from_vector([2 * v for v in totals.to_vector()], 2)
    assert back.stats.tolist() == [2.0, 4.0, 6.0] and back.metrics == {"m": 1.0} and back.samples == 6


def test_dlrm_trains_in_one_process_and_reports_clicks_metrics():
    code, out, err = cli_in_process("train", "--model", "dlrm", "--strategy", "local", "--workers", "1", *TINY)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["accuracy"] is None and summary["heldout_logloss"] == summary["heldout_loss"]
    assert 0.5 < summary["heldout_auc"] < 1 and summary["heldout_auc_bound"] < 0.01
    assert summary["planted_logloss"] < summary["heldout_logloss"] < summary["final_loss"] + 0.2


@pytest.mark.timeout(240)
def test_dlrm_under_allreduce_trains_its_tables_as_plain_embeddings_as_one_process_does():
    """Under allreduce the ServerEmbeddings are ordinary tables in every worker, with
    dense gradients allreduced: the same model as one process on the same global batch."""
    code, out, err = cli_in_process("train", "--model", "dlrm", "--strategy", "local", "--workers", "1", *TINY)
    assert code == 0, err
    local = json.loads(out.strip().splitlines()[-1])
    both = summary_of(run_paratrain("train", "--model", "dlrm", "--strategy", "allreduce", "--workers", "2", *TINY,
                                    timeout=200))
    assert both["steps"] == local["steps"] == 8192 // 256
    assert abs(both["heldout_logloss"] - local["heldout_logloss"]) < 1e-4, (both, local)
    assert abs(both["heldout_auc"] - local["heldout_auc"]) < 1e-3


def test_worker_checkpoints_of_tables_on_the_servers_are_refused():
    code, _, err = cli_in_process("train", "--model", "dlrm", "--strategy", "dist_sync", "--checkpoint-dir", "ck", *TINY)
    assert code == 2 and "embedding tables live on the parameter servers" in err
    code, _, err = cli_in_process("train", "--model", "dlrm", "--strategy", "dist_sync", "--max-grad-norm", "1", *TINY)
    assert code == 2 and "--max-grad-norm" in err
    code, _, err = cli_in_process("train", "--model", "dlrm", "--strategy", "dist_async", "--optimizer", "adamw", *TINY)
    assert code == 2 and "need a rule with a lazy row update, one of: sgd, adam, adagrad" in err


@pytest.mark.timeout(240)
def test_dlrm_on_two_workers_and_a_server_under_dist_ssp():
    """The tables live on the server; workers depart (not say goodbye) before the
    held-out evaluation, which still reads them."""
    summary = summary_of(run_paratrain("train", "--model", "dlrm", "--strategy", "dist_ssp", "--workers", "2",
                                       "--servers", "1", *TINY, timeout=200))
    assert sum(summary["steps_per_worker"]) == 8192 // (256 // 2)   # every local batch of one epoch, once
    assert summary["accuracy"] is None and 0.5 < summary["heldout_auc"] < 1
    assert summary["heldout_logloss"] < 0.6 and summary["planted_logloss"] < summary["heldout_logloss"]


@pytest.mark.timeout(300)
def test_a_sigkilled_server_holding_tables_resumes_from_its_snapshot(tmp_path):
    """dist_async with the tables on one server, which is SIGKILLed mid-run: restarted
    from its snapshot (rows, per-row Adam state), the workers resend, and the run ends
    with every acknowledged push applied once and a model that learned."""
    import random
    import sys

    from conftest import run_with_kills
    from test_resilience_ps import log_lines_counter

    snapshots = tmp_path / "snap"
    args = ("train", "--model", "dlrm", "--strategy", "dist_async", "--workers", "2", "--servers", "1", *TINY,
            "--log-interval", "1", "--max-restarts", "1", "--server-snapshot-dir", str(snapshots),
            "--server-snapshot-every", "10")
    lines, stderr, code, kills = run_with_kills([sys.executable, "-m", "paratrain.cli", *args], [12], 1,
                                                random.Random(7), progress=log_lines_counter(),
                                                marker=b"paratrain.ps.server")
    assert code == 0, stderr[-3000:]
    assert kills == [12] and "server 0 killed by SIGKILL; restarting it from its snapshot" in stderr
    assert "resumed from its snapshot" in "".join(lines)
    final = torch.load(snapshots / "server0.pt", weights_only=True)
    assert final["applied_pushes"] == final["acknowledged_pushes"] > 0
    summary = json.loads(lines[-1])
    assert summary["heldout_logloss"] < 0.6 and 0.5 < summary["heldout_auc"] < 1, summary
