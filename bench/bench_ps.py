"""Parameter-server benchmarks (issue 3).

  (a) python bench/bench_ps.py throughput   push+pull of 4 MB and 64 MB keys vs raw ZeroMQ
  (b) python bench/bench_ps.py training     MLP 784-1024-1024-10 samples/sec: dist_sync,
                                            dist_async, allreduce vs MXNet 1.9.1 (2 and 4 workers)
  (c) python bench/bench_ps.py straggler    one of 4 workers 3x slower: samples/sec and
                                            time to 0.93 accuracy for dist_sync/async/ssp

Every figure is the median of ``--repeats`` runs (default 5); results are printed as a
table and, with ``--json FILE``, written as JSON. Processes run one thread each.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

MXNET_PYTHON = HERE / ".venv-mxnet" / "bin" / "python"


def _child_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ----------------------------------------------------------------------------- (a) throughput


def _zmq_echo_server() -> None:
    """Raw ZeroMQ peer: a ROUTER that sends every message straight back (zero copy)."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:0")
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    while True:
        parts = sock.recv_multipart(copy=False)
        if parts[1].bytes == b"stop":
            return
        sock.send_multipart(parts, copy=False)


def _time_raw_zmq(nbytes: int, iterations: int) -> float:
    import numpy as np
    import zmq

    proc = subprocess.Popen([sys.executable, __file__, "zmq-echo"], stdout=subprocess.PIPE, text=True,
                            env=_child_env())
    try:
        address = proc.stdout.readline().strip()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(address)
        payload = np.ones(nbytes // 4, dtype=np.float32)
        out = np.empty_like(payload)
        seconds = []
        for index in range(iterations + 1):
            start = time.perf_counter()
            sock.send_multipart([b"push", memoryview(payload)], copy=False)
            reply = sock.recv_multipart(copy=False)
            out[:] = np.frombuffer(reply[1].buffer, dtype=np.float32)  # the pull's copy into place
            if index:  # the first one warms up
                seconds.append(time.perf_counter() - start)
        sock.send_multipart([b"stop"])
        sock.close(linger=1000)
        return statistics.median(seconds)
    finally:
        proc.wait(timeout=30)


def _start_ps(num_servers: int, num_workers: int, secret: str):
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    env = _child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=store.port, WORLD_SIZE=num_workers,
                     PARATRAIN_STORE_HOSTED=1, PARATRAIN_NUM_SERVERS=num_servers, PARATRAIN_SECRET=secret,
                     PARATRAIN_ROLE="server", RANK=0)
    procs = [subprocess.Popen([sys.executable, "-m", "paratrain.ps.server"], env=dict(env, PARATRAIN_SERVER_RANK=str(i)),
                              stderr=subprocess.DEVNULL) for i in range(num_servers)]
    prefixed = dist.PrefixStore("paratrain/attempt0/", store)
    keys = [f"ps/server/{i}" for i in range(num_servers)]
    prefixed.wait(keys, timedelta(seconds=60))
    return store, procs, [prefixed.get(k).decode() for k in keys]


def _time_ps(nbytes: int, iterations: int, fused: bool) -> float:
    import torch

    from paratrain.kvstore.dist import DistKVStore, DistKVStoreConfig

    secret = secrets.token_hex(8)
    store, procs, addresses = _start_ps(1, 1, secret)
    try:
        kv = DistKVStore(DistKVStoreConfig("dist_sync"), rank=0, num_workers=1, addresses=addresses, secret=secret)
        value = torch.ones(nbytes // 4)
        out = torch.empty_like(value)
        kv.init("w", value)
        seconds = []
        for index in range(iterations + 1):
            start = time.perf_counter()
            if fused:
                kv.pushpull("w", value, out=out)
            else:
                kv.push("w", value)
                kv.pull("w", out=out)
            if index:
                seconds.append(time.perf_counter() - start)
        kv.close()
        return statistics.median(seconds)
    finally:
        for proc in procs:
            proc.wait(timeout=30)
        del store


def bench_throughput(args) -> list[dict]:
    rows = []
    for megabytes in args.sizes_mb:
        nbytes = int(megabytes * (1 << 20))
        iterations = max(3, int(64 / megabytes) * 2)
        runs: dict[str, list[float]] = {"pushpull": [], "push_then_pull": [], "raw_zmq": []}
        for _ in range(args.repeats):  # interleaved, so all see the same machine load
            runs["pushpull"].append(2 * nbytes / _time_ps(nbytes, iterations, fused=True) / 1e9)
            runs["push_then_pull"].append(2 * nbytes / _time_ps(nbytes, iterations, fused=False) / 1e9)
            runs["raw_zmq"].append(2 * nbytes / _time_raw_zmq(nbytes, iterations) / 1e9)
        medians = {name: statistics.median(values) for name, values in runs.items()}
        rows.append({"key_mb": megabytes, **{f"{k}_GBps": round(v, 3) for k, v in medians.items()},
                     "ratio_pushpull": round(medians["pushpull"] / medians["raw_zmq"], 3),
                     "ratio_push_then_pull": round(medians["push_then_pull"] / medians["raw_zmq"], 3),
                     "runs_GBps": {k: [round(x, 3) for x in v] for k, v in runs.items()}})
    return rows


# ----------------------------------------------------------------------------- (b), (c) training


def _train_worker(args) -> None:
    """Runs inside ``paratrain launch``: the MLP on fixed synthetic data (throughput)
    or on digits (straggler, time to accuracy). Prints one BENCH_RESULT line."""
    import torch
    import torch.nn.functional as F

    from paratrain.env import read_env
    from paratrain.train.trainer import Trainer

    torch.set_num_threads(1)
    env = read_env()
    torch.manual_seed(0)
    hidden = [int(h) for h in args.hidden.split(",")]
    layers, width = [], args.inputs
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    options = {"staleness": args.staleness} if args.strategy == "dist_ssp" else {}
    trainer = Trainer(model, "sgd", {"lr": args.lr, "momentum": args.momentum}, kvstore=args.strategy,
                      kvstore_options=options)
    if args.digits:
        from paratrain.data.datasets import load_digits
        train, test = load_digits()
        x_all, y_all = train.inputs, train.targets
        x_test, y_test = test.inputs, test.targets
        x_all, x_test = x_all.reshape(len(x_all), -1), x_test.reshape(len(x_test), -1)
    else:
        gen = torch.Generator().manual_seed(env.rank)
        x_all, y_all = torch.randn(args.batch, args.inputs, generator=gen), torch.arange(args.batch) % 10
    start = reached = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start, cpu_start = time.perf_counter(), time.process_time()
        begin = time.perf_counter()
        rows = torch.randint(len(x_all), (args.batch,), generator=torch.Generator().manual_seed(step * 97 + env.rank))
        loss = F.cross_entropy(model(x_all[rows]), y_all[rows])
        loss.backward()
        if env.rank == args.slow_rank:  # the straggler: its compute takes 3x as long
            time.sleep(2 * (time.perf_counter() - begin))
        trainer.step(args.batch)
        if args.digits and env.rank == 0 and reached is None and start is not None and step % 5 == 0:
            with torch.no_grad():
                accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
            if accuracy >= args.target_accuracy:
                reached = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    result = {"rank": env.rank, "samples_per_sec": args.steps * args.batch / elapsed,
              "cpu_ms_per_step": 1e3 * (time.process_time() - cpu_start) / args.steps}
    if args.digits and env.rank == 0:
        with torch.no_grad():
            result["final_accuracy"] = float((model(x_test).argmax(1) == y_test).float().mean())
        result["time_to_accuracy_s"] = reached
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    trainer.close()


def _run_paratrain(strategy: str, workers: int, extra: list[str], timeout_s: float = 600) -> list[dict]:
    servers = ["--servers", "1"] if strategy.startswith("dist_") else []
    cmd = [sys.executable, "-m", "paratrain.cli", "launch", "-n", str(workers), *servers,
           __file__, "train-worker", "--strategy", strategy, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_child_env())
    results = [json.loads(m.group(1)) for m in re.finditer(r"BENCH_RESULT (\{.*\})", done.stdout)]
    if done.returncode != 0 or len(results) != workers:
        raise RuntimeError(f"{strategy} x{workers} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return results


def _run_mxnet(kvstore: str, workers: int, steps: int, allocator_env: bool = False) -> float:
    """MXNet as its launcher runs it, or (``allocator_env``) with the glibc settings
    that ``paratrain launch`` gives its processes (paratrain.env.ALLOCATOR_ENV)."""
    from paratrain.env import ALLOCATOR_ENV

    env = dict(os.environ, PYTHONPATH="", **(ALLOCATOR_ENV if allocator_env else {}))
    done = subprocess.run([str(MXNET_PYTHON), str(HERE / "mxnet_peer.py"), "--kvstore", kvstore, "--workers",
                           str(workers), "--steps", str(steps)], capture_output=True, text=True, timeout=600,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"MXNet {kvstore} x{workers} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["samples_per_sec"]


def bench_training(args) -> list[dict]:
    extra = ["--steps", str(args.steps), "--batch", "64", "--hidden", "1024,1024", "--inputs", "784",
             "--lr", "0.01", "--momentum", "0"]
    have_mxnet = MXNET_PYTHON.exists()
    rows = []
    for workers in args.workers:
        runs: dict[str, list[float]] = {}
        for _ in range(args.repeats):  # interleaved so every system sees the same load
            for strategy in ("dist_sync", "dist_async", "allreduce"):
                rate = sum(r["samples_per_sec"] for r in _run_paratrain(strategy, workers, extra))
                runs.setdefault(strategy, []).append(rate)
            if have_mxnet:
                for kvstore in ("dist_sync", "dist_async"):
                    runs.setdefault(f"mxnet_{kvstore}", []).append(_run_mxnet(kvstore, workers, args.steps))
                    runs.setdefault(f"mxnet_{kvstore}_allocenv", []).append(
                        _run_mxnet(kvstore, workers, args.steps, allocator_env=True))
        medians = {name: statistics.median(values) for name, values in runs.items()}
        for kind in ("dist_sync", "dist_async"):
            row = {"workers": workers, "kvstore": kind, "paratrain_sps": round(medians[kind], 1),
                   "allreduce_sps": round(medians["allreduce"], 1),
                   "paratrain_runs": [round(v, 1) for v in runs[kind]]}
            if have_mxnet:
                row["mxnet_sps"] = round(medians[f"mxnet_{kind}"], 1)
                row["vs_mxnet"] = round(medians[kind] / medians[f"mxnet_{kind}"], 3)
                row["mxnet_runs"] = [round(v, 1) for v in runs[f"mxnet_{kind}"]]
                # Like for like: MXNet given paratrain launch's allocator settings too.
                row["mxnet_allocenv_sps"] = round(medians[f"mxnet_{kind}_allocenv"], 1)
                row["vs_mxnet_allocenv"] = round(medians[kind] / medians[f"mxnet_{kind}_allocenv"], 3)
            row["vs_allreduce"] = round(medians[kind] / medians["allreduce"], 3)
            rows.append(row)
    return rows


def bench_straggler(args) -> list[dict]:
    # Compute must weigh in a step for a 3x slower compute to matter: 1024-wide layers.
    extra = ["--digits", "--steps", str(args.steps), "--batch", "32", "--hidden", "1024,1024", "--inputs", "64",
             "--lr", "0.1", "--momentum", "0.9", "--slow-rank", "3", "--staleness", "2"]
    strategies = ("dist_sync", "dist_async", "dist_ssp")
    runs = {name: {"rates": [], "times": [], "accuracies": []} for name in strategies}
    for _ in range(args.repeats):  # interleaved so every strategy sees the same load
        for strategy in strategies:
            results = _run_paratrain(strategy, 4, extra)
            runs[strategy]["rates"].append(sum(r["samples_per_sec"] for r in results))
            rank0 = next(r for r in results if r["rank"] == 0)
            runs[strategy]["times"].append(rank0["time_to_accuracy_s"])
            runs[strategy]["accuracies"].append(rank0["final_accuracy"])
    rows = []
    for strategy in strategies:
        rates, times, accuracies = (runs[strategy][k] for k in ("rates", "times", "accuracies"))
        reached = [t for t in times if t is not None]
        rows.append({"strategy": strategy, "samples_per_sec": round(statistics.median(rates), 1),
                     "time_to_0.93_s": round(statistics.median(reached), 2) if len(reached) == len(times) else None,
                     "runs_reaching_0.93": f"{len(reached)}/{len(times)}",
                     "final_accuracy": round(statistics.median(accuracies), 4),
                     "runs_sps": [round(r, 1) for r in rates],
                     "runs_time_s": [None if t is None else round(t, 2) for t in times]})
    return rows


# ----------------------------------------------------------------------------- command line


def main() -> None:
    parser = argparse.ArgumentParser(description="parameter-server benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("throughput", "training", "straggler"):
        p = sub.add_parser(name)
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--json", default=None, help="also write the rows to this file")
    sub.choices["throughput"].add_argument("--sizes-mb", type=float, nargs="+", default=[4, 64])
    sub.choices["training"].add_argument("--workers", type=int, nargs="+", default=[2, 4])
    sub.choices["training"].add_argument("--steps", type=int, default=100)
    sub.choices["straggler"].add_argument("--steps", type=int, default=150)
    worker = sub.add_parser("train-worker")
    for flag, kind, default in (("--strategy", str, "dist_sync"), ("--steps", int, 40), ("--warmup", int, 5),
                                ("--batch", int, 64), ("--hidden", str, "1024,1024"), ("--inputs", int, 784),
                                ("--lr", float, 0.01), ("--momentum", float, 0.0), ("--slow-rank", int, -1),
                                ("--staleness", int, 2), ("--target-accuracy", float, 0.93)):
        worker.add_argument(flag, type=kind, default=default)
    worker.add_argument("--digits", action="store_true")
    sub.add_parser("zmq-echo")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)  # one thread per process, as every peer here runs
    if args.command == "zmq-echo":
        return _zmq_echo_server()
    if args.command == "train-worker":
        _train_worker(args)
        from paratrain.cli import exit_without_teardown   # see docs/internals.md, "Process exit"
        exit_without_teardown(0)
    rows = {"throughput": bench_throughput, "training": bench_training, "straggler": bench_straggler}[args.command](args)
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
