#!/usr/bin/env python3
"""Communication efficiency on a really slow network: 4 workers, 100 Mbit/s links.

Four hosts are network namespaces joined through a bridge namespace by veth pairs,
every link limited with ``tc qdisc ... tbf`` (``scripts/netns_hosts.py``; no netem on
this kernel, so no added delay). One worker per host trains an MLP of about 2M
parameters on digits with each method in turn, in the same run:

| method | what moves each step |
|---|---|
| ``ddp`` | PyTorch DDP, plain fp32 allreduce |
| ``ddp_powersgd`` | DDP with ``ddp_comm_hooks.powerSGD_hook`` (same rank as ours) |
| ``none`` ``fp16`` ``2bit`` ``topk`` ``powersgd`` | ``paratrain.Trainer`` over ``allreduce`` with that compression |
| ``local_sgd`` | ``paratrain.Trainer`` with local SGD, models averaged every H steps |

Reported per method: median step time, steps and training seconds to reach the
held-out accuracy target (evaluation and the barrier after it are not timed), and the
bytes really sent by each host's interface per step (``/sys/class/net/eth0``). Run as
root from the repository root::

    python bench/bench_slow_network.py --rate 100mbit --out bench/results/slow_network.json

Everything it creates lives in its own namespaces and is removed at the end, also on
errors and Ctrl-C (``NetnsHosts`` is a context manager that always tears down).
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
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("ddp", "ddp_powersgd", "none", "fp16", "2bit", "topk", "powersgd", "local_sgd")
WORLD = 4


@dataclass(frozen=True)
class BenchConfig:
    """One method's run; every method shares everything but ``method``."""

    method: str
    hidden: tuple[int, ...] = (1024, 1024, 1024)
    global_batch: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    target: float = 0.95
    max_steps: int = 150
    eval_every: int = 4
    threshold: float = 0.5           # 2bit
    topk_ratio: float = 0.01
    powersgd_rank: int = 4           # ours and DDP's hook
    sync_every: int = 4              # local SGD's H (a divisor of eval_every: evaluate averaged models)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; choose from {', '.join(METHODS)}")
        if self.global_batch % WORLD:
            raise ValueError(f"global_batch={self.global_batch} must be a multiple of {WORLD} workers")
        if self.eval_every % self.sync_every:
            raise ValueError(f"eval_every={self.eval_every} must be a multiple of sync_every={self.sync_every}")

    @property
    def compression(self) -> str | None:
        return {"none": None, "fp16": "fp16", "2bit": f"2bit:{self.threshold}",
                "topk": f"topk:{self.topk_ratio}", "powersgd": f"powersgd:{self.powersgd_rank}"}.get(self.method)


# --------------------------------------------------------------------------- worker side

def build_step(config: BenchConfig, model, world: int):
    """A ``step(x, y)`` for the method, and a function that reports paratrain's byte counters."""
    import torch
    import torch.nn.functional as F

    if config.method.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel
        if config.method == "ddp_powersgd":
            # One bucket: the hook chains its Q allreduce in a future callback, and with
            # several buckets gloo ranks then issue collectives in different orders
            # ("collective mismatch" abort, seen here with the default 1 MB first bucket).
            ddp = DistributedDataParallel(model, bucket_cap_mb=100)
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
            state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=config.powersgd_rank,
                                           start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)
            ddp.register_comm_hook(state, powersgd.powerSGD_hook)
        else:
            ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=config.lr, momentum=config.momentum)

        def ddp_step(x, y):
            loss = F.cross_entropy(ddp(x), y)      # DDP averages over workers: global mean
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return ddp_step, lambda: {}

    from paratrain import Trainer
    trainer = Trainer(model, "sgd", {"lr": config.lr, "momentum": config.momentum}, kvstore="allreduce",
                      compression=config.compression,
                      sync_every=config.sync_every if config.method == "local_sgd" else None)

    def paratrain_step(x, y):
        F.cross_entropy(model(x), y, reduction="sum").backward()   # Gluon style: a sum
        trainer.step(len(x))
    counters = lambda: {key: getattr(trainer.sync.reducer if hasattr(trainer.sync, "reducer") else trainer.sync,
                                     key, None) for key in ("bytes_sent", "payload_bytes")}
    return paratrain_step, counters


def tx_bytes() -> int:
    return int(Path("/sys/class/net/eth0/statistics/tx_bytes").read_text())


def worker(config: BenchConfig, rank: int, master: str, port: int, result_path: str) -> None:
    """Train on this host until the target accuracy or ``max_steps``; rank 0 writes the result."""
    import torch
    import torch.distributed as dist
    from datetime import timedelta
    from paratrain.data.datasets import load_digits
    from paratrain.models import build_mlp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    train, heldout = load_digits()
    torch.manual_seed(config.seed)
    model = build_mlp(train.sample_shape, 10, config.hidden)
    step, counters = build_step(config, model, WORLD)
    local_batch = config.global_batch // WORLD
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(train), generator=generator)
    cursor, train_s, step_times, reached = 0, 0.0, [], None
    evals = []
    tx_start = tx_bytes()
    for step_index in range(1, config.max_steps + 1):
        if cursor + config.global_batch > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        indices = order[cursor + rank * local_batch: cursor + (rank + 1) * local_batch]
        cursor += config.global_batch
        x, y = train.batch(indices)
        start = time.perf_counter()
        model.train()
        step(x, y)
        step_times.append(time.perf_counter() - start)
        train_s += step_times[-1]
        if step_index % config.eval_every == 0:
            accuracy = evaluate(model, heldout)
            evals.append((step_index, round(train_s, 3), accuracy))
            done = torch.tensor([1.0 if accuracy >= config.target else 0.0])
            dist.broadcast(done, src=0)     # rank 0 decides; the same step everywhere
            if done.item():
                reached = (step_index, train_s)
                break
    tx_total = tx_bytes() - tx_start
    result = {"config": asdict(config), "rank": rank, "steps": step_index,
              "median_step_s": statistics.median(step_times), "train_s": train_s,
              "steps_to_target": reached[0] if reached else None,
              "time_to_target_s": reached[1] if reached else None,
              "final_accuracy": evals[-1][2] if evals else None, "evals": evals,
              "wire_bytes_per_step": tx_total / step_index, **counters()}
    result = {k: (v / step_index if k in ("bytes_sent", "payload_bytes") and v is not None else v)
              for k, v in result.items()}
    Path(result_path).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def evaluate(model, heldout) -> float:
    import torch
    model.eval()
    with torch.no_grad():
        predictions = model(heldout.inputs).argmax(1)
    return (predictions == heldout.targets).float().mean().item()


# --------------------------------------------------------------------------- driver side

def run_method(hosts, config: BenchConfig, timeout_s: float, workdir: str) -> dict:
    """Start one worker per host, wait (bounded), and return every rank's result."""
    port = hosts.free_port(0)
    paths = [os.path.join(workdir, f"{config.method}.rank{rank}.json") for rank in range(WORLD)]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(WORLD):
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(config)),
                "--rank", str(rank), "--master", hosts.address(0), "--port", str(port), "--result", paths[rank]]
        procs.append(hosts.popen(rank, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout_s
    outputs = []
    for rank, proc in enumerate(procs):
        try:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise RuntimeError(f"method {config.method}: rank {rank} ran past {timeout_s} s")
        if proc.returncode != 0:
            raise RuntimeError(f"method {config.method}: rank {rank} exited {proc.returncode}:\n{outputs[-1][-3000:]}")
    return [json.loads(Path(p).read_text()) for p in paths]


def summarize(results: list[dict]) -> dict:
    """Rank 0's timing (its eval decides the stop) and the mean wire bytes over hosts."""
    head = results[0]
    return {"method": head["config"]["method"], "median_step_s": round(head["median_step_s"], 4),
            "mean_step_s": round(head["train_s"] / head["steps"], 4),
            "steps_to_target": head["steps_to_target"],
            "time_to_target_s": None if head["time_to_target_s"] is None else round(head["time_to_target_s"], 2),
            "final_accuracy": round(head["final_accuracy"], 4),
            "wire_MB_per_step": round(statistics.mean(r["wire_bytes_per_step"] for r in results) / 1e6, 3),
            "counted_MB_per_step": None if head.get("bytes_sent") is None else round(head["bytes_sent"] / 1e6, 3),
            "payload_MB_per_step": None if head.get("payload_bytes") is None else round(head["payload_bytes"] / 1e6, 3),
            "evals": head["evals"]}


def print_table(rows: list[dict], target: float) -> None:
    print(f"\n{'method':<14}{'mean step s':>12}{'steps':>7}{'to ' + str(target) + ' s':>11}"
          f"{'wire MB/step':>14}{'payload MB':>12}{'vs ddp':>8}")
    ddp_time = next((r["time_to_target_s"] for r in rows if r["method"] == "ddp"), None)
    for row in rows:
        speedup = (f"{ddp_time / row['time_to_target_s']:.2f}x" if ddp_time and row["time_to_target_s"] else "-")
        print(f"{row['method']:<14}{row['mean_step_s']:>12.3f}{str(row['steps_to_target']):>7}"
              f"{str(row['time_to_target_s']):>11}{row['wire_MB_per_step']:>14.3f}"
              f"{str(row['payload_MB_per_step']):>12}{speedup:>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--rate", default="100mbit", help="per-link rate for tc tbf (default 100mbit)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--max-steps", type=int, default=BenchConfig.max_steps)
    parser.add_argument("--threshold", type=float, default=BenchConfig.threshold, help="2bit threshold")
    parser.add_argument("--topk-ratio", type=float, default=BenchConfig.topk_ratio)
    parser.add_argument("--rank-r", type=int, default=BenchConfig.powersgd_rank, help="PowerSGD rank (both)")
    parser.add_argument("--sync-every", type=int, default=BenchConfig.sync_every, help="local SGD H")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per method before it is killed")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "slow_network.json"))
    args = parser.parse_args(argv)

    if args.worker:
        fields = json.loads(args.worker)
        fields["hidden"] = tuple(fields["hidden"])
        worker(BenchConfig(**fields), args.rank, args.master, args.port, args.result)
        return 0

    sys.path.insert(0, str(REPO / "scripts"))
    from netns_hosts import NetnsHosts, unavailable_reason
    reason = unavailable_reason()
    if reason:
        print(f"bench_slow_network: cannot run: {reason}", file=sys.stderr)
        return 1
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    configs = [BenchConfig(method=m, max_steps=args.max_steps, threshold=args.threshold,
                           topk_ratio=args.topk_ratio, powersgd_rank=args.rank_r, sync_every=args.sync_every)
               for m in methods]
    rows = []
    with NetnsHosts(WORLD, rate=args.rate) as hosts, tempfile.TemporaryDirectory() as workdir:
        for config in configs:
            started = time.monotonic()
            row = summarize(run_method(hosts, config, args.timeout, workdir))
            rows.append(row)
            print(f"{config.method}: {json.dumps({k: v for k, v in row.items() if k != 'evals'})} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
    print_table(rows, BenchConfig.target)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rate": args.rate, "workers": WORLD, "command": " ".join(sys.argv),
                               "configs": [asdict(c) for c in configs], "results": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
