"""One script, unchanged under `paratrain launch` and under `torchrun`: paratrain reads
its place in the job from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR,
... ; paratrain/env.py has the table), whichever launcher set it.

    paratrain launch -n 2 examples/any_launcher.py
    torchrun --standalone --nproc-per-node 2 examples/any_launcher.py
"""
import json

import torch

import paratrain
from paratrain.cli import exit_without_teardown
from paratrain.data import build_dataset
from paratrain.env import read_env
from paratrain.models import build_model

torch.set_num_threads(1)
train, heldout = build_dataset("digits")
model = build_model("mlp", train.sample_shape, train.num_classes, seed=0)
summary = paratrain.fit(model, train, heldout=heldout, strategy="allreduce", epochs=1, batch_size=64,
                        optimizer_params={"lr": 0.05, "momentum": 0.9})
env = read_env()
print(json.dumps({"rank": env.rank, "world": env.world_size, "checksum": summary["param_checksum"],
                  "accuracy": summary["accuracy"]}), flush=True)
exit_without_teardown(0)   # see docs/internals.md, "Process exit"
