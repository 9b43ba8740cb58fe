"""The built-in GPT on the pytext corpus in one process: tokens/s and the held-out curve.

    python bench/bench_gpt_pytext.py --threads 1 --batch 16 --throughput 20
    python bench/bench_gpt_pytext.py --threads 2 --batch 32 --steps 300 --lr 3e-3 --eval-at 100,200,300

``--throughput N`` times N steps of forward + backward + AdamW (after 3 warm-up steps)
and prints tokens/s, per wall-clock second and per CPU second of this process (the latter
is steadier on a shared machine). Otherwise it trains ``--steps`` steps (AdamW, linear warm-up then
cosine to 10% of the peak, or a constant rate) over shuffled windows, and evaluates
bits per byte on the held-out split at each ``--eval-at`` step (the first
``--eval-windows`` windows) and, at the end, on all of it. A single process at
global batch B does the same arithmetic as D data-parallel workers at B / D each, so
the curve stands for any worker count; only the time changes. One JSON object per line.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from paratrain.data.text import (DEFAULT_MAX_HELDOUT_BYTES, DEFAULT_MAX_TRAIN_BYTES, FILE_ORDERS,  # noqa: E402
                                 build_pytext)
from paratrain.models.gpt import bits_per_byte, build_gpt, lm_loss  # noqa: E402


def lr_at(step: int, *, peak: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to ``peak``, then constant or cosine down to ``peak / 10``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_bpb(model, heldout, batch: int, max_windows: int | None) -> float:
    """Mean bits per byte over the held-out windows (the first ``max_windows``)."""
    model.eval()
    count = len(heldout) if max_windows is None else min(max_windows, len(heldout))
    total, tokens = 0.0, 0
    for start in range(0, count, batch):
        xs, ys = zip(*(heldout[i] for i in range(start, min(count, start + batch))))
        x, y = torch.stack(xs), torch.stack(ys)
        total += lm_loss(model(x), y, reduction="sum").item()
        tokens += y.numel()
    model.train()
    return bits_per_byte(total / tokens)


def batches(train, batch: int, seed: int):
    """Shuffled mini-batches of windows, reshuffled every epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            xs, ys = zip(*(train[i] for i in order[start:start + batch].tolist()))
            yield torch.stack(xs), torch.stack(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="default: one epoch of full batches")
    parser.add_argument("--throughput", type=int, default=0, help="time this many steps and stop")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-at", default="", help="comma-separated steps")
    parser.add_argument("--eval-windows", type=int, default=None, help="held-out windows per evaluation")
    parser.add_argument("--max-train-bytes", type=int, default=DEFAULT_MAX_TRAIN_BYTES)
    parser.add_argument("--max-heldout-bytes", type=int, default=DEFAULT_MAX_HELDOUT_BYTES)
    parser.add_argument("--file-order", choices=FILE_ORDERS, default="hashed")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, heldout = build_pytext(context=args.context, max_train_bytes=args.max_train_bytes,
                                  max_heldout_bytes=args.max_heldout_bytes, file_order=args.file_order)
    args.steps = args.steps or len(train) // args.batch
    model = build_gpt(seed=args.seed, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                      context=args.context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay)
    common = dict(threads=args.threads, batch=args.batch, lr=args.lr, n_layer=args.n_layer, n_embd=args.n_embd,
                  context=args.context, train_bytes=train.num_bytes, train_files=train.num_files,
                  heldout_bytes=heldout.num_bytes, heldout_files=heldout.num_files, heldout_windows=len(heldout),
                  file_order=args.file_order, schedule=args.schedule, warmup=args.warmup)
    data = batches(train, args.batch, args.seed)
    eval_at = {int(s) for s in args.eval_at.split(",") if s}
    total_steps = args.throughput + 3 if args.throughput else args.steps
    train_seconds, train_cpu_seconds, tic = 0.0, 0.0, time.perf_counter()
    for step in range(total_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, peak=args.lr, warmup=args.warmup, total=args.steps, schedule=args.schedule)
        x, y = next(data)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = lm_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if not args.throughput or step >= 3:
            train_seconds += time.perf_counter() - start
            train_cpu_seconds += time.process_time() - cpu_start
        if step + 1 in eval_at:
            eval_tic = time.perf_counter()
            bpb = heldout_bpb(model, heldout, 64, args.eval_windows)
            print(json.dumps(dict(common, step=step + 1, train_bpb=round(bits_per_byte(loss.item()), 4),
                                  heldout_bpb=round(bpb, 4), train_s=round(train_seconds, 1),
                                  train_cpu_s=round(train_cpu_seconds, 1),
                                  eval_s=round(time.perf_counter() - eval_tic, 1))), flush=True)
    timed_steps = args.throughput or total_steps
    final = {} if args.throughput else {"final_heldout_bpb": round(heldout_bpb(model, heldout, 64, None), 4)}
    print(json.dumps(dict(common, **final, steps=timed_steps, tokens_per_s=round(timed_steps * args.batch * args.context
                                                                        / train_seconds),
                          step_s=round(train_seconds / timed_steps, 4),
                          cpu_tokens_per_s=round(timed_steps * args.batch * args.context / train_cpu_seconds),
                          wall_s=round(time.perf_counter() - tic, 1))), flush=True)


if __name__ == "__main__":
    main()
