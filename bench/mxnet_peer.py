"""Apache MXNet 1.9.1 as a benchmark peer: the same MLP (784-1024-1024-10, batch 64
per worker) trained with MXNet's own kvstore ``dist_sync``/``dist_async`` and
ps-lite servers. Runs under MXNet's own virtual environment (build it with
``bash bench/setup_mxnet_venv.sh``); never imported by paratrain.

  bench/.venv-mxnet/bin/python bench/mxnet_peer.py --kvstore dist_sync --workers 2 --steps 40

Prints one JSON line: ``{"kvstore": ..., "workers": N, "samples_per_sec": total}``,
the sum over workers of each worker's samples/sec over the timed steps.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(kvstore: str, steps: int, warmup: int, batch: int) -> None:
    import mxnet as mx
    from mxnet import autograd, gluon, nd

    kv = mx.kv.create(kvstore)
    mx.random.seed(kv.rank)
    net = gluon.nn.Sequential()
    net.add(gluon.nn.Dense(1024, activation="relu"), gluon.nn.Dense(1024, activation="relu"), gluon.nn.Dense(10))
    net.initialize(mx.init.Xavier())
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01}, kvstore=kv)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    data = nd.random.normal(shape=(batch, 784))
    label = nd.array([i % 10 for i in range(batch)])

    def step() -> None:
        with autograd.record():
            loss = loss_fn(net(data), label)
        loss.backward()
        trainer.step(batch)

    for _ in range(warmup):
        step()
    nd.waitall()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    nd.waitall()
    elapsed = time.perf_counter() - start
    cpu_ms = 1e3 * (time.process_time() - cpu_start) / steps
    print("MXNET_RESULT " + json.dumps({"rank": kv.rank, "samples_per_sec": steps * batch / elapsed,
                                        "cpu_ms_per_step": cpu_ms}), flush=True)


def _launch(kvstore: str, workers: int, steps: int, warmup: int, batch: int, timeout_s: float) -> dict:
    base = dict(os.environ, DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(_free_port()),
                DMLC_NUM_SERVER="1", DMLC_NUM_WORKER=str(workers), DMLC_NODE_HOST="127.0.0.1",
                OMP_NUM_THREADS="1", MXNET_CPU_WORKER_NTHREADS="1", MKL_NUM_THREADS="1", PS_VERBOSE="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--role-worker", "--kvstore", kvstore,
           "--steps", str(steps), "--warmup", str(warmup), "--batch", str(batch)]
    procs = [subprocess.Popen([sys.executable, "-c", "import mxnet"], env=dict(base, DMLC_ROLE=role),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for role in ("scheduler", "server")]
    workers_procs = [subprocess.Popen(cmd, env=dict(base, DMLC_ROLE="worker"), stdout=subprocess.PIPE, text=True)
                     for _ in range(workers)]
    rates = []
    try:
        for proc in workers_procs:
            out, _ = proc.communicate(timeout=timeout_s)
            rates += [json.loads(line.split(" ", 1)[1])["samples_per_sec"]
                      for line in out.splitlines() if line.startswith("MXNET_RESULT ")]
        for proc in procs:
            proc.wait(timeout=30)
    finally:
        for proc in procs + workers_procs:  # only the processes started here
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    if len(rates) != workers:
        raise RuntimeError(f"MXNet {kvstore}: {len(rates)} of {workers} workers reported")
    return {"kvstore": kvstore, "workers": workers, "samples_per_sec": sum(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kvstore", choices=("dist_sync", "dist_async"), default="dist_sync")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--role-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role_worker:
        _worker(args.kvstore, args.steps, args.warmup, args.batch)
        return
    print(json.dumps(_launch(args.kvstore, args.workers, args.steps, args.warmup, args.batch, args.timeout)))


if __name__ == "__main__":
    main()
