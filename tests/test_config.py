"""The one typed config (paratrain.config): flags generated from it, TOML round trips,
and every option/strategy rule it declares refused in one line. In-process: these
exercise parsing and validation, which start nothing."""
from __future__ import annotations

import inspect

import pytest
import torch

from conftest import cli_in_process
from paratrain import cli
from paratrain import config as cfg
from paratrain.strategies import STRATEGIES

#: The option surface, frozen: a new option must be added here on purpose (and to docs).
OPTIONS = sorted("""
workers servers strategy epochs batch_size seed model table_sizes embedding_dim n_layer n_head n_embd context
dataset train_samples heldout_samples loader_workers pin_memory optimizer lr momentum
accumulate amp max_grad_norm weight_decay beta1 beta2 lr_schedule warmup_steps min_lr_factor stages micro_batches schedule replicas split_points sync_every staleness backup_workers compression bind
fragments outer_optimizer outer_lr outer_momentum
secret_file checkpoint_dir checkpoint_every keep_checkpoints resume max_restarts server_snapshot_dir server_snapshot_every min_workers spares heartbeat_timeout
log_dir timeline log_interval no_progress json straggler step_delay
""".split())


def train_flags() -> set[str]:
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    return {option for action in train._actions for option in action.option_strings if option.startswith("--")}


def test_the_option_surface_is_frozen_and_every_flag_is_in_the_tree():
    assert sorted(cfg.FIELD_SECTIONS) == OPTIONS
    assert train_flags() == {cfg.flag(name) for name in OPTIONS} | {"--help", "--config", "--print-config"}


@pytest.mark.parametrize("argv", [
    (), ("--strategy", "dist_ssp", "--workers", "4", "--staleness", "3", "--compression", "2bit:0.5"),
    ("--strategy", "hybrid", "--stages", "2", "--replicas", "2", "--schedule", "gpipe"),
    ("--strategy", "local_sgd", "--sync-every", "4", "--optimizer", "adam", "--lr", "0.001"),
    ("--strategy", "dist_sync", "--servers", "2", "--backup-workers", "1", "--checkpoint-dir", "ck", "--json"),
])
def test_print_config_round_trips(tmp_path, argv):
    code, printed, err = cli_in_process("train", *argv, "--print-config")
    assert code == 0, err
    path = tmp_path / "run.toml"
    path.write_text(printed)
    code, again, err = cli_in_process("train", "--config", str(path), "--print-config")
    assert code == 0, err
    assert again == printed
    resolved = cfg.resolve_run_config(cfg.parse_run_config(sections=cfg.read_toml(path)))
    assert cfg.to_toml(resolved) == printed


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[job]\nepochs = 3\nbatch_size = 32\n[optim]\nlr = 0.2\n')
    code, printed, err = cli_in_process("train", "--config", str(path), "--lr", "0.5", "--print-config")
    assert code == 0, err
    assert "epochs = 3" in printed and "batch_size = 32" in printed and "lr = 0.5" in printed


def _strategy_where(name: str, fits: bool) -> str | None:
    base = cfg.parse_run_config({})
    for strategy in STRATEGIES:
        candidate = base.model_copy(update={"job": base.job.model_copy(update={"strategy": strategy})})
        if cfg.applies(name, candidate) == fits:
            return strategy
    return None


VALUES = {"servers": "1", "server_snapshot_dir": "snap", "server_snapshot_every": "5", "backup_workers": "1",
          "staleness": "1", "sync_every": "4", "stages": "2", "micro_batches": "2", "schedule": "gpipe",
          "replicas": "2", "compression": "fp16", "accumulate": "2", "bind": "127.0.0.1", "amp": "bf16",
          "fragments": "2", "outer_optimizer": "sgd", "outer_lr": "0.5", "outer_momentum": "0.5",
          "secret_file": "job.secret", "split_points": "transformer.h.2",
          "min_workers": "2", "spares": "1", "heartbeat_timeout": "5"}


@pytest.mark.parametrize("name", sorted(n for n, rule in cfg.APPLIES.items() if rule.on == "strategy"))
def test_every_option_is_refused_where_the_tree_says_it_does_not_apply(name):
    strategy = _strategy_where(name, fits=False)
    assert strategy is not None, f"{name} applies everywhere: drop it from APPLIES"
    code, _, err = cli_in_process("train", "--strategy", strategy, cfg.flag(name), VALUES[name], "--print-config")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{cfg.flag(name)} " in err and f"applies to --strategy {cfg.APPLIES[name].says}, not to" in err
    fits = _strategy_where(name, fits=True)
    extra = ("--workers", "4", "--stages", "2", "--replicas", "2") if fits == "hybrid" else ()
    extra += ("--server-snapshot-dir", "snap") if name == "server_snapshot_every" else ()
    extra += ("--workers", "2", "--min-workers", "1") if name in ("spares", "heartbeat_timeout") else ()
    extra += ("--workers", "2") if name == "min_workers" else ()
    code, _, err = cli_in_process("train", "--strategy", fits, cfg.flag(name), VALUES[name], *extra, "--print-config")
    assert code == 0, (fits, err)


#: For each rule keyed on an option other than --strategy: a value it applies to, one it
#: does not, and the option's own value to try.
NOT_STRATEGY = {"momentum": ("sgd", "adam", "0.5"), "beta1": ("adam", "sgd", "0.8"), "beta2": ("adamw", "sgd", "0.9"),
                "min_lr_factor": ("cosine", "constant", "0.1"), "n_layer": ("gpt", "mlp", "2"),
                "n_head": ("gpt", "cnn", "2"), "n_embd": ("gpt", "mlp", "64"), "context": ("gpt", "mlp", "32"),
                "table_sizes": ("dlrm", "mlp", "10,20"), "embedding_dim": ("dlrm", "cnn", "8"),
                "train_samples": ("clicks", "digits", "100"), "heldout_samples": ("clicks", "synthetic", "50")}


def test_every_rule_not_on_the_strategy_is_tested():
    """(--keep-checkpoints, keyed on whether --checkpoint-dir is given, has its own test.)"""
    assert sorted(NOT_STRATEGY) == sorted(n for n, rule in cfg.APPLIES.items()
                                          if rule.on != "strategy" and n != "keep_checkpoints")


@pytest.mark.parametrize("name", sorted(NOT_STRATEGY))
def test_options_keyed_on_another_option_are_refused_where_they_do_not_apply(name):
    rule = cfg.APPLIES[name]
    fits, misfits, value = NOT_STRATEGY[name]
    text = isinstance(cfg.parse_run_config({name: value}).get(name), str)
    said, toml = (repr(value), f'"{value}"') if text else (value, value)
    code, _, err = cli_in_process("train", cfg.flag(rule.on), misfits, cfg.flag(name), value, "--print-config")
    assert code == 2 and f"{cfg.flag(name)} {said} applies to {cfg.flag(rule.on)} {rule.says}, not to " \
                          f"{cfg.flag(rule.on)} {misfits}" in err, err
    code, printed, err = cli_in_process("train", cfg.flag(rule.on), fits, cfg.flag(name), value, "--print-config")
    assert code == 0 and f"{name} = {toml}" in printed, err


def test_a_model_preset_that_does_not_apply_is_dropped_not_refused():
    code, printed, err = cli_in_process("train", "--model", "gpt", "--optimizer", "sgd", "--print-config")
    assert code == 0, err
    assert "beta1" not in printed and "momentum = 0.9" in printed and "min_lr_factor = 0.1" in printed


def test_keep_checkpoints_needs_a_checkpoint_dir():
    code, _, err = cli_in_process("train", "--keep-checkpoints", "3", "--print-config")
    assert code == 2 and "--keep-checkpoints 3 applies to --checkpoint-dir FOLDER, not to --checkpoint-dir None" in err
    code, printed, err = cli_in_process("train", "--keep-checkpoints", "3", "--checkpoint-dir", "ck", "--print-config")
    assert code == 0 and "keep_checkpoints = 3" in printed, err


@pytest.mark.parametrize("argv, fragment", [
    (("--lr", "nan"), "--lr nan: must be a finite number"),
    (("--lr", "inf"), "--lr inf: must be a finite number"),
    (("--lr", "-1"), "--lr -1: must be > 0"),
    (("--momentum", "nan"), "--momentum nan: must be a finite number"),
    (("--momentum", "2"), "--momentum 2: must be < 1"),
    (("--momentum", "-1"), "--momentum -1: must be >= 0"),
    (("--seed", str(2**70)), f"--seed {2**70}: must be <= {2**63 - 1}"),
    (("--workers", "100000"), "--workers 100000: must be <= 64"),
    (("--servers", "100000", "--strategy", "dist_sync"), "--servers 100000: must be <= 64"),
    (("--step-delay", "inf"), "--step-delay inf: must be a finite number"),
    (("--straggler", "0:inf"), "factor a finite number >= 1"),
    (("--straggler", "0:nan"), "factor a finite number >= 1"),
    (("--straggler", "1:2,1:3"), "names rank 1 twice"),
    (("--straggler", "5:2"), "names rank 5, but --workers is 2"),
    (("--checkpoint-dir", ""), "--checkpoint-dir '': must not be empty"),
    (("--log-dir", ""), "--log-dir '': must not be empty"),
    (("--strategy", "local", "--workers", "2"), "--strategy local trains in one process"),
    (("--strategy", "dist_sync", "--compression", "powersgd"), "which powersgd cannot do"),
    (("--schedule", "gpipe"), "--schedule 'gpipe' applies to --strategy pipeline | hybrid, not to --strategy allreduce"),
    (("--bind", "127.0.0.1"), "--bind '127.0.0.1' applies to"),
    (("--strategy", "pipeline", "--amp", "bf16"), "--amp 'bf16' applies to"),
])
def test_odd_values_are_one_line_exit_2(argv, fragment):
    code, out, err = cli_in_process("train", *argv, "--print-config")
    assert code == 2 and not out, (out, err)
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_a_worker_only_optimizer_is_refused_where_the_servers_run_the_optimizer(monkeypatch):
    from paratrain import optimizers
    monkeypatch.setattr(optimizers, "_REGISTRY", dict(optimizers._REGISTRY))
    optimizers.register_optimizer("sgd_worker_only_test", worker=torch.optim.SGD)
    asynchronous = cfg.parse_run_config({"strategy": "dist_async", "optimizer": "sgd_worker_only_test"})
    with pytest.raises(cfg.ConfigError, match="'sgd_worker_only_test' has no server rule.*choose one of: sgd"):
        cfg.resolve_run_config(asynchronous)
    cfg.resolve_run_config(cfg.parse_run_config({"strategy": "dist_sync", "optimizer": "sgd_worker_only_test"}))


@pytest.mark.parametrize("text, fragment", [
    ("[jobs]\nepochs = 2\n", "section [jobs] is not known"),
    ("[job]\nepochz = 2\n", "config key 'job.epochz' is not an option"),
    ("[job]\nepochs = 'two'\n", "--epochs 'two': must be an integer"),
    ("epochs = 2\n", "must be a [section] table"),
    ("[job\n", "is not valid TOML"),
])
def test_bad_config_files_are_one_line(tmp_path, text, fragment):
    path = tmp_path / "run.toml"
    path.write_text(text)
    code, _, err = cli_in_process("train", "--config", str(path), "--print-config")
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_paths_that_cannot_be_written_are_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for name, value, fragment in (("checkpoint_dir", str(a_file), "is a file, not a folder"),
                                  ("log_dir", "/proc/x", "cannot be written"),
                                  ("timeline", str(tmp_path), "is a folder; give a file name")):
        with pytest.raises(cfg.ConfigError, match=fragment):
            cfg.check_paths(cfg.resolve_run_config(cfg.parse_run_config({name: value})))


def test_fit_keywords_are_options_of_the_tree_or_python_only():
    """Every keyword of fit is an option of the tree (under its own name, or the one
    below), or takes Python objects no flag can carry."""
    from paratrain import fit
    python_only = {"model", "train_data", "heldout", "optimizer_params", "step_fn", "loss_fn", "loss_reduction",
                   "collate_fn", "persistent_workers", "scheduler", "callbacks", "timeline", "heldout_stats", "run_identity"}
    named_in_tree = {"num_workers": "loader_workers"}
    keywords = set(inspect.signature(fit).parameters) - python_only
    options = {named_in_tree.get(keyword, keyword) for keyword in keywords}
    assert options <= set(cfg.FIELD_SECTIONS), options - set(cfg.FIELD_SECTIONS)
