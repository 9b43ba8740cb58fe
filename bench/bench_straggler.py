"""Straggler benchmark (issue 6): one of 4 workers 3x slower.

For sync (allreduce), dist_sync, dist_sync with one backup worker, dist_async with
dynamic dispatch and dist_ssp, runs ``paratrain train`` with ``--straggler 3:3`` (rank 3's
every step takes 3x as long) and a simulated ``--step-delay`` of compute, and reports
job samples/sec and the time to 0.93 held-out accuracy (rank 0's clock at the first
epoch-end evaluation that reaches it; resolution one epoch). Every figure is the median
of ``--repeats`` runs, interleaved so every strategy sees the same machine load.

    python bench/bench_straggler.py --repeats 3 [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "allreduce": ["--strategy", "allreduce"],
    "dist_sync": ["--strategy", "dist_sync"],
    "dist_sync_backup1": ["--strategy", "dist_sync", "--backup-workers", "1"],
    "dist_async_dynamic": ["--strategy", "dist_async"],
    "dist_ssp": ["--strategy", "dist_ssp", "--staleness", "2"],
}
TARGET = 0.93


def run_once(extra: list[str], args) -> dict:
    """One training run; its samples/sec, final accuracy and time to TARGET."""
    with tempfile.TemporaryDirectory(prefix="bench_straggler_") as tmp:
        cmd = [sys.executable, "-m", "paratrain.cli", "train", "--workers", "4", "--model", "mlp",
               "--epochs", str(args.epochs), "--straggler", "3:3", "--step-delay", str(args.step_delay),
               "--json", "--no-progress", "--log-interval", "100000", "--log-dir", tmp, *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(extra)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        evals = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in evals if r.get("kind") == "eval"]
    reached = next((r["wall_s"] for r in evals if r["accuracy"] >= TARGET), None)
    return {"samples_per_sec": summary["samples_per_sec"], "accuracy": summary["accuracy"],
            "time_to_target_s": reached, "steps_per_worker": summary.get("steps_per_worker")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--step-delay", type=float, default=0.03, help="simulated compute per step (s)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if args.repeats < 1 or args.epochs < 1 or args.step_delay < 0:
        parser.error(f"--repeats {args.repeats} and --epochs {args.epochs} must be >= 1, "
                     f"--step-delay {args.step_delay} >= 0")
    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    for _ in range(args.repeats):
        for name in args.configs:
            runs[name].append(run_once(CONFIGS[name], args))
            print(name, runs[name][-1], file=sys.stderr, flush=True)
    rows = []
    for name, results in runs.items():
        times = [r["time_to_target_s"] for r in results]
        reached = [t for t in times if t is not None]
        rows.append({"config": name,
                     "samples_per_sec": round(statistics.median(r["samples_per_sec"] for r in results), 1),
                     f"time_to_{TARGET}_s": round(statistics.median(reached), 2) if len(reached) == len(times) else None,
                     f"runs_reaching_{TARGET}": f"{len(reached)}/{len(times)}",
                     "final_accuracy": round(statistics.median(r["accuracy"] for r in results), 4),
                     "runs_sps": [round(r["samples_per_sec"], 1) for r in results],
                     "runs_time_s": [None if t is None else round(t, 2) for t in times],
                     "steps_per_worker_last": results[-1]["steps_per_worker"]})
    print(f"{'config':20s} {'samples/s':>10s} {'t->0.93 s':>10s} {'reached':>8s} {'final acc':>9s}")
    for row in rows:
        t = row[f"time_to_{TARGET}_s"]
        print(f"{row['config']:20s} {row['samples_per_sec']:10.1f} {('-' if t is None else f'{t:.2f}'):>10s} "
              f"{row[f'runs_reaching_{TARGET}']:>8s} {row['final_accuracy']:9.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
