"""Train an MLP on digits with paratrain.Trainer for a fixed number of steps and save
rank 0's parameters. Runs the same under `paratrain launch -n N`, under torchrun and
as one plain process, so tests can compare 4 x 16 with 1 x 64."""
import argparse

import torch

import paratrain
from paratrain.comm.process_group import init_process_group
from paratrain.data import ShardedBatchSampler, build_dataset
from paratrain.env import read_env
from paratrain.models import build_model
from paratrain.cli import exit_without_teardown  # gloo threads can abort the teardown

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=24)
parser.add_argument("--global-batch", type=int, default=64)
parser.add_argument("--kvstore", default="allreduce")
args = parser.parse_args()

torch.set_num_threads(1)
env = read_env()
init_process_group(env)
train, _ = build_dataset("digits")
model = build_model("mlp", train.sample_shape, train.num_classes, seed=7)
trainer = paratrain.Trainer(model, "sgd", {"lr": 0.1, "momentum": 0.9}, kvstore=args.kvstore)
loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
sampler = ShardedBatchSampler(len(train), args.global_batch, env.rank, env.world_size, seed=3)
step = 0
for epoch in range(100):
    for global_len, indices in sampler.batches(epoch):
        x, y = train.batch(indices)
        loss_fn(model(x), y).backward()
        trainer.step(len(indices), global_batch_size=global_len)
        step += 1
        if step == args.steps:
            break
    if step == args.steps:
        break
if env.rank == 0:
    torch.save({name: p.detach().clone() for name, p in model.named_parameters()}, args.out)
print(f"rank {env.rank} done {step} steps", flush=True)
exit_without_teardown(0)
