"""torchft 0.2.0 as a benchmark peer: its fault-tolerant DDP (``torchft.Manager``,
``torchft.ddp.DistributedDataParallel``, ``torchft.ProcessGroupGloo`` reconfigured per
quorum) on one of paratrain's small models, with replicas SIGKILLed (by PID) on a
schedule and restarted at once, as a launcher would. Runs under torchft's own virtual
environment (build it with ``bash bench/setup_torchft_venv.sh``); never imported by
paratrain.

  bench/.venv-torchft/bin/python bench/torchft_peer.py --replicas 3 --steps 1500 --kill-at 300 900
  bench/.venv-torchft/bin/python bench/torchft_peer.py --replicas 3 --steps 300 --baseline   # plain DDP

Each replica is one process (a replica group of size 1, its own TCP store), all on
loopback; the lighthouse runs in this process. A replica draws its own batch of
``--batch-per-replica`` samples per step (torchft's data model: a missing replica's
samples are not seen, and the gradient is averaged over the replicas that took part)
and heals from a peer (``--checkpoint-transport``). A kill waits until the group runs
at full size; the run must be long enough for a replacement to start (its imports
alone take seconds), or it never joins and ``full_size_s`` is null.

Prints one JSON line: per kill, seconds from the SIGKILL to the first committed step
and to the first committed step at full size, the steps the survivors discarded
(``should_commit`` false) and ran at reduced size, and when the replacement was ready;
the steady-state step time and the parts of it torchft adds (the quorum wait not
hidden by forward, ``should_commit``); held-out accuracy and time to a target.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROCESS_START = time.time()   # before torch is imported: a replacement's start-up counts


def _build(args: argparse.Namespace):
    """This replica's model, optimizer and data (paratrain's built-ins, so the bench
    can train the same model on the same data under paratrain)."""
    import torch

    sys.path.insert(0, str(REPO))
    from paratrain.data.datasets import build_dataset
    from paratrain.models import build_model

    torch.set_num_threads(1)
    train, heldout = build_dataset(args.dataset)
    model = build_model(args.model, train.sample_shape, train.num_classes, seed=args.seed)
    return model, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9), train, heldout


def _batch(args: argparse.Namespace, train, step: int, attempt: int):
    """This replica's own batch for ``step`` (a retried step draws a new one)."""
    import torch

    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + args.replica_id * 7 + attempt)
    return train.batch(torch.randint(0, len(train), (args.batch_per_replica,), generator=gen))


def _report(kind: str, **fields) -> None:
    print(f"TORCHFT_{kind} " + json.dumps(fields), flush=True)


def _replica(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torchft import Manager
    from torchft.checkpointing.pg_transport import PGTransport
    from torchft.ddp import DistributedDataParallel
    from torchft.process_group import ProcessGroupGloo

    class FailureTolerantDDP(DistributedDataParallel):
        """torchft 0.2.0's DDP with its comm hook corrected for a failed allreduce: the
        stock hook asserts ``fut._fut`` after ``work.wait()`` returned False (the managed
        future chain is only built on success), so a peer dying during backward crashed
        every survivor here. This hook returns the bucket as it is instead; the manager
        already recorded the error, so ``should_commit`` discards the step, which is
        what torchft intends."""

        @staticmethod
        def _comm_hook(manager, bucket):
            work = manager.allreduce(bucket.buffer())
            if work.wait():
                return work.get_future()._fut
            done = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done

    model, optimizer, train, heldout = _build(args)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)   # this replica group's
    timeout = timedelta(seconds=args.timeout)
    pg = ProcessGroupGloo(timeout=timedelta(seconds=args.pg_timeout))
    transport = PGTransport(pg, timeout=timeout, device="cpu") if args.checkpoint_transport == "pg" else None
    manager = Manager(
        pg=pg, min_replica_size=args.min_replicas, checkpoint_transport=transport,
        load_state_dict=lambda state: (model.load_state_dict(state["model"]), optimizer.load_state_dict(state["optim"])),
        state_dict=lambda: {"model": model.state_dict(), "optim": optimizer.state_dict()},
        replica_id=f"replica{args.replica_id}", store_addr="127.0.0.1", store_port=store.port, rank=0, world_size=1,
        lighthouse_addr=args.lighthouse, hostname="127.0.0.1", timeout=timeout, quorum_timeout=timeout,
        connect_timeout=timeout)
    ddp = FailureTolerantDDP(manager, model)
    _report("READY", replica=args.replica_id, pid=os.getpid(), process_start=PROCESS_START, ready=time.time())
    loss_fn = nn.CrossEntropyLoss()
    attempt = 0
    while manager.current_step() < args.steps:
        tic = time.perf_counter()
        manager.start_quorum()                       # what OptimizerWrapper.zero_grad does
        optimizer.zero_grad()
        inputs, targets = _batch(args, train, manager.current_step(), attempt)
        loss = loss_fn(ddp(inputs), targets)
        before_quorum = time.perf_counter()
        manager.wait_quorum()                        # the comm hook would wait here: the quorum RPC not hidden by forward
        quorum_s = time.perf_counter() - before_quorum
        loss.backward()
        before_commit = time.perf_counter()
        committed = manager.should_commit()          # what OptimizerWrapper.step does
        commit_s = time.perf_counter() - before_commit
        if committed:
            optimizer.step()
        attempt = 0 if committed else attempt + 1
        record = {"replica": args.replica_id, "pid": os.getpid(), "step": manager.current_step(),
                  "committed": committed, "participants": manager.num_participants(), "loss": loss.item(),
                  "t": time.time(), "step_s": time.perf_counter() - tic, "should_commit_s": commit_s,
                  "quorum_wait_s": quorum_s}
        if committed and args.eval_every and manager.current_step() % args.eval_every == 0:
            with torch.no_grad():
                record["accuracy"] = float((model(heldout.inputs).argmax(1) == heldout.targets).float().mean())
        _report("STEP", **record)
    digest = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    _report("END", replica=args.replica_id, param_sum=float(digest.sum()))
    manager.shutdown(wait=False)
    os._exit(0)   # no gloo teardown: a group that saw a dead peer is not worth waiting for


def _baseline_replica(args: argparse.Namespace) -> None:
    """The same loop under plain torch DDP on gloo, for torchft's per-step overhead."""
    import torch
    import torch.distributed as dist
    from torch import nn

    model, optimizer, train, _ = _build(args)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.baseline_port}", rank=args.replica_id,
                            world_size=args.replicas, timeout=timedelta(seconds=args.timeout))
    ddp = nn.parallel.DistributedDataParallel(model)
    _report("READY", replica=args.replica_id, pid=os.getpid(), process_start=PROCESS_START, ready=time.time())
    loss_fn = nn.CrossEntropyLoss()
    for step in range(args.steps):
        tic = time.perf_counter()
        optimizer.zero_grad()
        inputs, targets = _batch(args, train, step, 0)
        loss = loss_fn(ddp(inputs), targets)
        loss.backward()
        optimizer.step()
        _report("STEP", replica=args.replica_id, pid=os.getpid(), step=step + 1, committed=True,
                participants=args.replicas, loss=loss.item(), t=time.time(), step_s=time.perf_counter() - tic,
                should_commit_s=0.0, quorum_wait_s=0.0)
    _report("END", replica=args.replica_id, param_sum=0.0)
    os._exit(0)


class _Replicas:
    """The replica processes this run started, their output lines in one queue."""

    def __init__(self, argv_for, log_dir: str | None) -> None:
        self.argv_for = argv_for
        self.log_dir = log_dir
        self.started = 0
        self.procs: dict[int, subprocess.Popen] = {}
        self.lines: queue.Queue = queue.Queue()

    def start(self, replica_id: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RUST_LOG="error")
        stderr = subprocess.DEVNULL
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            stderr = open(os.path.join(self.log_dir, f"replica{replica_id}.{self.started}.log"), "w")
        self.started += 1
        proc = subprocess.Popen(self.argv_for(replica_id), env=env, stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
        self.procs[replica_id] = proc
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            for tag in ("TORCHFT_STEP ", "TORCHFT_END ", "TORCHFT_READY "):
                if line.startswith(tag):
                    self.lines.put((tag.strip(), json.loads(line[len(tag):])))

    def kill(self, replica_id: int) -> float:
        proc = self.procs[replica_id]
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=10)
        return killed_at

    def stop_all(self) -> None:
        for proc in self.procs.values():   # only the processes this run started
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _recoveries(kills: list[dict], steps: list[dict], readies: list[dict], replicas: int) -> list[dict]:
    """Per kill: seconds to the first committed step (any size) and to the first at
    full size that began after it, the step attempts the survivors discarded in
    between, and when the replacement process had started and was ready (imports,
    torchft Manager) relative to the kill."""
    out = []
    for index, kill in enumerate(kills):
        end = kills[index + 1]["t"] if index + 1 < len(kills) else float("inf")
        after = [s for s in steps if kill["t"] <= s["t"] - s["step_s"] and s["t"] < end]
        ready = next((r for r in readies if r["replica"] == kill["replica"] and r["process_start"] >= kill["t"]), None)
        committed = [s for s in after if s["committed"]]
        full = [s for s in committed if s["participants"] == replicas]
        survivors = [s for s in after if s["replica"] != kill["replica"] and (not full or s["t"] <= full[0]["t"])]
        out.append({"killed_replica": kill["replica"], "at_step": kill["step"],
                    "first_commit_s": round(committed[0]["t"] - kill["t"], 3) if committed else None,
                    "full_size_s": round(full[0]["t"] - kill["t"], 3) if full else None,
                    "discarded_steps": len({s["step"] for s in survivors if not s["committed"]}),
                    "discarded_attempts": sum(1 for s in survivors if not s["committed"]),
                    "reduced_size_steps": len({s["step"] for s in committed if s["participants"] < replicas
                                               and (not full or s["t"] < full[0]["t"])}),
                    "replacement_ready_s": round(ready["ready"] - kill["t"], 3) if ready else None,
                    "replacement_imports_s": round(ready["ready"] - ready["process_start"], 3) if ready else None})
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("RUST_LOG", "error")   # the lighthouse logs every quorum tick at INFO
    from torchft._torchft import LighthouseServer

    if args.baseline and args.kill_at:
        raise SystemExit("--baseline (plain DDP) cannot survive kills; drop --kill-at")
    lighthouse = None if args.baseline else LighthouseServer(
        bind="127.0.0.1:0", min_replicas=args.min_replicas, join_timeout_ms=args.join_timeout_ms,
        heartbeat_timeout_ms=args.heartbeat_timeout_ms)
    common = ["--role-replica", "--model", args.model, "--dataset", args.dataset, "--replicas", str(args.replicas),
              "--steps", str(args.steps), "--min-replicas", str(args.min_replicas), "--lr", str(args.lr),
              "--batch-per-replica", str(args.batch_per_replica), "--seed", str(args.seed),
              "--timeout", str(args.timeout), "--pg-timeout", str(args.pg_timeout), "--eval-every", str(args.eval_every),
              "--checkpoint-transport", args.checkpoint_transport]
    common += ["--baseline", "--baseline-port", str(_free_port())] if args.baseline else ["--lighthouse", lighthouse.address()]
    replicas = _Replicas(lambda rid: [sys.executable, os.path.abspath(__file__), *common, "--replica-id", str(rid)],
                         args.log_dir)
    rng = random.Random(args.seed)
    kill_at, kills, steps, ends, readies = sorted(args.kill_at), [], [], {}, []
    started = time.time()
    deadline, first_end = time.monotonic() + args.wall_limit, None
    try:
        for rid in range(args.replicas):
            replicas.start(rid)
        while len(ends) < args.replicas:
            if ends and first_end is None:
                first_end = time.monotonic()
            if first_end is not None and time.monotonic() > first_end + args.end_grace:
                break   # a replacement that could not join before the others finished
            if time.monotonic() > deadline:
                raise TimeoutError(f"torchft run not finished within {args.wall_limit}s; "
                                   f"replicas ended: {sorted(ends)}; last step {steps[-1]['step'] if steps else None}")
            try:
                kind, record = replicas.lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if kind == "TORCHFT_READY":
                readies.append(record)
                continue
            if kind == "TORCHFT_END":
                ends[record["replica"]] = record
                continue
            steps.append(record)
            full_size = record["committed"] and record["participants"] == args.replicas
            if kill_at and full_size and record["step"] >= kill_at[0] and not ends:
                victim = rng.randrange(args.replicas)
                kills.append({"replica": victim, "step": record["step"], "t": replicas.kill(victim)})
                kill_at.pop(0)
                replicas.start(victim)   # the launcher's replacement, at once
    finally:
        replicas.stop_all()
        if lighthouse is not None:
            lighthouse.shutdown()
        if args.log_dir:
            with open(os.path.join(args.log_dir, "trace.jsonl"), "w") as trace:
                for record in sorted(steps + [dict(k, kill=True) for k in kills], key=lambda r: r["t"]):
                    trace.write(json.dumps(record) + "\n")
    wall = time.time() - started
    recoveries = _recoveries(kills, steps, readies, args.replicas)
    steady = [s for s in steps if s["committed"] and s["participants"] == args.replicas and s["step"] > 3
              and all(not (k["t"] - 1 < s["t"] < k["t"] + 30) for k in kills)]
    accuracy = [s for s in steps if "accuracy" in s and s["replica"] == 0]
    target_s = next((s["t"] - started for s in accuracy if args.target_accuracy and s["accuracy"] >= args.target_accuracy), None)
    full = [r["full_size_s"] for r in recoveries if r["full_size_s"] is not None]
    return {"peer": "torch DDP (no fault tolerance)" if args.baseline else "torchft", "version": "0.2.0",
            "replicas": args.replicas, "min_replicas": args.min_replicas,
            "steps": args.steps, "kills": len(kills), "recoveries": recoveries,
            "median_full_size_s": statistics.median(full) if full else None,
            "discarded_steps_per_failure": (statistics.mean(r["discarded_steps"] for r in recoveries)
                                            if recoveries else 0.0),
            "steady_step_ms": 1e3 * statistics.median(s["step_s"] for s in steady) if steady else None,
            "steady_should_commit_ms": 1e3 * statistics.median(s["should_commit_s"] for s in steady) if steady else None,
            "steady_quorum_wait_ms": 1e3 * statistics.median(s["quorum_wait_s"] for s in steady) if steady else None,
            "final_accuracy": accuracy[-1]["accuracy"] if accuracy else None,
            "time_to_target_s": target_s, "wall_s": round(wall, 3),
            "replicas_finished": len(ends),
            "replicas_identical": len({round(e["param_sum"], 6) for e in ends.values()}) == 1,
            "lighthouse": {"heartbeat_timeout_ms": args.heartbeat_timeout_ms, "join_timeout_ms": args.join_timeout_ms}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--min-replicas", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--kill-at", type=int, nargs="*", default=[], help="committed steps at which to SIGKILL a replica")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--batch-per-replica", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0, help="held-out accuracy every N steps on replica 0")
    parser.add_argument("--target-accuracy", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=60, help="torchft's manager timeout (s): quorum, commit, heal")
    parser.add_argument("--pg-timeout", type=float, default=60, help="torchft's ProcessGroupGloo timeout (s)")
    parser.add_argument("--checkpoint-transport", choices=("http", "pg"), default="http",
                        help="how a replacement gets the live state: torchft's HTTP server (Manager's default) "
                             "or PGTransport over the process group (torchft's train_ddp.py example)")
    parser.add_argument("--baseline", action="store_true", help="plain torch DDP, no torchft: the per-step overhead")
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=5000, help="lighthouse's (torchft default 5000)")
    parser.add_argument("--join-timeout-ms", type=int, default=60000, help="lighthouse's (torchft default 60000)")
    parser.add_argument("--wall-limit", type=float, default=600)
    parser.add_argument("--end-grace", type=float, default=20, help="seconds the others may run on after one finished")
    parser.add_argument("--log-dir", default=None, help="replicas' stderr and every step record (trace.jsonl) go here")
    parser.add_argument("--role-replica", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--replica-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--lighthouse", default="", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role_replica:
        (_baseline_replica if args.baseline else _replica)(args)
        return
    print(json.dumps(_run(args)))


if __name__ == "__main__":
    main()
