"""One worker of the front-door tests (issue 10): trains the examples' GPT-2 through
fit with step_fn, mean loss, clipping and a cosine schedule, and writes what the test
checks (per-step losses, the tie, the checksum, the parameters) to --out.rank<r>."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import paratrain  # noqa: E402
from gpt2_fit import StdlibBytes, build_gpt2  # noqa: E402
from paratrain.cli import exit_without_teardown  # noqa: E402
from paratrain.env import read_env  # noqa: E402
from paratrain.train import Callback, build_strategy  # noqa: E402


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_step_end(self, state):
        self.values.append(state.last.loss)


parser = argparse.ArgumentParser()
parser.add_argument("--strategy", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--compression", default=None)
parser.add_argument("--sync-every", type=int, default=None)
args = parser.parse_args()
torch.set_num_threads(1)
rank = read_env().rank
model = build_gpt2(seed=0)
train = StdlibBytes(max_bytes=args.steps * args.batch_size * 64)
options = {key: value for key, value in (("compression", args.compression), ("sync_every", args.sync_every))
           if value is not None}
losses = Losses()
summary = paratrain.fit(model, train, strategy=build_strategy(args.strategy, **options), epochs=1,
                        batch_size=args.batch_size, optimizer="sgd", optimizer_params={"lr": 0.3, "momentum": 0.9},
                        step_fn=lambda m, b: m(**b).loss, loss_reduction="mean", max_grad_norm=1.0,
                        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps),
                        callbacks=[losses])
torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{args.out}.rank{rank}.pt")
Path(f"{args.out}.rank{rank}.json").write_text(json.dumps({
    "losses": losses.values, "tied": model.lm_head.weight is model.transformer.wte.weight,
    "checksum": summary["param_checksum"], "steps": summary["steps"], "accuracy": summary["accuracy"]}))
exit_without_teardown(0)
