"""Per-step fault tolerance for data parallelism (``--min-workers M``): when a worker
dies or hangs, the others go on at the next step, and a replacement joins with the live
state of a healthy peer. Covers ``allreduce`` without compression (the other
strategies refuse ``--min-workers``; docs/resilience.md says what is missing).

The workers form an :class:`~paratrain.comm.elastic.ElasticGroup` instead of a default
process group. Each step runs through :meth:`ElasticGroup.run_step`: ``compute`` loads
this worker's slice of the step's global batch for the group as it is now (the global
batch is kept: survivors take over a missing worker's share,
:mod:`paratrain.data.elastic_sampler`), runs forward, backward and the gradient
collectives; the boundary allreduce sums the step's statistics; ``commit`` runs the
optimizer, the scheduler and the counters. A failure before the commit gives the step
up (:meth:`Trainer.abandon_step`), re-forms the group and computes it again in the new
one, so no step is applied twice and none is lost.

What a healthy peer sends a worker that is behind (or new): parameters, buffers,
optimizer and scheduler state, the step counter (which is the data position: step
``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``), the random
states and the last step's totals.
"""
from __future__ import annotations

import dataclasses

import torch

from paratrain.comm.elastic import ElasticConfig, ElasticGroup, JobFinished
from paratrain.comm.elastic_watch import wait_for_vacancy
from paratrain.comm.process_group import connect_store
from paratrain.data.elastic_sampler import ElasticBatchSampler
from paratrain.env import DistEnv
from paratrain.errors import ConfigError, PeerError
from paratrain.kvstore.allreduce import ElasticAllreduceKVStore
from paratrain.train import checkpoint as ckpt
from paratrain.train.data_parallel_strategy import DataParallelConfig, DataParallelStrategy, select_device
from paratrain.train.objective import StepResult
from paratrain.train.strategy import TrainSpec

#: How long a warm spare waits for a vacancy (the job's whole run, bounded).
SPARE_WAIT_S = 7 * 24 * 3600.0


def elastic_config(env: DistEnv, min_workers: int, unit: int = 1) -> ElasticConfig:
    """The group's settings for this job: heartbeats four times per hang bound (at
    most once a second), every wait bounded by the job's network timeout."""
    bound = env.heartbeat_timeout_s
    return ElasticConfig(min_workers=min_workers, unit=unit, dead_after_s=bound,
                         heartbeat_every_s=min(1.0, bound / 4), timeout_s=env.timeout_s)


def claim_slot(env: DistEnv) -> DistEnv:
    """This worker's environment with its slot: the launcher's rank, or, for a warm
    spare, the dead worker's slot the launcher hands it (it then rejoins a running job)."""
    if not env.spare_id:
        return env
    slot = wait_for_vacancy(connect_store(env), env.spare_id, timeout_s=SPARE_WAIT_S)
    if slot is None:
        raise JobFinished(f"spare {env.spare_id}: the job finished with no worker to replace")
    return dataclasses.replace(env, rank=slot, local_rank=slot % env.local_world_size, rejoin=True, spare_id="")


class _GroupReplica:
    """The strategy as the elastic group sees it (:class:`paratrain.comm.elastic.Replica`)."""

    def __init__(self, strategy: "ElasticDataParallelStrategy") -> None:
        self.strategy = strategy

    def committed_steps(self) -> int:
        return self.strategy.trainer.num_update

    def state_dict(self) -> dict:
        return self.strategy.live_state()

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_live_state(state)

    def use_group(self, group) -> None:
        self.strategy.use_group(group)

    def abandon_step(self) -> None:
        self.strategy.trainer.abandon_step()

    def undo_commit(self) -> None:
        raise PeerError("data-parallel members hold one state; a healthy peer always has the newest")


class ElasticDataParallelStrategy(DataParallelStrategy):
    """:class:`DataParallelStrategy` over an elastic group of ``env.world_size`` slots
    that trains on while ``elastic.min_workers`` of them live."""

    def __init__(self, config: DataParallelConfig, elastic: ElasticConfig, *, env: DistEnv | None = None) -> None:
        super().__init__(config, env=env)
        if self.config.kvstore != "allreduce" or self.config.compression is not None or self.config.sync_every:
            raise ConfigError(f"--min-workers applies to --strategy allreduce without --compression or "
                              f"--sync-every (got kvstore={self.config.kvstore!r}, "
                              f"compression={self.config.compression!r}, sync_every={self.config.sync_every!r})")
        self.elastic, self.group = elastic, None
        self._num_slots = self.env.world_size
        self._data = self._sampler = None
        self._given: tuple[int, object, int] | None = None   # (step, batch, global length) fit handed over
        self._pending: tuple[int, StepResult] | None = None  # this worker's samples and totals of the step
        self._last_totals: list[float] | None = None
        self._highest_committed = 0
        self._joined_at: int | None = None

    # -- where this worker stands: the group's view once it formed ----------------------

    data_rank = property(lambda self: self.group.rank if self._formed else self._launch_rank,
                         lambda self, rank: setattr(self, "_launch_rank", rank))
    data_world = property(lambda self: self.group.size if self._formed else self._launch_world,
                          lambda self, world: setattr(self, "_launch_world", world))
    is_logging_rank = property(lambda self: self.group.rank == 0 if self._formed else self._launch_logging,
                               lambda self, value: setattr(self, "_launch_logging", value))

    @property
    def _formed(self) -> bool:
        return self.group is not None and self.group.epoch >= 0

    # -- setup -------------------------------------------------------------------------

    def setup(self, model, spec: TrainSpec) -> None:
        self._check_amp(spec)
        if spec.amp == "fp16":
            raise ConfigError("amp='fp16' with --min-workers: the loss scaler's state is not sent to a replacement")
        # Everything is built before a spare waits for a vacancy (the first optimizer
        # imports torch._dynamo: seconds), so a dead worker's slot is taken in the time
        # of one rendezvous. The device follows the launcher's local rank of the spare.
        self.device = select_device(self.env)
        self._place(model, spec, ElasticAllreduceKVStore(self._num_slots, env=self.env))
        self.env = claim_slot(self.env)
        self.group = ElasticGroup(connect_store(self.env), slot=self.env.rank, num_slots=self._num_slots,
                                  replica=_GroupReplica(self), config=self.elastic)
        try:
            self.group.start()
        except JobFinished:
            self.close()   # goodbye to the servers, heartbeats stopped
            raise
        if self.group.history[0].kind == "rejoin":
            self._joined_at = self._highest_committed = self.trainer.num_update

    def attach_data(self, data) -> None:
        if data.steps_per_epoch is None:
            raise ConfigError("--min-workers needs a map-style dataset (a known number of steps per epoch): a "
                              "replacement finds its place in the data by the step count")
        self._data = data

    def make_sampler(self, dataset_len: int, global_batch: int, seed: int):
        self._sampler = ElasticBatchSampler(dataset_len, global_batch, lambda: (self.group.rank, self.group.size),
                                            seed)
        return self._sampler

    def joined_at_step(self) -> int | None:
        return self._joined_at

    # -- the group's replica ------------------------------------------------------------

    def live_state(self) -> dict:
        """What a healthy peer sends a member that is behind (module docstring)."""
        return {"strategy": self.state_dict(), "rng": ckpt.rng_state(), "last_totals": self._last_totals,
                "metric_names": sorted(self._metric_names)}

    def load_live_state(self, state: dict) -> None:
        self.load_state_dict(state["strategy"])
        ckpt.set_rng_state(state["rng"])
        self._last_totals, self._metric_names = state["last_totals"], set(state["metric_names"])

    def use_group(self, group) -> None:
        pg = group.pg if group is not None else None
        self.trainer.sync.set_group(pg)
        self.trainer.kvstore.set_group(pg)

    # -- one step ------------------------------------------------------------------------

    def train_step(self, batch, global_batch) -> StepResult:
        step = self.trainer.num_update
        self._given = (step, batch, global_batch)
        steps_per_epoch = self._data.steps_per_epoch
        summed = self.group.run_step(self._compute, self._commit, admit_joiners=(step + 1) % steps_per_epoch != 0)
        vector = summed.tolist() if summed is not None else self._last_totals
        return _totals_of(vector, self._metric_names)

    def _compute(self) -> torch.Tensor:
        step = self.trainer.num_update
        batch, global_len = self._batch_for(step)
        self.trainer.sync.begin_step()
        self._broadcast_buffers()
        totals, samples, loss_scale = self._forward_backward(batch, global_len)
        self.trainer.prepare_update(samples, global_batch_size=global_len, loss_scale=loss_scale,
                                    max_grad_norm=self.train_spec.max_grad_norm)
        self._metric_names |= set(totals.metrics)
        totals.metrics = {name: totals.metrics.get(name, 0.0) for name in self._metric_names}
        self._pending = (samples, totals)
        return torch.tensor(totals.to_vector(), dtype=torch.float64)

    def _batch_for(self, step: int):
        """This worker's slice of step ``step``'s global batch for the group as it is
        now: the one fit loaded, unless it was cut for another membership."""
        epoch, index = divmod(step, self._data.steps_per_epoch)
        given_step, batch, global_len = self._given
        cut = (self.group.rank, self.group.size)
        if given_step == step and self._sampler.cut_of(epoch, index) == cut:
            return batch, global_len
        return self._data.load(self._sampler.shard(epoch, index, *cut)), self._sampler.global_batch_len(index)

    def _broadcast_buffers(self) -> None:
        """Buffers (BatchNorm statistics) follow the group's rank 0 before each step,
        as DDP does; local SGD averages them with the parameters instead."""
        buffers = [b for b in self.model.buffers()]
        if not buffers or not self.trainer.sync.buffers_follow_rank0 or self.group.size == 1:
            return
        flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
        self.group.broadcast(flat, 0)
        offset = 0
        for buffer in buffers:
            buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()

    def _commit(self, summed: torch.Tensor | None) -> None:
        samples, totals = self._pending
        step = self.trainer.num_update
        self.trainer.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self._local_samples += samples
        self._last_totals = summed.tolist() if summed is not None else totals.scaled(self.group.size).to_vector()
        if step < self._highest_committed:
            self.group.count_repeated_step()
        self._highest_committed = max(self._highest_committed, step + 1)

    # -- the rest of the contract ----------------------------------------------------------

    def eval_shard(self) -> tuple[int, int]:
        """Every worker evaluates the whole held-out set: no collective outside a step,
        so a death during evaluation costs nothing."""
        return 0, 1

    def agree_on_batch(self, local_len: int) -> tuple[bool, int]:
        """Only map-style data trains here (:meth:`attach_data`): fit asks at an
        epoch's end, which every worker reaches at the same step."""
        return local_len > 0, local_len

    def job_totals(self, steps: int, samples: int, seconds: float) -> tuple[list[int], float]:
        return [steps] * self.group.size, samples / seconds if seconds else 0.0

    def summary_fields(self) -> dict:
        return self.group.fault_summary()

    def finish(self) -> None:
        self.group.finish()
        super().finish()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        super().close()


def _totals_of(vector: list[float] | None, metric_names: set[str]) -> StepResult:
    """A step's totals from the summed vector of :meth:`StepResult.to_vector`."""
    if vector is None:
        return StepResult(0.0, 0)
    template = StepResult(0.0, 0, None if vector[2] < 0 else 0, {name: 0.0 for name in metric_names})
    return template.from_vector(vector, 1)
