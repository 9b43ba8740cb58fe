"""Data parallelism as a :class:`Strategy`: every worker holds the whole model and a
:class:`~paratrain.Trainer` aggregates gradients through a KVStore (allreduce, the
parameter server, local SGD). Covers gradient accumulation, mixed precision, clipping
and LR schedules."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from paratrain.comm.process_group import (collective_device, connect_store, destroy_process_group,
                                          init_process_group)
from paratrain.data.batches import batch_len, move_to, split_batch
from paratrain.env import DistEnv, read_env
from paratrain.errors import CommTimeout, ConfigError, check_choice
from paratrain.optimizers import optimizer_name, server_optimizer_names
from paratrain.parallel.diloco import DiLoCoConfig
from paratrain.parallel.server_tables import local_parameters
from paratrain.strategies import kvstore_spec
from paratrain.train.objective import StepResult
from paratrain.train.strategy import Strategy, TrainSpec
from paratrain.train.trainer import Trainer, param_checksum

AMP_MODES = ("none", "bf16", "fp16")


@dataclass(kw_only=True)
class DataParallelConfig:
    kvstore: str = "allreduce"
    accumulate: int = 1
    compression: str | dict | None = None
    sync_every: int | None = None      # local SGD when set
    diloco: DiLoCoConfig | None = None   # DiLoCo when set (its own period and codec)
    kvstore_options: dict | None = None
    update_on_kvstore: bool | None = None   # dist_sync: False runs the optimizer on the workers

    def __post_init__(self) -> None:
        kvstore_spec(self.kvstore)
        if isinstance(self.accumulate, bool) or not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise ConfigError(f"accumulate={self.accumulate!r} must be an integer >= 1")
        if self.sync_every is not None and (not isinstance(self.sync_every, int) or self.sync_every < 1):
            raise ConfigError(f"sync_every={self.sync_every!r} must be an integer >= 1")
        if self.compression is not None:   # fail at the edge, before any process starts
            from paratrain.comm.codecs import parse_compression
            if not parse_compression(self.compression).enabled:
                self.compression = None


def select_device(env: DistEnv) -> torch.device:
    """``cuda:LOCAL_RANK`` (made current, so NCCL and allocations use it) where CUDA is
    available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device(f"cuda:{env.local_rank % torch.cuda.device_count()}")
    torch.cuda.set_device(device)
    return device


def autocast(device: torch.device, amp: str):
    """The autocast context for ``amp`` (``none``: nothing)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class DataParallelStrategy(Strategy):
    def __init__(self, config: DataParallelConfig | None = None, *, env: DistEnv | None = None, **options) -> None:
        self.config = config or DataParallelConfig(**options)
        self.env = env or read_env()
        self.name = ("diloco" if self.config.diloco is not None else
                     "local_sgd" if self.config.sync_every else self.config.kvstore)
        self.data_rank, self.data_world = self.env.rank, self.env.world_size
        self.is_logging_rank = self.env.rank == 0
        self.spec = kvstore_spec(self.config.kvstore)
        # Per-step statistics are summed across workers only where workers move in
        # lockstep; in async modes that collective would make them wait for each other.
        self._lockstep = self.spec.lockstep
        self._local_samples = 0   # samples this worker trained on (async throughput)
        self._owns_group = False  # setup created the process group: close destroys it
        self._metric_names: set[str] = set()
        self.device = torch.device("cpu")

    def setup(self, model, spec: TrainSpec) -> None:
        self._check_amp(spec)
        self.device = select_device(self.env)
        # Async workers share no process group: a dead one must not break the others,
        # and a restarted one must be able to rejoin. They meet in the store instead.
        self._owns_group = self.env.distributed and self._lockstep and init_process_group(self.env)
        self._place(model, spec, self.config.kvstore)
        self._start_together()

    @staticmethod
    def _check_amp(spec: TrainSpec) -> None:
        check_choice("amp", spec.amp, AMP_MODES)
        if spec.amp == "fp16" and not torch.cuda.is_available():
            raise ConfigError("amp='fp16' needs a GPU (dynamic loss scaling); on CPU use amp='bf16'")

    def _place(self, model, spec: TrainSpec, kvstore) -> None:
        """The model on this worker's device, and the Trainer (over ``kvstore``: a type
        name or a KVStore) and scheduler that train it."""
        self.model = model.to(self.device)
        self.model.train()
        self.train_spec, self.objective = spec, spec.objective
        self.timeline = spec.timeline
        self.trainer = Trainer(self.model, spec.optimizer, spec.optimizer_params, kvstore=kvstore,
                               compression=self.config.compression, sync_every=self.config.sync_every,
                               loss_scaler=torch.amp.GradScaler("cuda") if spec.amp == "fp16" else None,
                               kvstore_options=self.config.kvstore_options,
                               update_on_kvstore=self._update_on_kvstore(spec), timeline=spec.timeline,
                               diloco=self.config.diloco)
        self.scheduler = spec.build_scheduler(self.trainer.optimizer)

    def _update_on_kvstore(self, spec: TrainSpec) -> bool | None:
        """Under dist_sync the servers sum and the workers run the optimizer where the
        servers cannot: clipping by the global norm needs the aggregated gradient on the
        workers, and an optimizer may have no server rule."""
        if self.config.kvstore != "dist_sync" or self.config.update_on_kvstore is not None:
            return self.config.update_on_kvstore
        name = optimizer_name(spec.optimizer)
        if spec.max_grad_norm is not None or name not in server_optimizer_names():
            return False
        return None

    def _start_together(self) -> None:
        """Start-up skew between processes is not a speed difference: begin together.
        A worker rejoining a running async job does not wait."""
        if dist.is_initialized():
            dist.barrier()
        elif self.env.distributed:
            self._wait_in_store("start/arrived", "arrived", wait=not self.env.rejoin)

    def _wait_in_store(self, key: str, what: str, *, wait: bool = True, required: bool = True) -> int:
        """Count this worker in at ``key`` of the job's store; wait (bounded) until
        every worker has (``required``: else raise at the limit). Returns how many had."""
        store = connect_store(self.env)
        arrived = store.add(key, 1)
        deadline = time.monotonic() + self.env.timeout_s
        while wait and arrived < self.env.world_size:
            if time.monotonic() > deadline:
                if not required:
                    return arrived
                raise CommTimeout(f"rank {self.env.rank}: only {arrived} of {self.env.world_size} workers "
                                  f"{what} within {self.env.timeout_s}s")
            time.sleep(0.01)
            arrived = store.add(key, 0)
        return arrived

    def job_totals(self, steps: int, samples: int, seconds: float) -> tuple[list[int], float]:
        """Async: workers ran at their own pace, so each posts its real step count,
        sample count and training time to the store; the job's speed is all samples
        over the longest time. A rank's steps are those of all its incarnations; a rank
        that never posts (dead, not replaced) counts as -1 steps."""
        if self._lockstep or not self.env.distributed:
            return super().job_totals(steps, samples, seconds)
        store = connect_store(self.env)
        store.set(f"end/rank{self.env.rank}", f"{steps} {self._local_samples} {seconds}")
        deadline = time.monotonic() + self.env.timeout_s
        counts, total_samples, longest = [], 0, seconds
        for rank in range(self.env.world_size):
            key = f"end/rank{rank}"
            while not store.check([key]) and time.monotonic() < deadline:
                time.sleep(0.01)
            if not store.check([key]):
                counts.append(-1)
                continue
            _, rank_samples, rank_seconds = store.get(key).decode().split()
            counts.append(store.add(f"steps/rank{rank}", 0))
            total_samples += int(rank_samples)
            longest = max(longest, float(rank_seconds))
        return counts, total_samples / longest if longest else 0.0

    def make_sampler(self, dataset_len: int, global_batch: int, seed: int):
        if self._lockstep or not self.env.distributed:
            return super().make_sampler(dataset_len, global_batch, seed)
        from paratrain.data.dispatch import DynamicBatchSampler
        return DynamicBatchSampler(connect_store(self.env), dataset_len, global_batch, self.data_world, seed)

    def train_step(self, batch, global_batch) -> StepResult:
        totals, samples, loss_scale = self._forward_backward(batch, global_batch)
        self.trainer.step(samples, global_batch_size=global_batch, loss_scale=loss_scale,
                          max_grad_norm=self.train_spec.max_grad_norm)
        if self.scheduler is not None:
            self.scheduler.step()
        self._local_samples += samples
        self._count_step()
        # After trainer.step, not overlapped with it: a bucket holding a parameter unused
        # on one rank only is launched inside trainer.step there and during backward on
        # the others, so a collective issued in between would pair up differently per rank.
        return self._totals(totals)

    def _forward_backward(self, batch, global_batch) -> tuple[StepResult, int, float]:
        """Forward and backward over this worker's share, in ``accumulate``
        micro-batches (the last one starts the gradients' communication): this share's
        totals, its samples and the loss scale the Trainer's step must be told."""
        # The model is in training mode: setup put it there, evaluate puts it back.
        samples = batch_len(batch) if batch is not None else 0
        micro_batches = split_batch(move_to(batch, self.device), self.config.accumulate) if samples else []
        # The summed loss times a power of two near 1/global batch: bitwise the same
        # update as rescaling the gradients after communication, without that pass
        # (1.0 where a codec needs summed gradients: MXNet's 2bit threshold).
        loss_scale = self.trainer.loss_scale_for(global_batch)
        scaler, reduction = self.trainer.loss_scaler, self.objective.reduction
        totals = StepResult(0.0, 0)
        for index, micro in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with (contextlib.nullcontext() if last else self.trainer.no_sync()):
                with self._span("forward"), autocast(self.device, self.train_spec.amp):
                    result = self.objective(self.model, micro)
                with self._span("backward"):
                    summed = result.summed(reduction)   # fp16: the scaler scales, loss_scale is 1.0
                    (scaler.scale(summed) if scaler else summed * loss_scale).backward()
            totals.add(result, reduction)
        return totals, samples, loss_scale

    def _count_step(self) -> None:
        """Async workers count their steps in the job's store, so the job's totals
        include those of a worker's earlier incarnations (restarted alone, it rejoins)."""
        if not self._lockstep and self.env.distributed:
            connect_store(self.env).add(f"steps/rank{self.env.rank}", 1)

    def _totals(self, totals: StepResult) -> StepResult:
        """The step's (or evaluation's) totals over the job: summed over workers in
        lockstep; in async modes this worker's, scaled to an estimate of the job."""
        if not self._lockstep:
            return totals.scaled(self.data_world)
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return totals
        self._metric_names |= set(totals.metrics)
        totals.metrics = {name: totals.metrics.get(name, 0.0) for name in self._metric_names}
        vector = torch.tensor(totals.to_vector(), dtype=torch.float64, device=collective_device())
        dist.all_reduce(vector)
        return totals.from_vector(vector.tolist(), dist.get_world_size())

    def agree_on_batch(self, local_len: int) -> tuple[bool, int]:
        """Lockstep workers go on while every one of them has a batch; async ones alone."""
        if not self._lockstep or not (dist.is_initialized() and dist.get_world_size() > 1):
            return local_len > 0, local_len * self.data_world
        counts = torch.tensor([float(local_len > 0), float(local_len)], dtype=torch.float64,
                              device=collective_device())
        dist.all_reduce(counts)
        return int(counts[0]) == dist.get_world_size(), int(counts[1])

    def finish(self) -> None:
        """Release what others wait on. Parameter-server workers say goodbye, or
        dist_ssp/sync rounds would wait for them until they time out; async ones first
        wait (bounded) for every worker to finish and pull the final weights, so the
        job ends with one model on every rank."""
        if not self.spec.uses_servers:
            return
        # Tables that live on the servers are read by the held-out evaluation after
        # this: the worker departs (pushes no more) and says goodbye in close().
        reads_tables = bool(self.trainer.server_tables)
        if reads_tables:
            self.trainer.kvstore.depart()
        if not self._lockstep and self.env.distributed:
            # A worker that died and was not replaced never finishes: go on without it.
            self._wait_in_store("finished", "finished", required=False)
            self.trainer.pull_weights()
        if not reads_tables:
            self.trainer.kvstore.close()

    def end_epoch(self) -> None:
        self.trainer.sync.consolidate()

    def eval_shard(self) -> tuple[int, int]:
        """Lockstep workers share the held-out set; async ones (no collective to sum
        with) each evaluate all of it."""
        return (self.data_rank, self.data_world) if self._lockstep else (0, 1)

    @torch.no_grad()
    def evaluate(self, batches) -> StepResult:
        """Every worker holds the whole model: evaluate this worker's share locally,
        then sum the shares."""
        self.model.eval()
        totals = self.objective.empty_totals()
        try:
            for batch in batches:
                if batch is None:
                    continue
                with autocast(self.device, self.train_spec.amp):
                    totals.add(self.objective.evaluate(self.model, move_to(batch, self.device)),
                               self.objective.reduction)
        finally:
            self.model.train()
        return self._totals(totals) if self._lockstep else totals

    def _span(self, name: str):
        return self.timeline.span(name, "compute")

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "trainer": self.trainer.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.trainer.load_state_dict(state["trainer"])
        if self.scheduler is not None:
            if "scheduler" not in state:
                raise ConfigError("the checkpoint holds no LR scheduler state, but this run has a scheduler")
            self.scheduler.load_state_dict(state["scheduler"])

    def full_model_state(self) -> dict:
        return self.model.state_dict()

    def param_checksum(self) -> str:
        return param_checksum(local_parameters(self.model))   # a table on the servers is not here

    @property
    def bytes_sent(self) -> int:
        return self.trainer.sync.bytes_sent

    @property
    def lr(self) -> float:
        return self.trainer.learning_rate

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.optimizer

    def close(self) -> None:
        """Release the kvstore and the process group this strategy created: a gloo
        group left to the interpreter's exit can abort the process there
        ("terminate called without an active exception")."""
        self.trainer.close()
        if self._owns_group:
            destroy_process_group()
            self._owns_group = False
