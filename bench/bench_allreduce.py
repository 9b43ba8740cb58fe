"""paratrain ``allreduce`` vs PyTorch DDP (gloo): samples/sec in the same processes.

    python bench/bench_allreduce.py --workers 2 4 --repeats 5        # DDP comparison
    python bench/bench_allreduce.py --overhead --repeats 21 --steps 60   # fit() vs a hand loop

Each worker process builds the same model twice (one wrapped in DDP, one driven by
paratrain.Trainer over kvstore 'allreduce'), and runs timed windows of both in each
repeat as A B A (half, whole, half: the outer side alternates between repeats), so the
machine's noise hits both alike. Reported: the median over repeats of each's
samples/sec and the median of the per-repeat ratios.

Both sides compute the same update: the mean gradient over the global batch (DDP
averages per-worker mean losses; paratrain sums and divides by the global batch, as
Gluon). With different updates the two models drift apart, and CPU kernels run at
speeds that depend on the weights' values (seen: 12.6 vs 14.4 ms for one CNN forward),
which would be measured as a framework difference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

MODELS = {
    "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                 nn.Linear(1024, 10)),
    "cnn": lambda: nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)),
}


def _batch(batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,), generator=gen)


def _time_steps(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def worker(args) -> None:
    """Runs inside each launched rank."""
    import torch.distributed as dist
    import paratrain
    from paratrain.comm.process_group import init_process_group
    from paratrain.env import read_env
    torch.set_num_threads(1)
    env = read_env()
    init_process_group(env)
    x, y = _batch(args.batch, env.rank)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    mean_loss_fn = nn.CrossEntropyLoss()   # DDP divides by the world size: global mean
    torch.manual_seed(0)
    ddp_model = nn.parallel.DistributedDataParallel(MODELS[args.model]())
    ddp_opt = torch.optim.SGD(ddp_model.parameters(), lr=0.01, momentum=0.9)
    torch.manual_seed(0)
    pt_model = MODELS[args.model]()
    trainer = paratrain.Trainer(pt_model, "sgd", {"lr": 0.01, "momentum": 0.9}, kvstore="allreduce")

    def ddp_step():
        mean_loss_fn(ddp_model(x), y).backward()
        ddp_opt.step()
        ddp_opt.zero_grad(set_to_none=True)

    def paratrain_step():
        loss_fn(pt_model(x), y).backward()
        trainer.step(args.batch)

    results = {"ddp": [], "paratrain": []}
    for name, step in (("ddp", ddp_step), ("paratrain", paratrain_step)):
        _time_steps(step, args.warmup)
    for repeat in range(args.repeats):
        outer, inner = ((ddp_step, paratrain_step) if repeat % 2 == 0 else (paratrain_step, ddp_step))
        # A B A: the outer side's two half windows bracket the inner side's window, so
        # a change of load on the (shared) machine during a repeat hits both alike.
        half = args.steps // 2
        seconds = {ddp_step: 0.0, paratrain_step: 0.0}
        for step, steps in ((outer, half), (inner, args.steps), (outer, args.steps - half)):
            dist.barrier()
            took = torch.tensor([_time_steps(step, steps)])
            dist.all_reduce(took, op=dist.ReduceOp.MAX)   # the slowest rank sets the pace
            seconds[step] += took.item()
        for name, step in (("ddp", ddp_step), ("paratrain", paratrain_step)):
            results[name].append(args.steps * args.batch * env.world_size / seconds[step])
    if env.rank == 0:
        with open(args.out, "w") as handle:
            json.dump(results, handle)


def compare_ddp(args) -> list[dict]:
    rows = []
    for model in args.models:
        for workers in args.workers:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
                out = tmp.name
            cmd = [sys.executable, "-m", "paratrain.cli", "launch", "-n", str(workers), __file__, "--worker",
                   "--model", model, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--out", out]
            subprocess.run(cmd, check=True, timeout=1800, stdout=subprocess.DEVNULL,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
            with open(out) as handle:
                res = json.load(handle)
            os.unlink(out)
            ratios = [p / d for p, d in zip(res["paratrain"], res["ddp"])]
            rows.append({"model": model, "workers": workers, "ddp_samples_per_sec": statistics.median(res["ddp"]),
                         "paratrain_samples_per_sec": statistics.median(res["paratrain"]),
                         "ratio_median": statistics.median(ratios), "ratios": [round(r, 3) for r in ratios]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def compare_overhead(args) -> dict:
    """Single process: paratrain.fit (strategy 'local') vs a hand-written loop over the
    same data, model, optimizer and batch order. Both compute the same update (the
    mean gradient: the hand loop's loss is a mean, fit's a sum divided by the batch).

    Per-step overhead: fit's training loop (from its first step to its last, timed by
    a callback; fit also computes the loss and accuracy each step for its Speedometer)
    against the whole hand loop. fit's one-time work (building the strategy, the final
    param_checksum) is reported apart, as the whole call's overhead. Both in wall-clock
    and CPU time (one torch thread: the process's CPU time is its own work). On this
    shared machine even CPU time of identical windows swings by +-10%, hence many
    short A B A repeats and their median."""
    import paratrain
    from paratrain.data.datasets import load_synthetic
    from paratrain.train.callbacks import Callback
    torch.set_num_threads(1)
    train, _ = load_synthetic(num_samples=args.batch * args.steps, num_features=784)
    loss_fn = nn.CrossEntropyLoss()

    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def since(start: tuple[float, float]) -> tuple[float, float]:
        wall, cpu = now()
        return wall - start[0], cpu - start[1]

    class LoopClock(Callback):
        def on_train_begin(self, state) -> None:
            self.start = now()

        def on_step_end(self, state) -> None:
            self.loop = since(self.start)

    def hand_loop() -> dict:
        torch.manual_seed(0)
        model = MODELS["mlp"]()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        start = now()
        for i in range(0, len(train) - args.batch + 1, args.batch):
            x, y = train.batch(order[i:i + args.batch])
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        took = since(start)
        return {"loop": took, "call": took}

    def paratrain_fit() -> dict:
        torch.manual_seed(0)
        model = MODELS["mlp"]()
        clock = LoopClock()
        start = now()
        paratrain.fit(model, train, strategy="local", epochs=1, batch_size=args.batch,
                      optimizer_params={"lr": 0.01, "momentum": 0.9}, callbacks=[clock])
        return {"loop": clock.loop, "call": since(start)}

    hand_loop(), paratrain_fit()   # warm up
    overheads = {f"{span}_{clock}": [] for span in ("loop", "call") for clock in ("wall", "cpu")}
    for repeat in range(args.repeats):
        # A B A, the outer side alternating between repeats: a change of load on the
        # (shared) machine during a repeat hits both alike.
        outer, inner = (hand_loop, paratrain_fit) if repeat % 2 == 0 else (paratrain_fit, hand_loop)
        times = {hand_loop: [], paratrain_fit: []}
        for fn in (outer, inner, outer):
            times[fn].append(fn())
        for name in overheads:
            span, clock = name.split("_")
            index = 0 if clock == "wall" else 1
            ours = statistics.mean(t[span][index] for t in times[paratrain_fit])
            theirs = statistics.mean(t[span][index] for t in times[hand_loop])
            overheads[name].append(ours / theirs - 1.0)
    row = {f"{name}_overhead_median_pct": round(100 * statistics.median(values), 2)
           for name, values in overheads.items()}
    row.update({"loop_cpu_overheads_pct": [round(100 * o, 2) for o in overheads["loop_cpu"]],
                "repeats": args.repeats, "steps": args.steps, "batch": args.batch})
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--workers", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--batch", type=int, default=64, help="per-worker batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--overhead", action="store_true", help="fit() vs a hand loop, one process")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        # gloo's threads can abort the interpreter's teardown (docs/internals.md,
        # "Process exit"); the results file is written: end here.
        from paratrain.cli import exit_without_teardown
        exit_without_teardown(0)
    elif args.overhead:
        compare_overhead(args)
    else:
        compare_ddp(args)


if __name__ == "__main__":
    main()
