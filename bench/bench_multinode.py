"""Samples/sec across hosts in network namespaces with rate-limited links.

Sets up ``--hosts`` namespace hosts (scripts/netns_hosts.py) whose links are limited to
``--rate`` by ``tc tbf``, then trains the same MLP with each strategy across them and
with plain PyTorch DDP (gloo) over the same hosts, and prints a table.

    sudo python bench/bench_multinode.py                        # 4 hosts, 1gbit, everything
    sudo python bench/bench_multinode.py --runs allreduce,ddp --hosts 2 --rate 100mbit

Run names: ``allreduce``, ``ddp``, ``dist_sync:<servers>``, ``dist_async:<servers>``.
``allreduce`` and ``ddp`` start through ``torchrun --rdzv-backend c10d``; the parameter
server strategies through ``paratrain launch --nnodes``, which puts the servers on
host 0. samples/sec counts global samples over the time spent in training steps (the
same definition as ``paratrain train``'s summary), so start-up is not included.

Needs root. The numbers mean most on an otherwise idle machine with a core per process.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import secrets
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 420


def _load_netns_hosts():
    spec = importlib.util.spec_from_file_location("netns_hosts", ROOT / "scripts" / "netns_hosts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("netns_hosts", module)
    spec.loader.exec_module(module)
    return module


# -- the DDP baseline worker (runs under torchrun) ------------------------------------

def ddp_worker(args: argparse.Namespace) -> int:
    """Plain PyTorch DDP on the same model, data shards and global batch."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from paratrain.data import build_dataset
    from paratrain.data.sampler import ShardedBatchSampler
    from paratrain.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # torchrun's env:// variables
    rank, world = dist.get_rank(), dist.get_world_size()
    train, _ = build_dataset(args.dataset)
    model = DistributedDataParallel(build_model(args.model, train.sample_shape, train.num_classes, seed=args.seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    sampler = ShardedBatchSampler(len(train), args.batch_size, rank, world, args.seed)
    step_seconds, samples, steps = 0.0, 0, 0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        epoch_loss = torch.zeros(2, dtype=torch.float64)  # (loss sum, samples) on this rank
        for global_len, indices in sampler.batches(epoch):
            inputs, targets = train.batch(indices)
            tic = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            batch_loss = loss_fn(model(inputs), targets)
            batch_loss.backward()          # DDP allreduces the gradient buckets here
            optimizer.step()
            step_seconds += time.perf_counter() - tic
            samples, steps = samples + global_len, steps + 1
            epoch_loss += torch.tensor([batch_loss.item() * len(targets), len(targets)], dtype=torch.float64)
    # the last epoch's mean loss over all samples, as paratrain's summary reports it
    dist.all_reduce(epoch_loss)
    if rank == 0:
        print(json.dumps({"strategy": "ddp", "samples_per_sec": samples / step_seconds, "steps": steps,
                          "final_loss": (epoch_loss[0] / epoch_loss[1]).item(),
                          "wall_s": round(time.perf_counter() - start, 3)}), flush=True)
    dist.destroy_process_group()
    return 0


# -- the driver ------------------------------------------------------------------------

def _summary(output: str) -> dict | None:
    """The last JSON object line (``paratrain launch`` prefixes lines with ``[rankN]: ``)."""
    for line in reversed(output.splitlines()):
        line = line.split("]: ", 1)[-1].strip()
        if line.startswith("{") and "samples_per_sec" in line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _train_args(args: argparse.Namespace, strategy: str) -> list[str]:
    return ["-m", "paratrain.cli", "train", "--strategy", strategy, "--model", args.model,
            "--dataset", args.dataset, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--seed", str(args.seed), "--json", "--no-progress"]


def command_for(run: str, hosts, index: int, port: int, args: argparse.Namespace) -> list[str]:
    """The command host ``index`` runs for benchmark ``run``."""
    strategy, _, servers = run.partition(":")
    if strategy in ("allreduce", "ddp"):
        torchrun = hosts.torchrun_argv(index, nproc_per_node=args.nproc_per_node, port=port,
                                       run_id=f"{hosts.config.prefix}{port}")
        if strategy == "ddp":
            return [*torchrun, str(pathlib.Path(__file__).resolve()), "--ddp-worker", *_shared_flags(args)]
        return [*torchrun, *_train_args(args, "allreduce")]
    if strategy in ("dist_sync", "dist_async"):
        servers = servers or "1"
        return [sys.executable, "-m", "paratrain.cli", "launch", "-n", str(args.nproc_per_node),
                "--servers", servers, "--nnodes", str(hosts.num_hosts), "--node-rank", str(index),
                "--master-addr", hosts.address(0), "--master-port", str(port), "--bind", hosts.address(0),
                "--", "-mparatrain.cli", *_train_args(args, strategy)[2:], "--servers", servers]
    raise ValueError(f"run={run!r} is not allowed; use allreduce, ddp, dist_sync:<servers> or "
                     "dist_async:<servers>")


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--dataset", args.dataset, "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed)]


def run_one(run: str, hosts, args: argparse.Namespace) -> dict:
    """Run ``run`` on every host at once; rank 0's summary, or an ``error``."""
    port = hosts.free_port(0)
    # one job secret for every node: each node's `paratrain launch` would make up its own
    env = {"PARATRAIN_TIMEOUT": "60", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PARATRAIN_SECRET": secrets.token_hex(16)}
    processes = [hosts.popen(i, command_for(run, hosts, i, port, args), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=ROOT)
                 for i in range(hosts.num_hosts)]
    outputs, codes = [], []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            process.kill()
            outputs.append(process.communicate(timeout=10)[0])
        codes.append(process.returncode)
    summaries = [s for s in map(_summary, outputs) if s]
    if any(codes) or not summaries:
        tail = next((o for o, c in zip(outputs, codes) if c), outputs[0])[-1500:]
        return {"run": run, "error": f"exit codes {codes}", "output_tail": tail}
    return {"run": run, **summaries[0], "job_samples_per_sec": job_samples_per_sec(summaries[0])}


def job_samples_per_sec(summary: dict) -> float:
    """Samples/sec of the whole job. ``paratrain train`` reports rank 0's pace times the
    number of workers; in async runs workers take different numbers of steps (those next
    to the server run faster), so scale by the mean steps per worker over rank 0's. In
    lockstep runs every worker takes the same steps and this is the reported figure."""
    per_worker = summary.get("steps_per_worker")
    if not per_worker or not summary.get("steps"):
        return summary["samples_per_sec"]
    return summary["samples_per_sec"] * statistics.mean(per_worker) / summary["steps"]


def _available(run: str) -> str | None:
    if run.startswith("dist_") and importlib.util.find_spec("paratrain.parallel.ps_sync") is None:
        return "the parameter-server worker side (paratrain.parallel.ps_sync) is missing"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--rate", default="1gbit", help="per-link tbf rate ('none' for no limit)")
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--runs", default="allreduce,ddp,dist_sync:1,dist_sync:2,dist_async:1")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the table shows the median")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(args)

    netns_hosts = _load_netns_hosts()
    reason = netns_hosts.unavailable_reason()
    if reason:
        print(f"bench_multinode: {reason}", file=sys.stderr)
        return 1
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    rate = None if args.rate == "none" else args.rate
    results = []
    with netns_hosts.NetnsHosts(args.hosts, rate=rate) as hosts:
        # interleave the repeats so that a burst of load elsewhere hits every run alike
        for _ in range(args.repeat):
            for run in runs:
                skipped = _available(run)
                result = {"run": run, "skipped": skipped} if skipped else run_one(run, hosts, args)
                results.append(result)
                print(json.dumps(result), flush=True)
    print(f"\n{args.hosts} hosts x {args.nproc_per_node} process(es), links {args.rate}, "
          f"{args.model} on {args.dataset}, global batch {args.batch_size}, {args.epochs} epoch(s), "
          f"{args.repeat} repeat(s)")
    print(f"{'run':<14} {'samples/sec':>12} {'min':>9} {'max':>9} {'steps':>6} {'final_loss':>11}")
    for run in runs:
        done = [r for r in results if r["run"] == run and "samples_per_sec" in r]
        if done:
            speeds = sorted(r.get("job_samples_per_sec", r["samples_per_sec"]) for r in done)
            print(f"{run:<14} {statistics.median(speeds):>12.1f} {speeds[0]:>9.1f} {speeds[-1]:>9.1f} "
                  f"{done[0]['steps']:>6} {done[0]['final_loss']:>11.4f}")
        else:
            failed = next(r for r in results if r["run"] == run)
            print(f"{run:<14} {'-':>12}  {failed.get('skipped') or failed.get('error')}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
