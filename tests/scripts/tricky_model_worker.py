"""A model with tied weights, BatchNorm, a frozen layer and a branch used only on even
steps, trained under allreduce. After every step all ranks compare a checksum of their
parameters *and* buffers; any difference fails the run."""
import torch
import torch.distributed as dist
from torch import nn

import paratrain
from paratrain.comm.process_group import init_process_group
from paratrain.env import read_env
from paratrain.train.trainer import param_checksum
from paratrain.cli import exit_without_teardown  # gloo threads can abort the teardown


class Tricky(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(12, 12)
        self.decoder = nn.Linear(12, 12)
        self.decoder.weight = self.encoder.weight          # tied
        self.norm = nn.BatchNorm1d(12)
        self.frozen = nn.Linear(12, 12)
        self.frozen.requires_grad_(False)
        self.branch = nn.Linear(12, 12)                     # used on even steps only
        self.head = nn.Linear(12, 3)

    def forward(self, x, use_branch):
        h = torch.relu(self.norm(self.encoder(x)))
        h = self.frozen(h) + self.decoder(h)
        if use_branch:
            h = h + self.branch(h)
        return self.head(h)


torch.set_num_threads(1)
env = read_env()
init_process_group(env)
torch.manual_seed(100 + env.rank)        # different init per rank: the broadcast must fix it
model = Tricky()
trainer = paratrain.Trainer(model, "sgd", {"lr": 0.05, "momentum": 0.9}, kvstore="allreduce")
scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=3, gamma=0.5)
gen = torch.Generator().manual_seed(env.rank)   # each rank its own data
frozen_before = model.frozen.weight.detach().clone()
for step in range(8):
    x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    nn.functional.cross_entropy(model(x, use_branch=step % 2 == 0), y, reduction="sum").backward()
    trainer.step(16)
    scheduler.step()
    local = param_checksum(list(model.parameters()) + list(model.buffers()))
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, local)
    assert len(set(everyone)) == 1, f"step {step}: replicas differ: {everyone}"
assert torch.equal(model.frozen.weight, frozen_before), "the frozen layer changed"
assert model.decoder.weight is model.encoder.weight
assert abs(trainer.learning_rate - 0.05 * 0.25) < 1e-12, trainer.learning_rate
print(f"rank {env.rank}: REPLICAS_IDENTICAL after 8 steps", flush=True)
exit_without_teardown(0)
