"""Can one process learn the planted click model? DLRM on synthetic click logs.

Trains ``paratrain.models.dlrm`` with ``nn.Embedding(sparse=True)`` tables on
``paratrain.data.clicks`` logs and prints held-out log loss and AUC against the planted
model's, every ``--eval-every`` steps, and one JSON line at the end. By default the
training split holds exactly ``--steps * --batch-size`` samples, so training is one
epoch: a second pass over the same logs overfits the rare ids (held-out loss rises).

    OMP_NUM_THREADS=1 python bench/dlrm_clicks_learnability.py                  # the defaults
    OMP_NUM_THREADS=1 python bench/dlrm_clicks_learnability.py --optimizer adagrad --lr 0.03 --sparse-lr 0.1
    OMP_NUM_THREADS=1 python bench/dlrm_clicks_learnability.py --planted signal_rows=200

docs/dlrm.md has the figures.

Optimizers: ``adam`` (SparseAdam, Adam's lazy form, for the tables; Adam for the dense
part), ``adagrad`` (Adagrad for both, which takes sparse gradients) or ``sgd``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from paratrain.data.clicks import DEFAULT_TABLE_SIZES, build_clicks
from paratrain.models.dlrm import DLRMConfig, build_dlrm, click_loss
from paratrain.metrics import binary_logloss, roc_auc


def make_optimizers(model: torch.nn.Module, name: str, lr: float, sparse_lr: float) -> list[torch.optim.Optimizer]:
    """One optimizer for the tables (sparse gradients) and one for the dense part."""
    table_params = list(model.tables.parameters())
    table_ids = {id(param) for param in table_params}
    dense_params = [param for param in model.parameters() if id(param) not in table_ids]
    if name == "adam":
        return [torch.optim.SparseAdam(table_params, lr=sparse_lr), torch.optim.Adam(dense_params, lr=lr)]
    if name == "adagrad":
        return [torch.optim.Adagrad(table_params, lr=sparse_lr), torch.optim.Adagrad(dense_params, lr=lr)]
    return [torch.optim.SGD(table_params, lr=sparse_lr), torch.optim.SGD(dense_params, lr=lr)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, batch_size: int = 8192) -> tuple[float, float]:
    """Held-out (log loss, AUC) over the whole split."""
    logits = torch.cat([model(data.dense[start:start + batch_size], data.sparse[start:start + batch_size])
                        for start in range(0, len(data), batch_size)])
    return binary_logloss(logits, data.click), roc_auc(logits, data.click)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=None, help="default: steps * batch size (one epoch)")
    parser.add_argument("--num-heldout", type=int, default=100_000)
    parser.add_argument("--table-sizes", type=lambda text: tuple(int(x) for x in text.split(",")),
                        default=DEFAULT_TABLE_SIZES)
    parser.add_argument("--zipf-exponent", type=float, default=1.1)
    parser.add_argument("--planted", action="append", default=[], metavar="FIELD=NUMBER",
                        help="another ClickConfig field, e.g. signal_rows=100 (repeatable)")
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--bottom-relu-last", action="store_true")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--optimizer", choices=("adam", "adagrad", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=5e-3, help="dense part")
    parser.add_argument("--sparse-lr", type=float, default=0.03, help="tables")
    parser.add_argument("--schedule", choices=("linear", "constant"), default="linear",
                        help="linear: every learning rate falls linearly to 0 over --steps")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tic = time.perf_counter()
    planted = {field: float(value) if "." in value else int(value)
               for field, value in (item.split("=", 1) for item in args.planted)}
    train, heldout = build_clicks(num_train=args.num_train or args.steps * args.batch_size,
                                  num_heldout=args.num_heldout, table_sizes=args.table_sizes,
                                  zipf_exponent=args.zipf_exponent, seed=args.seed, **planted)
    data_s = time.perf_counter() - tic
    model = build_dlrm(DLRMConfig(num_dense=train.num_dense, table_sizes=train.table_sizes,
                                  embedding_dim=args.embedding_dim, bottom_relu_last=args.bottom_relu_last),
                       seed=args.seed)
    optimizers = make_optimizers(model, args.optimizer, args.lr, args.sparse_lr)
    fraction_left = (lambda step: 1.0 - step / args.steps) if args.schedule == "linear" else (lambda step: 1.0)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, fraction_left) for optimizer in optimizers]
    print(f"data {data_s:.1f}s  train {len(train)}  heldout {len(heldout)}  click rate {heldout.click_rate:.3f}  "
          f"planted logloss {heldout.planted_logloss:.4f}  auc {heldout.planted_auc:.4f}  "
          f"base-rate logloss {heldout.base_rate_logloss:.4f}", flush=True)

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    history, train_s, position = [], 0.0, 0
    for step in range(1, args.steps + 1):
        if position + args.batch_size > len(order):
            order, position = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + step)), 0
        batch = train.batch(order[position:position + args.batch_size])
        position += args.batch_size
        tic = time.perf_counter()
        loss = click_loss(model(batch["dense"], batch["sparse"]), batch)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer, scheduler in zip(optimizers, schedulers):
            optimizer.step()
            scheduler.step()
        train_s += time.perf_counter() - tic
        if step % args.eval_every == 0 or step == args.steps:
            logloss, auc = evaluate(model, heldout)
            history.append({"step": step, "samples": step * args.batch_size, "train_s": round(train_s, 1),
                            "heldout_logloss": round(logloss, 4), "gap": round(logloss - heldout.planted_logloss, 4),
                            "heldout_auc": round(auc, 4)})
            print(json.dumps(history[-1]), flush=True)
    print(json.dumps({"planted_logloss": heldout.planted_logloss, "planted_auc": heldout.planted_auc,
                      "base_rate_logloss": heldout.base_rate_logloss, "final": history[-1],
                      "samples_per_sec": args.steps * args.batch_size / train_s, "args": vars(args)}))


if __name__ == "__main__":
    main()
