"""One worker of tests/test_trainer_findings.py: the Trainer and fit findings of issue
10, run under the kvstore given, writing what the test compares to --out.rank<r>.json.

Parts (each on a fresh model; the seed differs per rank on purpose, so that only
paratrain's own synchronisation can make ranks equal):
  clip       clip_grad_norm_ between backward() and step(): replicas stay identical
  scheduler  StepLR on trainer.optimizer changes the run (and reaches the servers)
  callback   a fit callback that changes the learning rate, on every rank
  state      frozen weights and BatchNorm buffers become rank 0's; pull_weights
"""
import argparse
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

import paratrain
from paratrain.cli import exit_without_teardown
from paratrain.data import TensorDataset
from paratrain.env import read_env
from paratrain.train import Callback

parser = argparse.ArgumentParser()
parser.add_argument("--kvstore", required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()
torch.set_num_threads(1)
env = read_env()
data = torch.randn(64, 6, generator=torch.Generator().manual_seed(7))
labels = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(8))
server_side = args.kvstore in ("dist_async", "dist_ssp")


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def model_for(rank_seed: bool = True) -> nn.Module:
    torch.manual_seed(100 + (env.rank if rank_seed else 0))
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    model[0].weight.requires_grad_(False)   # a frozen layer
    return model


def my_share(x):
    share = len(x) // env.world_size
    return x[env.rank * share:(env.rank + 1) * share]


def steps(trainer, model, count, between=None, after=None):
    for _ in range(count):
        loss = nn.functional.cross_entropy(model(my_share(data)), my_share(labels), reduction="sum")
        loss.backward()
        if between is not None:
            between(model)
        trainer.step(len(my_share(data)))
        if after is not None:
            after()


def trainer_for(model, **options):
    # The optimizer on the servers in async modes, on the workers in lockstep ones
    # (so that its schedule shows up the same way in both).
    return paratrain.Trainer(model, "sgd", {"lr": 0.1, "momentum": 0.9}, kvstore=kvstore, **options)


report = {}
kvstore = paratrain.kvstore.create(args.kvstore)
if args.kvstore == "allreduce":
    model = model_for()
    trainer = trainer_for(model)
    steps(trainer, model, 5, between=lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5))
    report["clip"] = digest(model.parameters())
for with_schedule in (False, True):
    model = model_for(rank_seed=False)
    trainer = trainer_for(model)
    schedule = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.5) if with_schedule else None
    steps(trainer, model, 4, after=schedule.step if schedule else None)
    report["scheduler" if with_schedule else "no_scheduler"] = digest(model.parameters())
    report[("scheduler" if with_schedule else "no_scheduler") + "_params"] = [p.tolist() for p in model.parameters()]
model = model_for()
trainer = trainer_for(model)
steps(trainer, model, 3)
if server_side:
    kvstore.barrier()          # every worker pushed its last gradient
    trainer.pull_weights()
report["frozen"] = digest([model[0].weight])
report["buffers"] = digest([model[1].running_mean, model[1].running_var])
report["params"] = digest(model.parameters())


class SetLR(Callback):
    """From step 3 on, a tenth of the learning rate: on every rank."""

    def on_step_end(self, state):
        if state.step == 3:
            for group in state.strategy.optimizer.param_groups:
                group["lr"] = 0.005


strategy = args.kvstore
summary = paratrain.fit(model_for(rank_seed=False), TensorDataset(data, labels, 3), strategy=strategy, epochs=2,
                        batch_size=16, optimizer="sgd", optimizer_params={"lr": 0.05, "momentum": 0.9},
                        callbacks=[SetLR()])
report["callback"] = summary["param_checksum"]
Path(f"{args.out}.rank{env.rank}.json").write_text(json.dumps(report))
exit_without_teardown(0)
