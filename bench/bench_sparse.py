"""Embedding tables on the parameter servers against PyTorch DDP (issue 12).

On the click model (``paratrain.models.dlrm`` on ``paratrain.data.clicks`` logs), at
table sizes ``--base-tables`` times each of ``--scales`` (default 1, 10, 100):

* ``dist_sync`` and ``dist_async`` with ``paratrain.nn.ServerEmbedding`` tables
  (``paratrain train --model dlrm``): the rows live on ``--servers`` servers, each worker
  pulls and pushes only the rows its batch touches;
* PyTorch ``DistributedDataParallel`` with dense ``nn.Embedding`` tables of the same
  size (gloo): every step allreduces the whole table gradient. Skipped where the
  tables, their gradient and Adam's two moments would pass ``--ddp-max-mb`` per worker.

Each row reports the job's samples/s over the training steps and the bytes one worker
puts on the wire per step (paratrain: its payload bytes, median over steps; DDP: a ring
allreduce of every gradient, ``2 (N - 1) / N`` times their bytes). One JSON line per
configuration, a table at the end; ``--json FILE`` writes all of them.

    python bench/bench_sparse.py                                   # the figures (minutes)
    python bench/bench_sparse.py --base-tables 2000,200 --steps 20 --scales 1,10   # a smoke run
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BATCH = 512
DIM = 16


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def _tables(base: tuple[int, ...], scale: int) -> tuple[int, ...]:
    return tuple(rows * scale for rows in base)


# ----------------------------------------------------------------------------- paratrain


def run_paratrain(strategy: str, tables: tuple[int, ...], args) -> dict:
    """``paratrain train --model dlrm`` for ``args.steps`` steps; samples/s from its
    summary, bytes per step from rank 0's metrics."""
    with tempfile.TemporaryDirectory(prefix="bench_sparse_") as logs:
        command = [sys.executable, "-m", "paratrain.cli", "train", "--model", "dlrm", "--strategy", strategy,
                   "--workers", str(args.workers), "--servers", str(args.servers),
                   "--table-sizes", ",".join(map(str, tables)), "--embedding-dim", str(DIM),
                   "--train-samples", str(args.steps * BATCH), "--heldout-samples", "1024",
                   "--batch-size", str(BATCH), "--json", "--no-progress", "--log-interval", "1000000",
                   "--log-dir", logs]
        result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=args.timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{strategy} failed:\n{result.stderr[-3000:]}")
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        lines = [json.loads(line) for line in (Path(logs) / "metrics.jsonl").read_text().splitlines()]
        sent = [line["bytes_sent"] for line in lines if line.get("kind") == "train"][args.warmup:]
    return {"samples_per_sec": summary["samples_per_sec"], "bytes_per_step": statistics.median(sent) if sent else None}


# ----------------------------------------------------------------------------- DDP


def ddp_table_mb(tables: tuple[int, ...]) -> float:
    """Per worker: the tables, their dense gradient and Adam's two moments, in MB."""
    return 4 * sum(tables) * DIM * 4 / 1e6


def _ddp_worker(rank: int, world: int, port: int, tables: tuple[int, ...], steps: int, warmup: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from paratrain.comm.accounting import ring_allreduce_bytes
    from paratrain.data.clicks import build_clicks
    from paratrain.models.dlrm import DLRMConfig, build_dlrm, click_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    train, _ = build_clicks(num_train=steps * BATCH, num_heldout=16, table_sizes=tables, seed=0)
    dense_table = lambda rows, dim: torch.nn.Embedding(rows, dim)   # noqa: E731  (dense gradient: DDP allreduces it)
    model = DistributedDataParallel(build_dlrm(DLRMConfig(num_dense=train.num_dense, table_sizes=tables,
                                                          embedding_dim=DIM), seed=0, embedding_factory=dense_table))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    share = BATCH // world
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    dist.barrier()
    start = None
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        batch = train.batch(order[step * BATCH + rank * share: step * BATCH + (rank + 1) * share])
        optimizer.zero_grad()
        click_loss(model(batch["dense"], batch["sparse"]), batch).backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if rank == 0:
        Path(out).write_text(json.dumps({"samples_per_sec": (steps - warmup) * BATCH / seconds,
                                         "bytes_per_step": ring_allreduce_bytes(gradient_bytes, world)}))
    dist.destroy_process_group()


def run_ddp(tables: tuple[int, ...], args) -> dict:
    import torch.multiprocessing as mp

    from paratrain.launch import free_port

    with tempfile.TemporaryDirectory(prefix="bench_sparse_ddp_") as tmp:
        out = str(Path(tmp) / "ddp.json")
        context = mp.get_context("spawn")
        procs = [context.Process(target=_ddp_worker, args=(rank, args.workers, port, tables, args.steps,
                                                           args.warmup, out))
                 for port in [free_port()] for rank in range(args.workers)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + args.timeout
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if any(proc.exitcode != 0 for proc in procs):
            raise RuntimeError(f"DDP workers exited with {[proc.exitcode for proc in procs]}")
        return json.loads(Path(out).read_text())


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-tables", default="100000,10000,1000,100",
                        type=lambda text: tuple(int(x) for x in text.split(",")))
    parser.add_argument("--scales", default="1,10,100", type=lambda text: [int(x) for x in text.split(",")])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="training steps per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of bytes (and DDP's time)")
    parser.add_argument("--ddp-max-mb", type=float, default=2000.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", default=None, help="write every row here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    rows = []
    for scale in args.scales:
        tables = _tables(args.base_tables, scale)
        for name in ("dist_sync", "dist_async", "ddp"):
            row = {"scale": scale, "table_rows": sum(tables), "tables": list(tables), "strategy": name}
            if name == "ddp" and ddp_table_mb(tables) > args.ddp_max_mb:
                row["skipped"] = f"DDP would hold {ddp_table_mb(tables):.0f} MB per worker (> --ddp-max-mb)"
            else:
                row.update(run_ddp(tables, args) if name == "ddp" else run_paratrain(name, tables, args))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'scale':>5} {'rows':>10} {'strategy':>10} {'samples/s':>10} {'bytes/step':>12}")
    for row in rows:
        speed = f"{row['samples_per_sec']:.0f}" if "samples_per_sec" in row else "-"
        sent = f"{row['bytes_per_step']:.0f}" if row.get("bytes_per_step") is not None else "-"
        print(f"{row['scale']:>5} {row['table_rows']:>10} {row['strategy']:>10} {speed:>10} {sent:>12}"
              + (f"  ({row['skipped']})" if "skipped" in row else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
