"""A training loop of your own with paratrain's Trainer (Gluon's, on torch.optim): your
DataLoader, your loss, clipping between the two halves of the step, an LR schedule.

    python examples/custom_loop.py
    paratrain launch -n 2 examples/custom_loop.py                # allreduce over 2 workers
    paratrain launch -n 2 --servers 1 examples/custom_loop.py --kvstore dist_sync
"""
import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

import paratrain
from paratrain.data import ShardedBatchSampler, build_dataset
from paratrain.env import read_env
from paratrain.models import build_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--kvstore", default="allreduce")
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()
torch.set_num_threads(1)
env = read_env()
train, heldout = build_dataset("digits")
model = build_model("cnn", train.sample_shape, train.num_classes, seed=0)
# update_on_kvstore=False: under dist_sync the servers sum, the workers see the sum and step.
options = {"update_on_kvstore": False} if args.kvstore == "dist_sync" else {}
trainer = paratrain.Trainer(model, "sgd", {"lr": 0.05, "momentum": 0.9}, kvstore=args.kvstore, **options)
schedule = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.optimizer, T_max=args.epochs * 23)
# Each worker loads its share of every global batch of 64 (the same samples, in the same
# order, for any number of workers).
sampler = ShardedBatchSampler(len(train), 64, env.rank, env.world_size, seed=0)
loader = DataLoader(TensorDataset(train.inputs, train.targets), batch_sampler=sampler)
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    for index, (x, y) in enumerate(loader):
        torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        trainer.allreduce_grads(global_batch_size=sampler.global_batch_len(index))   # the last batch is short
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)   # the global mean gradient, as one process
        trainer.update()
        schedule.step()
with torch.no_grad():
    accuracy = (model(heldout.inputs).argmax(1) == heldout.targets).float().mean().item()
print(f"rank {env.rank}: held-out accuracy {accuracy:.3f} checksum {trainer.param_checksum()[:16]}", flush=True)
trainer.close()
