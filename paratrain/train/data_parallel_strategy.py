"""Data parallelism as a :class:`Strategy`: every worker holds the whole model and a
:class:`~paratrain.Trainer` aggregates gradients through a KVStore (allreduce, the
parameter server, local SGD). Covers gradient accumulation and mixed precision."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from paratrain.comm.process_group import connect_store, destroy_process_group, init_process_group
from paratrain.env import DistEnv, read_env
from paratrain.errors import CommTimeout, ConfigError, check_choice
from paratrain.strategies import kvstore_spec
from paratrain.timeline import NULL_TIMELINE
from paratrain.train.strategy import Strategy, StepResult
from paratrain.train.trainer import Trainer, param_checksum

AMP_MODES = ("none", "bf16", "fp16")


@dataclass(kw_only=True)
class DataParallelConfig:
    kvstore: str = "allreduce"
    accumulate: int = 1
    amp: str = "none"
    compression: str | dict | None = None
    sync_every: int | None = None      # local SGD when set
    kvstore_options: dict | None = None
    update_on_kvstore: bool | None = None   # dist_sync: False runs the optimizer on the workers

    def __post_init__(self) -> None:
        kvstore_spec(self.kvstore)
        check_choice("amp", self.amp, AMP_MODES)
        if not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise ConfigError(f"accumulate={self.accumulate!r} must be an integer >= 1")
        if self.sync_every is not None and (not isinstance(self.sync_every, int) or self.sync_every < 1):
            raise ConfigError(f"sync_every={self.sync_every!r} must be an integer >= 1")
        if self.compression is not None:   # fail at the edge, before any process starts
            from paratrain.comm.codecs import parse_compression
            if parse_compression(self.compression).type == "none":
                self.compression = None
        if self.amp == "fp16" and not torch.cuda.is_available():
            raise ConfigError("amp='fp16' needs a GPU (dynamic loss scaling); on CPU use amp='bf16'")


class DataParallelStrategy(Strategy):
    def __init__(self, config: DataParallelConfig | None = None, *, env: DistEnv | None = None, **options) -> None:
        self.config = config or DataParallelConfig(**options)
        self.env = env or read_env()
        self.name = "local_sgd" if self.config.sync_every else self.config.kvstore
        self.data_rank, self.data_world = self.env.rank, self.env.world_size
        self.is_logging_rank = self.env.rank == 0
        self.spec = kvstore_spec(self.config.kvstore)
        # Per-step statistics are summed across workers only where workers move in
        # lockstep; in async modes that collective would make them wait for each other.
        self._lockstep = self.spec.lockstep
        self._local_samples = 0   # samples this worker trained on (async throughput)
        self._owns_group = False  # setup created the process group: close destroys it
        self.device = torch.device(f"cuda:{self.env.local_rank}" if torch.cuda.is_available() else "cpu")

    def setup(self, model, optimizer, optimizer_params, loss_fn, *, timeline=NULL_TIMELINE) -> None:
        # Async workers share no process group: a dead one must not break the others,
        # and a restarted one must be able to rejoin. They meet in the store instead.
        self._owns_group = self.env.distributed and self._lockstep and init_process_group(self.env)
        self.model = model.to(self.device)
        self.model.train()
        self.loss_fn = loss_fn
        scaler = torch.amp.GradScaler("cuda") if self.config.amp == "fp16" else None
        self.trainer = Trainer(self.model, optimizer, optimizer_params, kvstore=self.config.kvstore,
                               compression=self.config.compression, sync_every=self.config.sync_every,
                               loss_scaler=scaler, kvstore_options=self.config.kvstore_options,
                               update_on_kvstore=self.config.update_on_kvstore, timeline=timeline)
        self.timeline = timeline
        self._start_together()

    def _start_together(self) -> None:
        """Start-up skew between processes is not a speed difference: begin together.
        A worker rejoining a running async job does not wait."""
        if dist.is_initialized():
            dist.barrier()
        elif self.env.distributed:
            store = connect_store(self.env)
            arrived = store.add("start/arrived", 1)
            deadline = time.monotonic() + self.env.timeout_s
            while arrived < self.env.world_size and not self.env.rejoin:
                if time.monotonic() > deadline:
                    raise CommTimeout(f"rank {self.env.rank}: only {arrived} of {self.env.world_size} workers "
                                      f"arrived within {self.env.timeout_s}s")
                time.sleep(0.01)
                arrived = store.add("start/arrived", 0)

    def job_totals(self, steps: int, samples: int, seconds: float) -> tuple[list[int], float]:
        """Async: workers ran at their own pace, so each posts its real step count,
        sample count and training time to the store; the job's speed is all samples
        over the longest time. A rank that never posts (dead) counts as -1 steps."""
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
            rank_steps, rank_samples, rank_seconds = store.get(key).decode().split()
            counts.append(int(rank_steps))
            total_samples += int(rank_samples)
            longest = max(longest, float(rank_seconds))
        return counts, total_samples / longest if longest else 0.0
    def make_sampler(self, dataset_len: int, global_batch: int, seed: int):
        if self._lockstep or not self.env.distributed:
            return super().make_sampler(dataset_len, global_batch, seed)
        from paratrain.data.dispatch import DynamicBatchSampler
        return DynamicBatchSampler(connect_store(self.env), dataset_len, global_batch, self.data_world, seed)

    def _autocast(self):
        if self.config.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, inputs, targets, global_batch) -> StepResult:
        # The model is in training mode: setup put it there, evaluate puts it back.
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        samples = inputs.shape[0]
        if self.config.accumulate == 1 or not samples:
            micro_batches = [(inputs, targets)] if samples else []
        else:
            micro_batches = list(zip(inputs.chunk(self.config.accumulate), targets.chunk(self.config.accumulate)))
        # The summed loss times a power of two near 1/global batch: bitwise the same
        # update as rescaling the gradients after communication, without that pass
        # (1.0 where a codec needs summed gradients: MXNet's 2bit threshold).
        loss_scale = self.trainer.loss_scale_for(global_batch)
        loss_sum, correct = 0.0, 0
        for index, (x, y) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with (contextlib.nullcontext() if last else self.trainer.no_sync()):
                with self._span("forward"), self._autocast():
                    output = self.model(x)
                    loss = self.loss_fn(output.float(), y)
                with self._span("backward"):
                    scaler = self.trainer.loss_scaler   # fp16: then loss_scale is 1.0
                    (scaler.scale(loss) if scaler else loss * loss_scale).backward()
            loss_sum += loss.item()
            correct += int((output.argmax(1) == y).sum())
        self.trainer.step(samples, global_batch_size=global_batch, loss_scale=loss_scale)
        self._local_samples += samples
        # After trainer.step, not overlapped with it: a bucket holding a parameter unused
        # on one rank only is launched inside trainer.step there and during backward on
        # the others, so a collective issued in between would pair up differently per rank.
        return self._totals(loss_sum, correct, samples, reduce=self._lockstep)

    def _totals(self, loss_sum: float, correct: int, samples: int, reduce: bool) -> StepResult:
        if reduce and dist.is_initialized() and dist.get_world_size() > 1:
            stats = torch.tensor([loss_sum, float(correct), float(samples)], dtype=torch.float64)
            dist.all_reduce(stats)
            loss_sum, correct, samples = stats[0].item(), int(stats[1]), int(stats[2])
        elif not reduce:   # async: this worker's view, scaled to an estimate of the whole job
            return StepResult(loss_sum * self.data_world, correct * self.data_world, samples * self.data_world)
        return StepResult(loss_sum, correct, samples)

    def finish(self) -> None:
        # A worker whose batch queue ran dry must tell the servers, or dist_ssp/sync
        # rounds would wait for it until they time out.
        if self.spec.uses_servers:
            self.trainer.kvstore.close()

    def end_epoch(self) -> None:
        self.trainer.sync.consolidate()

    @torch.no_grad()
    def evaluate(self, inputs, targets) -> StepResult:
        """Every worker holds the whole model: evaluate locally, no communication."""
        self.model.eval()
        try:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self._autocast():
                output = self.model(inputs)
            loss = self.loss_fn(output.float(), targets).item()
            return StepResult(loss, int((output.argmax(1) == targets).sum()), len(targets))
        finally:
            self.model.train()

    def _span(self, name: str):
        return self.timeline.span(name, "compute")

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "trainer": self.trainer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.trainer.load_state_dict(state["trainer"])

    def full_model_state(self) -> dict:
        return self.model.state_dict()

    def param_checksum(self) -> str:
        return param_checksum(self.model.parameters())

    @property
    def bytes_sent(self) -> int:
        return self.trainer.sync.bytes_sent

    @property
    def lr(self) -> float:
        return self.trainer.learning_rate

    def close(self) -> None:
        """Release the kvstore and the process group this strategy created: a gloo
        group left to the interpreter's exit can abort the process there
        ("terminate called without an active exception")."""
        self.trainer.close()
        if self._owns_group:
            destroy_process_group()
            self._owns_group = False
