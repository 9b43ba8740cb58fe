"""The jobs paratrain train runs (issue 11): a user's own model and dataset from the
command line, and the built-in GPT on pytext (its defaults and what it reports)."""
from __future__ import annotations

import json
import math

import pytest

from conftest import cli_in_process
from paratrain import config as cfg
from paratrain.workloads import build_workload


def test_a_user_model_and_dataset_train_from_the_command_line():
    code, out, err = cli_in_process("train", "--model", "factory_example:model", "--dataset", "factory_example:data",
                             "--strategy", "local", "--workers", "1", "--epochs", "3", "--batch-size", "32",
                             "--lr", "0.1", "--json", "--no-progress")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["accuracy"] > 0.7 and summary["steps"] == 18


@pytest.mark.parametrize("argv, fragment", [
    (("--model", "factory_example:not_a_model"), "returned str; a model factory returns an nn.Module"),
    (("--dataset", "factory_example:not_a_pair"), "returned list; a dataset factory returns (train, heldout)"),
    (("--model", "factory_example:nothing"), "factory_example has no callable 'nothing'"),
    (("--model", "no_such_module:model"), "module 'no_such_module' cannot be imported"),
    (("--model", "bogus"), "is not a built-in name"),
])
def test_bad_factories_are_one_line_exit_2(argv, fragment):
    argv = (*argv, "--dataset", "factory_example:data") if "--dataset" not in argv else argv
    code, _, err = cli_in_process("train", *argv, "--strategy", "local", "--workers", "1", "--epochs", "1")
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_gpt_has_its_own_defaults_and_shape_options():
    resolved = cfg.resolve_run_config(cfg.parse_run_config({"model": "gpt"}))
    assert (resolved.data.dataset, resolved.optim.optimizer, resolved.job.epochs) == ("pytext", "adamw", 1)
    kept = cfg.resolve_run_config(cfg.parse_run_config({"model": "gpt", "lr": "0.001", "optimizer": "sgd"}))
    assert (kept.optim.lr, kept.optim.optimizer, kept.optim.momentum) == (0.001, "sgd", 0.9)   # yours win
    with pytest.raises(cfg.ConfigError, match="--n-layer 2 applies to --model gpt, not to --model cnn"):
        cfg.resolve_run_config(cfg.parse_run_config({"n_layer": "2"}))
    workload = build_workload(cfg.resolve_run_config(cfg.parse_run_config(
        {"model": "gpt", "n_layer": "1", "n_embd": "32", "n_head": "2", "context": "16"})))
    assert workload.task.name == "lm" and workload.train.context == 16
    assert workload.model.lm_head.weight is workload.model.transformer.wte.weight
    loss, metrics = workload.task.loss_fn(workload.model(workload.train[0][0][None]), [None, workload.train[0][1][None]])
    assert abs(metrics["bpb"] - float(loss.detach()) / math.log(2)) < 1e-9
    with pytest.raises(cfg.ConfigError, match="--model gpt needs a language-model dataset"):
        build_workload(cfg.resolve_run_config(cfg.parse_run_config({"model": "gpt", "dataset": "digits"})))
