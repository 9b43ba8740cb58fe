"""Tokens per second of a transformers GPT-2 (4 layers, 128 wide, context 128):
paratrain ``fit`` under allreduce against PyTorch DDP at 2 and 4 workers, and
paratrain's dist_sync and dist_async against its allreduce, all in one run.

    python bench/bench_gpt2.py --repeats 5 --steps 30

Both sides run under ``paratrain launch`` (so both get its environment: one thread
per process and the glibc allocator settings of paratrain.env.ALLOCATOR_ENV), train the
same model on the same bytes of Python's standard library with AdamW and the model's
own mean loss, and time the same steady-state steps (the first ``--warmup`` are not
counted). Repeats alternate the sides, so load changes on a shared machine hit both;
the table gives medians and the ratio of medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))


def worker(args) -> None:
    import torch

    from gpt2_fit import StdlibBytes, build_gpt2
    from paratrain.cli import exit_without_teardown
    from paratrain.env import read_env
    torch.set_num_threads(1)
    env = read_env()
    model = build_gpt2(seed=0, n_layer=4, n_embd=128, context=128)
    data = StdlibBytes(context=128, max_bytes=(args.steps + args.warmup) * args.batch * 128)
    times = []
    if args.side == "ddp":
        times = _ddp_steps(model, data, args, env)
    else:
        times = _paratrain_steps(model, data, args)
    if env.rank == 0:
        steady = times[args.warmup:]
        Path(args.out).write_text(json.dumps({"tokens_per_sec": args.batch * 128 * len(steady) / sum(steady)}))
    exit_without_teardown(0)


def _ddp_steps(model, data, args, env) -> list[float]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from paratrain.comm.process_group import init_process_group
    from paratrain.data.sampler import ShardedBatchSampler
    init_process_group(env)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    sampler = ShardedBatchSampler(len(data), args.batch, env.rank, env.world_size, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    times = []
    for batch in loader:
        start = time.perf_counter()
        loss = ddp(**batch).loss    # DDP averages gradients over workers: the global mean
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    dist.barrier()
    return times


def _paratrain_steps(model, data, args) -> list[float]:
    import paratrain
    from paratrain.train import Callback

    class StepTimes(Callback):
        def __init__(self):
            self.values = []

        def on_step_end(self, state):
            self.values.append(state.step_seconds)
    times = StepTimes()
    optimizer = "adam" if args.side == "dist_async" else "adamw"   # async runs its optimizer on the servers
    paratrain.fit(model, data, strategy=args.side, epochs=1, batch_size=args.batch, optimizer=optimizer,
                  optimizer_params={"lr": 1e-3}, step_fn=lambda m, b: m(**b).loss, loss_reduction="mean",
                  callbacks=[times])
    return times.values


def run_side(side: str, workers: int, args, tmp: Path) -> float:
    out = tmp / f"{side}-{workers}.json"
    servers = ["--servers", "1"] if side.startswith("dist_") else []
    command = [sys.executable, "-m", "paratrain.cli", "launch", "-n", str(workers), *servers, __file__, "--worker",
               "--side", side, "--out", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch * workers)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{side} x{workers} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads(out.read_text())["tokens_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", default="allreduce")
    parser.add_argument("--out", default="")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="sequences per worker per step")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = [("ddp", w) for w in args.workers] + [("allreduce", w) for w in args.workers] + \
           [("dist_sync", 2), ("dist_async", 2)]
    results: dict[tuple, list[float]] = {row: [] for row in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for row in (rows if repeat % 2 == 0 else rows[::-1]):
                results[row].append(run_side(*row, args, Path(tmp)))
                print(f"repeat {repeat} {row[0]} x{row[1]}: {results[row][-1]:.0f} tokens/s", flush=True)
    median = {row: statistics.median(values) for row, values in results.items()}
    print("\n| run | workers | tokens/s (median) | ratio |")
    print("|---|---|---|---|")
    for workers in args.workers:
        ddp, ours = median[("ddp", workers)], median[("allreduce", workers)]
        print(f"| DDP | {workers} | {ddp:.0f} | |")
        print(f"| paratrain allreduce | {workers} | {ours:.0f} | {ours / ddp:.3f}x DDP |")
    for side in ("dist_sync", "dist_async"):
        print(f"| paratrain {side} | 2 | {median[(side, 2)]:.0f} | {median[(side, 2)] / median[('allreduce', 2)]:.3f}x "
              f"allreduce |")
    print(json.dumps({f"{side}x{w}": values for (side, w), values in results.items()}))


if __name__ == "__main__":
    main()
