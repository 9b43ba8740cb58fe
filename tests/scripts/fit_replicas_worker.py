"""Run paratrain.fit with the strategy named in argv[1] (and sync_every argv[2] for
local SGD) and check that every rank ends with the same parameters."""
import sys

import torch
import torch.distributed as dist

import paratrain
from paratrain.data import build_dataset
from paratrain.models import build_model
from paratrain.train import build_strategy

torch.set_num_threads(1)
# This script uses the group after fit, so it owns it: fit's strategy then leaves it open.
from paratrain.comm.process_group import init_process_group
from paratrain.env import read_env
from paratrain.cli import exit_without_teardown  # gloo threads can abort the teardown
init_process_group(read_env())
name = sys.argv[1]
options = {"sync_every": int(sys.argv[2])} if name == "local_sgd" else {}
train, heldout = build_dataset("digits")
model = build_model("mlp", train.sample_shape, train.num_classes, seed=0)
summary = paratrain.fit(model, train, heldout=heldout, strategy=build_strategy(name, **options), epochs=1,
                        batch_size=64, optimizer_params={"lr": 0.05, "momentum": 0.9})
everyone = [None] * dist.get_world_size()
dist.all_gather_object(everyone, summary["param_checksum"])
mine = paratrain.train.trainer.param_checksum(model.parameters())
assert mine == summary["param_checksum"], "the summary checksum is not this rank's model"
print(f"CHECKSUMS {' '.join(everyone)}", flush=True)
exit_without_teardown(0)
