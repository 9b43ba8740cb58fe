"""The house rules of issue 16, as tests: the layering, one strategy descriptor, one
optimizer registry (reaching real servers), and a Trainer over a KVStore of one's own."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import paratrain
from paratrain.errors import ConfigError
from paratrain.kvstore import KVStore, create
from paratrain.kvstore.base import Handle, copy_out, sum_values
from paratrain.optimizers import (build_server_optimizer, build_worker_optimizer, register_optimizer,
                                  server_optimizer_names, worker_optimizer_names)
from paratrain.strategies import KVSTORE_TYPES, SERVER_KVSTORE_TYPES, STRATEGIES, strategy_spec
from ps_harness import PSJob, worker_env_kvstore

PACKAGE = Path(paratrain.__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", ["comm", "ps", "kvstore", "parallel"])
def test_lower_layers_never_import_training_or_the_cli(layer):
    offenders = {}
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        bad = sorted(m for m in imported_modules(path)
                     if m.startswith(("paratrain.train", "paratrain.cli", "paratrain.launch")))
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = bad
    assert not offenders, offenders


@pytest.mark.parametrize("module", ["env", "errors", "atomic", "timeline", "strategies"])
def test_bottom_modules_import_only_the_bottom(module):
    bottom = {"paratrain.env", "paratrain.errors", "paratrain.atomic", "paratrain.timeline", "paratrain.strategies"}
    imports = {m for m in imported_modules(PACKAGE / f"{module}.py") if m.startswith("paratrain")}
    assert {m.rsplit(".", 1)[0] if m not in bottom else m for m in imports} <= bottom, imports


def test_one_strategy_descriptor_answers_every_question():
    assert set(KVSTORE_TYPES) <= set(STRATEGIES)
    assert SERVER_KVSTORE_TYPES == ("dist_sync", "dist_async", "dist_ssp")
    assert [name for name in STRATEGIES if strategy_spec(name).asynchronous] == ["dist_async", "dist_ssp"]
    assert [name for name in STRATEGIES if strategy_spec(name).pipelined] == ["pipeline", "hybrid"]
    assert strategy_spec("local_sgd").kvstore == "allreduce" and not strategy_spec("local_sgd").uses_servers
    with pytest.raises(ConfigError, match="strategy='ring'"):
        strategy_spec("ring")


# ------------------------------------------------------------------ optimizer registry


def test_registry_says_where_each_name_runs_and_takes_new_ones():
    assert {"sgd", "adam", "adamw"} <= set(worker_optimizer_names())
    assert set(server_optimizer_names()) >= {"sgd", "adam", "adamw"} and "rmsprop" not in server_optimizer_names()

    class Halving(torch.optim.SGD):
        pass

    register_optimizer("halving_sgd", worker=Halving)
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_worker_optimizer(params, "halving_sgd", {"lr": 0.1}), Halving)
    with pytest.raises(ConfigError, match="not supported on servers"):
        build_server_optimizer({"type": "halving_sgd"})
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        register_optimizer("bogus", worker=dict)
    with pytest.raises(ConfigError, match="needs worker=, server= or both"):
        register_optimizer("empty")


def worker_sign_sgd() -> dict:
    kv = worker_env_kvstore("dist_sync")
    kv.init("w", torch.zeros(3))
    kv.set_optimizer({"type": "sign_sgd", "lr": 0.5})
    kv.push("w", torch.tensor([-2.0, 0.0, 3.0]))
    out = torch.empty(3)
    kv.pull("w", out=out)
    kv.close()
    return {"w": out.tolist()}


@pytest.mark.timeout(120)
def test_a_registered_update_rule_reaches_real_servers():
    """ps-lite's pluggable handler: a rule registered by a module the servers import
    runs there, with no edit to the server."""
    with PSJob(num_workers=2, num_servers=1, extra_env={"PARATRAIN_SERVER_IMPORTS": "sign_sgd_plugin"}) as job:
        job.start_servers()
        results = job.run_workers("test_architecture:worker_sign_sgd", timeout_s=90)
    # dist_sync sums the two workers' pushes: sign([-4, 0, 6]) * 0.5, subtracted
    assert results == [{"w": [0.5, 0.0, -0.5]}] * 2, results


# ------------------------------------------------------------------ any KVStore


class DictKVStore(KVStore):
    """A KVStore of one's own: a dict in this process."""

    type = "mine"

    def __init__(self) -> None:
        self.values: dict = {}
        self.pushes = 0

    def init(self, key, value):
        self.values[key] = value.detach().clone()

    def push(self, key, value, priority=0):
        self.values[key] = sum_values(value).detach().clone()
        self.pushes += 1
        return Handle.completed()

    def pull(self, key, out, priority=0, block=True):
        copy_out(self.values[key], out)
        return Handle.completed(out)


def _train(kvstore, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    trainer = paratrain.Trainer(model, "sgd", {"lr": 0.1, "momentum": 0.9}, kvstore=kvstore)
    data = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(data), labels, reduction="sum").backward()
        trainer.step(len(data))
    return [p.detach().clone() for p in model.parameters()]


def test_trainer_runs_over_a_kvstore_of_ones_own():
    mine = DictKVStore()
    assert all(torch.equal(a, b) for a, b in zip(_train(mine), _train(create("local"))))
    assert mine.pushes == 5 * 4   # one push per parameter per step


def test_compression_with_nothing_to_compress_is_refused():
    with pytest.raises(ConfigError, match="nothing to compress"):
        paratrain.Trainer(torch.nn.Linear(2, 2), "sgd", {"lr": 0.1}, kvstore="local", compression="fp16")
