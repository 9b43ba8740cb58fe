"""A small elastic data-parallel job for the tests of :mod:`paratrain.comm.elastic`:
spawned workers train a linear model with momentum SGD through an ElasticGroup, and
:class:`ElasticJob` plays the launcher (hosts the store, kills by PID, reports exits,
starts replacements or hands slots to warm spares, kills hung workers).

Run as a script it measures recovery: ``python tests/elastic_harness.py --runs 3``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue as queue_module
import random
import signal
import socket
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple
from datetime import timedelta

import torch

NUM_SAMPLES, NUM_FEATURES, GLOBAL_BATCH = 480, 8, 24
FAIL_POINTS = ("before_allreduce", "after_allreduce", "before_commit", "after_commit")


class StepEvent(NamedTuple):
    """A worker committed a step: what it reports to the harness."""

    slot: int
    incarnation: int
    step: int           # committed steps after it
    size: int           # the group the step was computed in
    epoch: int
    t: float
    samples: int        # summed over the group: the global batch when nothing was lost
    checksum: int       # of the parameters after the step


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    inputs = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=gen)
    true_weight = torch.randn(NUM_FEATURES, 1, generator=gen)
    return inputs, inputs @ true_weight + 0.1 * torch.randn(NUM_SAMPLES, 1, generator=gen)


def global_batch(step: int) -> torch.Tensor:
    """Sample indices of global batch ``step``: a fresh permutation every epoch."""
    per_epoch = NUM_SAMPLES // GLOBAL_BATCH
    order = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(1000 + step // per_epoch))
    first = (step % per_epoch) * GLOBAL_BATCH
    return order[first:first + GLOBAL_BATCH]


class LinearReplica:
    """The state an elastic group keeps identical: model, optimizer, committed steps."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(NUM_FEATURES, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.02, momentum=0.9)
        self.step = 0
        self.loads: list[tuple[int, int]] = []   # (steps before, steps after) of each state received

    def committed_steps(self) -> int:
        return self.step

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.loads.append((self.step, state["step"]))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]

    def use_group(self, group) -> None:
        """The harness's collectives go through the group itself: nothing to rebind."""

    def abandon_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def undo_commit(self) -> None:
        raise AssertionError("data-parallel members hold one state: nobody ever undoes a step")

    def flat_params(self) -> list[float]:
        return torch.cat([p.detach().flatten() for p in self.model.parameters()]).tolist()

    def checksum(self) -> int:
        """CRC of the parameters' bytes: equal on two workers only if bitwise equal."""
        return zlib.crc32(torch.cat([p.detach().flatten() for p in self.model.parameters()]).numpy().tobytes())


def _maybe_fail(options: dict, slot: int, incarnation: int, step: int, point: str) -> None:
    """The deterministic failure injector: ``options["fail_at"]`` lists
    ``[slot, incarnation, step, point]``, where the process SIGKILLs itself."""
    if [slot, incarnation, step, point] in options.get("fail_at", []):
        os.kill(os.getpid(), signal.SIGKILL)


def worker_main(slot: int | None, num_slots: int, port: int, events, options: dict, spare_id: str | None = None) -> None:
    """One worker process (or a warm spare, which first waits for a vacant slot)."""
    from paratrain.comm.elastic import ElasticConfig, ElasticGroup, JobFinished
    from paratrain.comm.elastic_watch import wait_for_vacancy
    from paratrain.data.sampler import shard_bounds

    torch.set_num_threads(1)
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                                       timeout=timedelta(seconds=options.get("store_timeout_s", 30)))
    config = ElasticConfig(**options["elastic"])
    inputs, targets = regression_data()
    replica = LinearReplica()
    if spare_id is not None:
        events.put(("spare_ready", spare_id, os.getpid(), time.time()))
        slot = wait_for_vacancy(store, spare_id, timeout_s=options["job_timeout_s"])
        if slot is None:   # training ended with no vacancy: nothing to report
            events.close()
            events.join_thread()
            os._exit(0)
    group = ElasticGroup(store, slot=slot, num_slots=num_slots, replica=replica, config=config)
    events.put(("started", slot, group.incarnation, os.getpid(), time.time()))
    try:
        group.start()
    except JobFinished:
        events.put(("too_late", slot, group.incarnation, os.getpid(), time.time()))
        events.close()
        events.join_thread()
        os._exit(0)
    committed: list[int] = []
    computed_in: dict = {}   # the group a committed step was computed in (a join may follow it)

    def compute() -> torch.Tensor:
        step = replica.step
        replica.optimizer.zero_grad(set_to_none=False)
        start, end = shard_bounds(GLOBAL_BATCH, group.rank, group.size)
        batch = global_batch(step)[start:end]
        loss = ((replica.model(inputs[batch]) - targets[batch]) ** 2).sum()
        loss.backward()
        time.sleep(options["step_delay_s"] if group.size == num_slots else options["degraded_delay_s"])
        grads = [p.grad for p in replica.model.parameters()]
        flat = torch.cat([g.flatten() for g in grads])
        _maybe_fail(options, slot, group.incarnation, step, "before_allreduce")
        group.all_reduce(flat)
        _maybe_fail(options, slot, group.incarnation, step, "after_allreduce")
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad) / GLOBAL_BATCH)
            offset += grad.numel()
        return torch.tensor([loss.item(), float(end - start)], dtype=torch.float64)

    def commit(_summed) -> None:
        _maybe_fail(options, slot, group.incarnation, replica.step, "before_commit")
        replica.optimizer.step()
        replica.step += 1
        committed.append(replica.step)
        computed_in.update(size=group.size, epoch=group.epoch)
        _maybe_fail(options, slot, group.incarnation, replica.step - 1, "after_commit")

    while replica.step < options["steps"]:
        summed = group.run_step(compute, commit)
        if replica.step == options["steps"]:
            group.finish()
        events.put(("step", *StepEvent(slot, group.incarnation, replica.step, computed_in["size"],
                                       computed_in["epoch"], time.time(), int(summed[1]), replica.checksum())))
    events.put(("done", slot, group.incarnation, os.getpid(), replica.flat_params(), committed, replica.loads,
                [vars(r) for r in group.history]))
    events.close()
    events.join_thread()
    group.close()
    os._exit(0)   # no teardown of gloo groups released from daemon threads


@dataclass
class _Process:
    proc: multiprocessing.Process
    slot: int | None
    spare_id: str | None = None
    exit_reported: bool = False
    killed: bool = False


@dataclass
class JobResult:
    """What a run of :class:`ElasticJob` saw."""

    done: dict = field(default_factory=dict)        # slot -> the final report of the process that finished it
    steps: list = field(default_factory=list)       # every StepEvent, in order of arrival
    kills: list = field(default_factory=list)       # {"slot", "signal", "t", "epoch", "step"}
    hung_killed: list = field(default_factory=list)
    started: list = field(default_factory=list)
    too_late: list = field(default_factory=list)    # replacements that came after training ended

    def recovery(self, kill: dict, num_slots: int) -> dict:
        """Seconds from ``kill`` to the first step committed in a later epoch (the
        survivors trained on), to the replacement's ElasticGroup (its process start,
        imports and model build, or a spare's claim), and to the first step at full
        size again."""
        later = [e for e in self.steps if e.t > kill["t"] and e.epoch > kill["epoch"]]
        full = [e for e in later if e.size == num_slots]
        started = [e for e in self.started if e[1] == kill["slot"] and e[4] > kill["t"]]
        return {"slot": kill["slot"], "signal": kill["signal"], "at_step": kill["step"],
                "first_step_s": round(later[0].t - kill["t"], 3) if later else None,
                "replacement_started_s": round(started[0][4] - kill["t"], 3) if started else None,
                "full_size_s": round(full[0].t - kill["t"], 3) if full else None}


class ElasticJob:
    """The launcher's role for one elastic job on loopback (kills only its own PIDs)."""

    def __init__(self, num_slots: int, options: dict, *, spares: int = 0) -> None:
        from paratrain.comm.elastic import ElasticConfig
        from paratrain.comm.elastic_watch import ElasticWatch

        self.num_slots, self.options, self.spares_wanted = num_slots, options, spares
        self.port = free_port()
        self.store = torch.distributed.TCPStore("127.0.0.1", self.port, is_master=True, wait_for_workers=False,
                                                timeout=timedelta(seconds=30))
        self.watch = ElasticWatch(self.store, ElasticConfig(**options["elastic"]).dead_after_s)
        self.ctx = multiprocessing.get_context("spawn")
        self.events = self.ctx.Queue()
        self.processes: list[_Process] = []
        self._spare_count = 0

    def _start(self, slot: int | None, spare_id: str | None = None) -> None:
        proc = self.ctx.Process(target=worker_main, daemon=True,
                                args=(slot, self.num_slots, self.port, self.events, self.options, spare_id))
        proc.start()
        self.processes.append(_Process(proc, slot, spare_id))

    def _start_spare(self) -> None:
        self._spare_count += 1
        self._start(None, f"spare{self._spare_count}")

    def _live(self, slot: int) -> _Process | None:
        return next((p for p in self.processes if p.slot == slot and p.proc.exitcode is None and not p.killed), None)

    def run(self, kill_plan: list[dict], rng: random.Random) -> JobResult:
        """``kill_plan``: [{"step": s, "signal": "KILL"|"STOP"}] in order; a random live
        worker gets the signal once a worker committed step s or later at full size."""
        result, plan = JobResult(), list(kill_plan)
        for slot in range(self.num_slots):
            self._start(slot)
        for _ in range(self.spares_wanted):
            self._start_spare()
        deadline = time.monotonic() + self.options["job_timeout_s"]
        newest_step, newest_epoch = 0, -1
        try:
            while len(result.done) + len({e[1] for e in result.too_late} - set(result.done)) < self.num_slots:
                if time.monotonic() > deadline:
                    processes = [(p.slot, p.spare_id, p.proc.pid, p.proc.exitcode) for p in self.processes]
                    raise TimeoutError(f"elastic job not done within {self.options['job_timeout_s']}s: done "
                                       f"{sorted(result.done)}, newest step {newest_step}, kills {result.kills}, "
                                       f"processes (slot, spare, pid, exit) {processes}, started {result.started}, "
                                       f"last steps {result.steps[-4:]}, now {time.time()}")
                self._drain(result)
                if result.steps:
                    newest_step = max(newest_step, result.steps[-1].step)
                    newest_epoch = max(newest_epoch, result.steps[-1].epoch)
                if plan and newest_step >= plan[0]["step"] and result.steps[-1].size == self.num_slots:
                    self._signal(plan.pop(0), rng, result, newest_epoch, newest_step)
                self._handle_exits(result)
                for slot in self.watch.hung([s for s in range(self.num_slots) if self._live(s)]):
                    hung = self._live(slot)
                    os.kill(hung.proc.pid, signal.SIGKILL)   # the hang becomes a death
                    hung.killed = True
                    result.hung_killed.append({"slot": slot, "t": time.time()})
        finally:
            for process in self.processes:
                if process.proc.exitcode is None:
                    os.kill(process.proc.pid, signal.SIGKILL)
                    process.proc.join(5)
        return result

    def _drain(self, result: JobResult) -> None:
        try:
            while True:
                event = self.events.get(timeout=0.02)
                if event[0] == "step":
                    result.steps.append(StepEvent(*event[1:]))
                elif event[0] == "done":
                    result.done[event[1]] = {"incarnation": event[2], "params": event[4], "committed": event[5],
                                             "loads": event[6], "history": event[7]}
                elif event[0] == "started":
                    result.started.append(event)
                elif event[0] == "too_late":
                    result.too_late.append(event)
        except queue_module.Empty:
            pass

    def _signal(self, kill: dict, rng: random.Random, result: JobResult, epoch: int, step: int) -> None:
        candidates = [p for p in self.processes if p.slot is not None and p.proc.exitcode is None
                      and p.slot not in result.done]
        victim = rng.choice(candidates)
        time.sleep(rng.uniform(0, kill.get("jitter_s", 0.0)))   # land anywhere inside a step
        os.kill(victim.proc.pid, signal.SIGKILL if kill["signal"] == "KILL" else signal.SIGSTOP)
        result.kills.append({"slot": victim.slot, "signal": kill["signal"], "t": time.time(), "epoch": epoch, "step": step})

    def _handle_exits(self, result: JobResult) -> None:
        for process in list(self.processes):
            code = process.proc.exitcode
            if code is None or process.exit_reported or process.slot is None:
                continue
            process.exit_reported = True
            if code == 0:
                continue
            self.watch.report_exit(process.slot)
            spare = next((p for p in self.processes if p.spare_id and p.slot is None and p.proc.exitcode is None), None)
            if spare is not None:
                spare.slot = process.slot
                self.watch.assign_spare(spare.spare_id, process.slot)
                self._start_spare()
            else:
                self._start(process.slot)


def default_options(**overrides) -> dict:
    options = {"steps": 150, "step_delay_s": 0.01, "degraded_delay_s": 0.4, "job_timeout_s": 200,
               "elastic": {"min_workers": 2, "timeout_s": 30.0, "dead_after_s": 4.0, "heartbeat_every_s": 0.5}}
    for key, value in overrides.items():
        if key == "elastic":
            options["elastic"] = {**options["elastic"], **value}
        else:
            options[key] = value
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description="median recovery of the elastic prototype (no pacing: every "
                                                 "step sleeps 10 ms, degraded or not, for 1000 steps)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--spares", type=int, default=0)
    parser.add_argument("--signal", choices=("KILL", "STOP"), default="KILL")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    figures = []
    for run in range(args.runs):
        rng = random.Random(args.seed + run)
        job = ElasticJob(3, default_options(steps=1000, degraded_delay_s=0.01, job_timeout_s=300), spares=args.spares)
        result = job.run([{"step": rng.randrange(20, 40), "signal": args.signal, "jitter_s": 0.01}], rng)
        figures.append(result.recovery(result.kills[0], 3))
    full = [f["full_size_s"] for f in figures if f["full_size_s"] is not None]
    print(json.dumps({"runs": figures, "median_full_size_s": statistics.median(full) if full else None,
                      "median_first_step_s": statistics.median(f["first_step_s"] for f in figures)}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
