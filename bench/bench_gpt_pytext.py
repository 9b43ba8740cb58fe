"""The built-in GPT on the pytext corpus: tokens/s and the held-out curve.

    python bench/bench_gpt_pytext.py --throughput 20 --batch 16            # 1 process, 1 thread
    python bench/bench_gpt_pytext.py --throughput 20 --batch 32 --workers 2
    python bench/bench_gpt_pytext.py --lr 6e-3 --eval-at 150,300,400       # one epoch, the curve

``--throughput N`` times N steps of forward + backward + AdamW (after 3 warm-up steps)
and prints tokens/s per wall-clock second and per CPU second of rank 0 (the latter is
steadier on a shared machine). Otherwise it trains ``--steps`` steps (default one
epoch of full batches; AdamW, linear warm-up then cosine to 10% of the peak, or a
constant rate) over shuffled windows, and prints held-out bits per byte at each
``--eval-at`` step (on the first ``--eval-windows`` windows, default all) and at the end.

``--batch`` is the global batch. ``--workers N`` runs N spawned processes (gloo on
loopback, torch DDP, ``--threads`` each), each on its share of every global batch;
that is the arithmetic of one process at the global batch, so the curve does not
depend on N, only the time does. One JSON object per line, from rank 0.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import pathlib
import sys
import time
from datetime import timedelta

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from paratrain.data.text import (DEFAULT_MAX_HELDOUT_BYTES, DEFAULT_MAX_TRAIN_BYTES, FILE_ORDERS,  # noqa: E402
                                 build_pytext)
from paratrain.models.gpt import bits_per_byte, build_gpt, lm_loss  # noqa: E402

JOB_TIMEOUT_S = 1800


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


def batches(train, batch: int, seed: int, rank: int, world: int):
    """This rank's share of shuffled global mini-batches, reshuffled every epoch."""
    generator = torch.Generator().manual_seed(seed)
    share = batch // world
    while True:
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            mine = order[start + rank * share:start + (rank + 1) * share].tolist()
            xs, ys = zip(*(train[i] for i in mine))
            yield torch.stack(xs), torch.stack(ys)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="per process")
    parser.add_argument("--batch", type=int, default=32, help="global")
    parser.add_argument("--steps", type=int, default=None, help="default: one epoch of full batches")
    parser.add_argument("--throughput", type=int, default=0, help="time this many steps and stop")
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-at", default="", help="comma-separated steps")
    parser.add_argument("--eval-windows", type=int, default=None, help="held-out windows per --eval-at evaluation")
    parser.add_argument("--max-train-bytes", type=int, default=DEFAULT_MAX_TRAIN_BYTES)
    parser.add_argument("--max-heldout-bytes", type=int, default=DEFAULT_MAX_HELDOUT_BYTES)
    parser.add_argument("--file-order", choices=FILE_ORDERS, default="hashed")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch % args.workers:
        parser.error(f"--batch {args.batch} is not divisible by --workers {args.workers}")
    return args


def run(args: argparse.Namespace, rank: int = 0, world: int = 1) -> None:
    """Train (or time) on this rank; rank 0 prints."""
    torch.set_num_threads(args.threads)
    train, heldout = build_pytext(context=args.context, max_train_bytes=args.max_train_bytes,
                                  max_heldout_bytes=args.max_heldout_bytes, file_order=args.file_order)
    steps = args.steps or len(train) // args.batch
    model = build_gpt(seed=args.seed, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                      context=args.context)
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    common = dict(workers=world, threads=args.threads, batch=args.batch, lr=args.lr, n_layer=args.n_layer,
                  n_embd=args.n_embd, context=args.context, train_bytes=train.num_bytes, train_files=train.num_files,
                  heldout_bytes=heldout.num_bytes, heldout_files=heldout.num_files, heldout_windows=len(heldout),
                  file_order=args.file_order, schedule=args.schedule, warmup=args.warmup)
    report = print if rank == 0 else (lambda *_, **__: None)
    data = batches(train, args.batch, args.seed, rank, world)
    eval_at = {int(s) for s in args.eval_at.split(",") if s}
    total_steps = args.throughput + 3 if args.throughput else steps
    train_seconds, train_cpu_seconds, tic = 0.0, 0.0, time.perf_counter()
    for step in range(total_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, peak=args.lr, warmup=args.warmup, total=steps, schedule=args.schedule)
        x, y = next(data)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = lm_loss(trained(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if not args.throughput or step >= 3:
            train_seconds += time.perf_counter() - start
            train_cpu_seconds += time.process_time() - cpu_start
        if step + 1 in eval_at and rank == 0:
            eval_tic = time.perf_counter()
            bpb = heldout_bpb(model, heldout, 64, args.eval_windows)
            report(json.dumps(dict(common, step=step + 1, train_bpb=round(bits_per_byte(loss.item()), 4),
                                   heldout_bpb=round(bpb, 4), train_s=round(train_seconds, 1),
                                   train_cpu_s=round(train_cpu_seconds, 1),
                                   eval_s=round(time.perf_counter() - eval_tic, 1))), flush=True)
    timed_steps = args.throughput or total_steps
    final = {} if args.throughput or rank else {"final_heldout_bpb": round(heldout_bpb(model, heldout, 64, None), 4)}
    tokens = timed_steps * args.batch * args.context
    report(json.dumps(dict(common, **final, steps=timed_steps, tokens_per_s=round(tokens / train_seconds),
                           step_s=round(train_seconds / timed_steps, 4),
                           cpu_tokens_per_s_rank0=round(tokens / world / train_cpu_seconds),
                           wall_s=round(time.perf_counter() - tic, 1))), flush=True)


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=args.workers, timeout=timedelta(seconds=120))
    try:
        run(args, rank, args.workers)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.workers == 1:
        run(args)
        return 0
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(rank, store.port, args)) for rank in range(args.workers)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    for proc in procs:   # only what this script started, by handle
        proc.join(max(1.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    return max(abs(proc.exitcode or 0) for proc in procs)


if __name__ == "__main__":
    sys.exit(main())
