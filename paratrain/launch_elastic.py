"""The launcher's side of per-step fault tolerance (``--min-workers``): when a worker
dies the others are left running; the launcher says so in the store, starts a
replacement (or hands the slot to a warm spare), and kills hung workers by PID.

A worker process that exits, for any reason, is reported at once
(:meth:`~paratrain.comm.elastic_watch.ElasticWatch.report_exit`), so the survivors'
rendezvous never waits for it. One that has not beaten its heartbeat for
``heartbeat_timeout_s`` is SIGKILLed: a hang becomes a death. A worker exiting with
:data:`EXIT_BELOW_MIN_WORKERS` (its group stayed below ``--min-workers`` for the
job's timeout) ends this attempt: the caller falls back to restarting the group from
its checkpoint (``--max-restarts``), or stops.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch.distributed as dist

from paratrain.comm.elastic_watch import ElasticWatch
from paratrain.launch import POLL_S, Failure, _Child, _stop_all, describe_exit

#: The exit status of a worker whose elastic group stayed below --min-workers.
EXIT_BELOW_MIN_WORKERS = 3
#: Seconds between looks at the workers' heartbeats.
HANG_POLL_S = 0.25
#: Replacements one attempt may start, per slot of the job (crash loops end).
REPLACEMENTS_PER_SLOT = 10


@dataclass
class _Spare:
    spare_id: str
    child: _Child


class ElasticSupervisor:
    """Runs one attempt of an elastic job's local workers (and warm spares)."""

    def __init__(self, launcher, base: dict, attempt: int) -> None:
        config = launcher.config
        self.launcher, self.base, self.attempt = launcher, base, attempt
        self.first_slot = config.node_rank * config.num_workers
        self.slots = list(range(self.first_slot, self.first_slot + config.num_workers))
        store = dist.PrefixStore(f"paratrain/attempt{attempt}/", launcher.store)
        self.watch = ElasticWatch(store, config.heartbeat_timeout_s)
        self.workers: dict[int, _Child] = {}
        self.spares: list[_Spare] = []
        self.done: set[int] = set()
        self._spare_count = 0
        self._killed: set[int] = set()   # PIDs killed as hung, not yet seen exiting
        self.replacements_left = REPLACEMENTS_PER_SLOT * len(self.slots)

    def run(self) -> Failure | None:
        """Run until every slot's process finished; ``(label, how)`` when the attempt
        failed (below --min-workers, or out of replacements)."""
        for slot in self.slots:
            self._assign(slot, self.launcher._start_worker(self.base, slot - self.first_slot, self.attempt))
        for _ in range(self.launcher.config.spares):
            self._start_spare()
        next_hang_check = time.monotonic()
        try:
            while len(self.done) < len(self.slots):
                failed = self.launcher._watch_servers() or self._handle_exits()
                if failed is not None:
                    return failed
                if time.monotonic() >= next_hang_check:
                    self._kill_hung()
                    next_hang_check = time.monotonic() + HANG_POLL_S
                time.sleep(POLL_S)
            return None
        finally:
            _stop_all([*self.workers.values(), *(spare.child for spare in self.spares)])

    def _handle_exits(self) -> Failure | None:
        for slot, child in list(self.workers.items()):
            code = child.proc.poll()
            if code is None or slot in self.done:
                continue
            self.watch.report_exit(slot)
            if code == 0:
                self.done.add(slot)
                continue
            if code == EXIT_BELOW_MIN_WORKERS:
                return Failure(child.label, "found fewer than --min-workers live workers for the job's timeout", code)
            failed = self._replace(slot, describe_exit(code))
            if failed is not None:
                return failed
        for spare in [s for s in self.spares if s.child.proc.poll() is not None]:
            self.spares.remove(spare)   # a spare that ended (the job finished, or it crashed)
            if spare.child.proc.returncode != 0 and not self.watch.finished():
                self._start_spare()
        return None

    def _replace(self, slot: int, how: str) -> Failure | None:
        """The dead worker's slot gets a warm spare or a new process; the survivors go on."""
        if self.watch.finished():
            self.done.add(slot)   # nothing left to join
            return None
        if self.replacements_left < 1:
            return Failure(f"rank {slot}", f"{how}; no replacements left ({REPLACEMENTS_PER_SLOT} per worker)", 1)
        self.replacements_left -= 1
        idle = [s for s in self.spares if s.child.proc.poll() is None]
        print(f"paratrain launch: worker rank {slot} {how}; the others train on, "
              f"{'a warm spare takes' if idle else 'a new process starts for'} rank {slot}",
              file=sys.stderr, flush=True)
        if idle:
            self.spares.remove(idle[0])
            self.watch.assign_spare(idle[0].spare_id, slot)
            self._assign(slot, idle[0].child)
            self._start_spare()
        else:
            self._assign(slot, self.launcher._start_worker(self.base, slot - self.first_slot, self.attempt,
                                                           rejoin=True))
        return None

    def _assign(self, slot: int, child: _Child) -> None:
        """``child`` holds ``slot`` now; the line says which PID does (operators and
        chaos tests kill workers by PID)."""
        self.workers[slot] = child
        print(f"paratrain launch: rank {slot} runs as pid {child.proc.pid}", flush=True)

    def _kill_hung(self) -> None:
        live = [slot for slot, child in self.workers.items()
                if child.proc.poll() is None and child.proc.pid not in self._killed]
        for slot in self.watch.hung(live):
            self._killed.add(self.workers[slot].proc.pid)
            print(f"paratrain launch: worker rank {slot} sent no heartbeat for "
                  f"{self.launcher.config.heartbeat_timeout_s:.0f}s; killing it (pid {self.workers[slot].proc.pid})",
                  file=sys.stderr, flush=True)
            self.workers[slot].kill()

    def _start_spare(self) -> None:
        self._spare_count += 1
        spare_id = f"node{self.launcher.config.node_rank}-spare{self._spare_count}"
        env = dict(self.base, RANK=str(self.first_slot), LOCAL_RANK="0", PARATRAIN_ROLE="worker",
                   PARATRAIN_REJOIN="1", PARATRAIN_SPARE_ID=spare_id,
                   TORCHELASTIC_RESTART_COUNT=str(self.attempt))
        self.spares.append(_Spare(spare_id, _Child(f"spare{self._spare_count}", self.launcher.worker_argv, env)))


def run_elastic_workers(launcher, base: dict, attempt: int) -> Failure | None:
    """:meth:`Launcher._run_workers` for ``--min-workers`` jobs."""
    return ElasticSupervisor(launcher, base, attempt).run()
