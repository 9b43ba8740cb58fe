"""Pipeline and hybrid parallelism as a :class:`Strategy`.

The model is cut into S stages, one per process: an ``nn.Sequential`` into runs of its
layers, any other module by torch's tracer at named modules
(:mod:`paratrain.parallel.traced_split`). Each global
batch's share is split into M micro-batches that flow forward stage by stage, and
their gradients flow back, in the order a schedule (GPipe or 1F1B) gives each stage.
With ``replicas=D`` the job is a D x S mesh and each stage's gradients are summed
over its D replicas before every stage steps its own optimizer.

Where things live: the cut and the schedules are pure functions in
:mod:`paratrain.parallel.pipeline`; activations travel over
:mod:`paratrain.parallel.p2p`; the mesh and the replica allreduce are in
:mod:`paratrain.parallel.hybrid`; one stage's runtime is
:mod:`paratrain.parallel.stage_runner`. This file places the model and drives them.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from paratrain.comm.process_group import collective_device, connect_store, init_process_group
from paratrain.env import DistEnv, read_env
from paratrain.errors import ConfigError, check_choice
from paratrain.parallel.hybrid import StageReplicaSync, TiedGradientSum, build_mesh, new_stage_groups
from paratrain.comm.security import JobKeys
from paratrain.parallel.p2p import TRANSPORTS, open_channel
from paratrain.parallel.pipeline import (BALANCE_MODES, SCHEDULES, build_schedule, build_stage_module,
                                         check_stage_count, resolve_partition, split_by_counts)
from paratrain.parallel.stage_runner import StageRunner, StepTiming
from paratrain.parallel.traced_split import TracedSplit, check_split_points, parse_split_points, trace_stages
from paratrain.data.batches import move_to, split_batch
from paratrain.train.data_parallel_strategy import select_device
from paratrain.train.objective import StepResult
from paratrain.train.strategy import Strategy, TrainSpec

# Strategies built in one process get distinct store keys for their p2p links; every
# rank builds them in the same order, so a local counter agrees across ranks.
_SESSIONS = itertools.count()


class PipelineStrategy(Strategy):
    """Pipeline (``replicas=1``) or hybrid (``replicas=D``) parallelism.

    ``stages``: S processes per replica; ``micro_batches``: M per step, must divide
    each replica's batch; ``schedule``: ``gpipe`` or ``1f1b``; ``balance``: how to
    cut the model (see :func:`paratrain.parallel.pipeline.resolve_partition`);
    ``transport``: ``zmq`` or ``gloo`` for activations; ``sample_input``: a batch to
    time layers on for ``balance="time"``. Needs exactly S*D processes.

    A model that is not an ``nn.Sequential`` is traced (``example_input``: one batch of
    its input, needed then) and cut at ``split_points``, qualified module names that
    each start a stage (default: balanced over its repeated blocks). The stages' tied
    parameters (an embedding shared with the head) have their copies' gradients summed
    before clipping, and counted once in the norm.
    """

    def __init__(self, *, stages: int, micro_batches: int, schedule: str = "1f1b", replicas: int = 1,
                 balance="params", transport: str = "zmq", sample_input: torch.Tensor | None = None,
                 split_points=None, example_input: torch.Tensor | None = None,
                 env: DistEnv | None = None) -> None:
        self.env = env or read_env()
        if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
            raise ConfigError(f"micro_batches={micro_batches!r} must be an integer >= 1")
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("transport", transport, TRANSPORTS)
        if isinstance(balance, str):
            check_choice("balance", balance, BALANCE_MODES)
        if balance == "time" and sample_input is None:   # checked on every rank, before rank 0 times
            raise ConfigError("balance='time' needs sample_input, a batch to time the layers on")
        self.mesh = build_mesh(stages, replicas, self.env.rank, self.env.world_size)
        self.micro_batches, self.schedule, self.balance = micro_batches, schedule, balance
        self.transport, self.sample_input = transport, sample_input
        self.split_points = parse_split_points(split_points) if isinstance(split_points, str) or \
            split_points is None else list(split_points)
        self.example_input = example_input
        self.split: TracedSplit | None = None   # set in setup for a traced model
        self.tied = None
        self.name = "hybrid" if replicas > 1 else "pipeline"
        self.stage = self.mesh.stage
        self.data_rank, self.data_world = self.mesh.replica, replicas
        self.is_logging_rank = self.env.rank == 0
        self.last_timing: StepTiming | None = None
        self._channels: list = []
        self._owns_group = False
        self._batch_size: int | None = None   # the configured global batch, once validated

    def validate(self, global_batch: int, world_size: int | None = None, model_factory=None) -> None:
        """Raise :class:`ConfigError` unless ``global_batch`` splits into D replica
        shares of M equal micro-batches (and, if given, ``world_size`` is S*D and
        ``model_factory()`` can be cut: an ``nn.Sequential`` with at least S layers, or a
        module with the split points named). Starts nothing.

        Call it with the configured batch size before training; ``train_step`` calls
        it on the first step otherwise. Later, shorter batches (an epoch's tail) are
        then split into nearly equal micro-batches instead of being rejected.
        """
        if world_size is not None:
            build_mesh(self.mesh.stages, self.mesh.replicas, 0, world_size)
        if model_factory is not None:
            model = model_factory()
            if isinstance(model, torch.nn.Sequential):
                resolve_partition(model, self.mesh.stages, "uniform")   # layer count only
            else:
                check_split_points(model, self.split_points, self.mesh.stages)
        per_step = self.mesh.replicas * self.micro_batches
        if not isinstance(global_batch, int) or global_batch < 1 or global_batch % per_step:
            raise ConfigError(
                f"batch size {global_batch!r} must be a positive multiple of replicas={self.mesh.replicas} "
                f"x micro_batches={self.micro_batches} = {per_step}, so that the micro-batches divide it")
        self._batch_size = global_batch

    # ----------------------------------------------------------------- setup

    def setup(self, model, spec: TrainSpec) -> None:
        from paratrain.optimizers import build_worker_optimizer
        if spec.objective.uses_model_directly:
            raise ConfigError("step_fn(model, batch) needs the whole model, which a pipeline splits over processes; "
                              "give a pipeline loss_fn(outputs, batch) (its batches are (inputs, targets))")
        if spec.amp != "none":
            raise ConfigError(f"amp={spec.amp!r} is not available for pipeline stages; use amp='none'")
        traced = not isinstance(model, torch.nn.Sequential)
        if traced:
            if self.example_input is None:
                raise ConfigError(f"a pipeline over {type(model).__name__} (not an nn.Sequential) traces it: "
                                  "give example_input, one batch of the model's input")
            check_split_points(model, self.split_points, self.mesh.stages)
        else:
            check_stage_count(len(model), self.mesh.stages)   # before any process waits on a peer
        if self.env.distributed:
            self._owns_group = init_process_group(self.env)
        if traced:
            self.split = trace_stages(model, self.example_input, self.split_points, self.mesh.stages)
            self.counts = list(self.split.split_points)
            stage_modules, params = self.split.stages, self.split.trainable(self.stage)
            eval_module = self.split.eval_stages[self.stage]
        else:
            self.counts = self._agree_on_partition(model)
            stage_modules = [build_stage_module(model, b) for b in split_by_counts(self.counts)]
            params, eval_module = list(stage_modules[self.stage].parameters()), None
        # Shapes and dtypes of every stage's entries, to decode gathered bytes later.
        self._layouts = [[(k, v.shape, v.dtype) for k, v in m.state_dict().items()] for m in stage_modules]
        self.device = select_device(self.env)
        self.module = stage_modules[self.stage].to(self.device)
        if eval_module is not None:
            eval_module.to(self.device)
        for name, param in self.module.named_parameters():   # copies of tied weights the graph never uses
            if traced and name in self.split.unused[self.stage]:
                param.requires_grad_(False)
        self.objective, self.max_grad_norm = spec.objective, spec.max_grad_norm
        group = new_stage_groups(self.mesh) if self.env.distributed else None
        self.sync = StageReplicaSync(group, self.mesh.replicas)
        self.sync.attach(params)
        self.tied = TiedGradientSum(self.mesh, self.split.tied if traced else [], self.module) \
            if self.env.distributed else None
        # A stage may hold only parameter-free layers (a ReLU of its own): it just relays.
        self.stage_optimizer = build_worker_optimizer(params, spec.optimizer, spec.optimizer_params) \
            if params else None
        self.scheduler = spec.build_scheduler(self.stage_optimizer) if self.stage_optimizer is not None else None
        self._lr = float(dict(spec.optimizer_params).get("lr", 0.0))
        previous, following = self._open_links()
        self.runner = StageRunner(self.module, self.stage, self.mesh.stages, previous, following, self._score,
                                  timeline=spec.timeline, device=self.device, eval_module=eval_module,
                                  input_is_int=self.split.input_is_int[self.stage] if traced else None)

    def _score(self, outputs, micro_batch):
        """The last stage's loss: summed over the micro-batch (backward), and its report."""
        result = self.objective.loss_of(outputs, micro_batch)
        return result.summed(self.objective.reduction), result

    def _agree_on_partition(self, model) -> list[int]:
        sample = self.sample_input
        if self.balance != "time":
            return resolve_partition(model, self.mesh.stages, self.balance)
        # Timings differ between processes: rank 0 measures, everyone uses its cut.
        counts = torch.zeros(self.mesh.stages, dtype=torch.int64, device=collective_device())
        if self.env.rank == 0:
            counts[:] = torch.tensor(resolve_partition(model, self.mesh.stages, "time", sample_input=sample))
        if self.env.distributed:
            dist.broadcast(counts, src=0)
        return counts.tolist()

    def _open_links(self):
        session = next(_SESSIONS)
        store = connect_store(self.env) if self.transport == "zmq" and self.env.distributed else None
        # With the job's secret (paratrain's launcher gives one) links authenticate and
        # encrypt: an address rewritten in the store leads nowhere.
        keys = JobKeys(self.env.secret) if self.env.secret and self.transport != "gloo" else None
        links = []
        # The link to the previous stage first: its binder publishes before waiting,
        # so opening in stage order cannot deadlock.
        for peer in (self.mesh.previous_rank, self.mesh.next_rank):
            if peer is None:
                links.append(None)
                continue
            low, high = sorted((self.env.rank, peer))
            key = f"pipeline/{session}/link{low}-{high}"
            links.append(open_channel(self.transport, store, key, rank=self.env.rank, peer=peer,
                                      bind_addr=self.env.bind_addr, timeout_s=self.env.timeout_s, keys=keys))
        self._channels = [c for c in links if c is not None]
        return links

    # ------------------------------------------------------------------ steps

    def train_step(self, batch, global_batch) -> StepResult:
        if self._batch_size is None:
            self.validate(global_batch)
        elif global_batch > self._batch_size:
            raise ConfigError(f"global batch {global_batch} is larger than the validated batch size "
                              f"{self._batch_size}; validate the new size first")
        self.module.train()
        if self.stage_optimizer is not None:
            self.stage_optimizer.zero_grad(set_to_none=True)
        micro_batches = self._micro_batches(batch)
        reports = []
        if micro_batches:   # an epoch's tail may leave a replica nothing: it still joins the allreduce
            actions = build_schedule(self.schedule, self.mesh.stages, len(micro_batches), self.stage)
            reports, self.last_timing = self.runner.run(actions, [mb[0] for mb in micro_batches], micro_batches)
        with self.runner.span("allreduce", "comm"):
            self.sync.reduce(1.0 / global_batch)   # the losses are summed: normalise by the global batch
            if self.tied is not None:
                self.tied.reduce()   # each copy of a tied weight gets the sum of all copies' gradients
        if self.max_grad_norm is not None:
            self._clip_by_global_norm(self.max_grad_norm)
        if self.stage_optimizer is not None:
            with self.runner.span("optimizer", "compute"):
                self.stage_optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        return self._share_totals(reports)

    def _clip_by_global_norm(self, max_norm: float) -> None:
        """Clip every stage's gradients by the norm of the whole model's gradient, as
        ``clip_grad_norm_`` would in one process: the stages' squared norms are summed
        (over one replica's stages: the replicas' gradients are equal after the sum). A
        tied weight counts once: only its first stage's copy enters the norm."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        copies = self.tied.duplicate_ids() if self.tied is not None else set()
        squared = sum(float(torch.linalg.vector_norm(p.grad)) ** 2 for p in self.module.parameters()
                      if p.grad is not None and id(p) not in copies)
        total = torch.tensor([squared / self.mesh.replicas], dtype=torch.float64, device=collective_device())
        if self.env.distributed:
            dist.all_reduce(total)
        coefficient = min(1.0, max_norm / (float(total[0]) ** 0.5 + 1e-6))
        if coefficient < 1.0:
            torch._foreach_mul_(grads, coefficient)

    def _micro_batches(self, batch) -> list:
        """M equal micro-batches of this replica's ``(inputs, targets)``; for a short
        batch, at most M nearly equal non-empty ones. Every stage of a replica holds the
        same slice, so all cut alike."""
        if batch is None:
            return []
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"pipeline batches are (inputs, targets) pairs; got {type(batch).__name__}")
        micro_batches = split_batch(move_to(batch, self.device), self.micro_batches)
        fixed = self.split.fixed_batch if self.split is not None else None
        if fixed is not None and any(len(mb[0]) != fixed for mb in micro_batches):
            raise ConfigError(f"the model could not be traced with a dynamic batch, so its stages take micro-batches "
                              f"of exactly {fixed} samples; got {[len(mb[0]) for mb in micro_batches]} (drop the "
                              "short last batch, or make the batch size a multiple of the traced micro-batch)")
        return micro_batches

    def eval_shard(self) -> tuple[int, int]:
        """Each replica evaluates its share; the stages of a replica share it."""
        return self.data_rank, self.data_world

    def evaluate(self, batches) -> StepResult:
        """Totals over the held-out set: each replica evaluates its share (``batches``)
        in M micro-batches, and the shares are summed."""
        self.module.eval()
        reports = []
        for batch in batches:
            micro_batches = self._micro_batches(batch)
            if micro_batches:
                reports += self.runner.run_forward_only([mb[0] for mb in micro_batches], micro_batches)
        return self._share_totals(reports)

    def _share_totals(self, reports) -> StepResult:
        """The last stage of each replica knows its loss; sum over replicas, so every
        rank returns the same global totals (loss, samples, correct; a loss_fn's own
        metrics are not gathered across stages)."""
        totals = StepResult(0.0, 0)
        for report in reports:
            totals.add(report, self.objective.reduction)
        stats = torch.tensor([totals.loss_sum, float(totals.samples), float(totals.correct or 0),
                              float(totals.correct is not None)], dtype=torch.float64, device=collective_device())
        if self.env.distributed:
            dist.all_reduce(stats)
        has_correct = stats[3].item() > 0
        return StepResult(stats[0].item(), int(stats[1]), int(stats[2]) if has_correct else None)

    # ------------------------------------------------------------ checkpoints

    def checkpoint_shard(self) -> str | None:
        """``stage{s}``, saved by replica 0 only (replicas hold equal copies)."""
        return self.resume_shard() if self.mesh.replica == 0 else None

    def resume_shard(self) -> str:
        """The checkpoint file stem this rank resumes from: its stage's, on every
        replica (replica 0 wrote it)."""
        return f"stage{self.stage}"

    def state_dict(self) -> dict:
        state = {"stage": self.stage, "stages": self.mesh.stages, "counts": list(self.counts),
                 "model": self.module.state_dict(),
                 "optimizer": self.stage_optimizer.state_dict() if self.stage_optimizer is not None else {}}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        layout = (state.get("stage"), state.get("stages"), state.get("counts"))
        if layout != (self.stage, self.mesh.stages, list(self.counts)):
            raise ConfigError(
                f"checkpoint is stage {layout[0]} of {layout[1]} with layer counts {layout[2]}; this rank "
                f"is stage {self.stage} of {self.mesh.stages} with {list(self.counts)}: resume in the same layout")
        self.module.load_state_dict(state["model"])
        if self.stage_optimizer is not None:
            self.stage_optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])

    def full_model_state(self) -> dict:
        """The whole model's state dict, assembled from every stage (collective: all
        ranks call it, all get it)."""
        tensors = list(self.module.state_dict().values())
        result = {}
        for stage, blob in enumerate(self._gather_stage_bytes(tensors)):
            decoded = _decode(blob, [(shape, dtype) for _, shape, dtype in self._layouts[stage]])
            result.update({key: t for (key, _, _), t in zip(self._layouts[stage], decoded)})
        return result

    def param_checksum(self) -> str:
        """sha256 over the full model's parameters in order (collective); equals the
        one-process model's checksum when the parameters are equal."""
        import hashlib
        digest = hashlib.sha256()
        for blob in self._gather_stage_bytes(list(self.module.parameters())):
            digest.update(blob)
        return digest.hexdigest()

    def _gather_stage_bytes(self, tensors) -> list[bytes]:
        """Each stage's tensors as concatenated raw bytes, stage 0 first (replica
        0's copy), on every rank."""
        device = self.device   # NCCL gathers on the GPU
        local = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
                          or [torch.zeros(0, dtype=torch.uint8, device=device)])
        if not self.env.distributed:
            return [local.cpu().numpy().tobytes()]
        world = self.env.world_size
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([local.numel()], device=device))
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[:local.numel()] = local
        gathered = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
        dist.all_gather(gathered, padded)
        return [gathered[r][:int(sizes[r])].cpu().numpy().tobytes()
                for r in (self.mesh.rank_of(0, s) for s in range(self.mesh.stages))]

    # ------------------------------------------------------------------ misc

    @property
    def bytes_sent(self) -> int:
        tied = self.tied.bytes_sent if self.tied is not None else 0
        return sum(c.bytes_sent for c in self._channels) + self.sync.bytes_sent + tied

    @property
    def lr(self) -> float:
        return float(self.stage_optimizer.param_groups[0]["lr"]) if self.stage_optimizer is not None else self._lr

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.stage_optimizer

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels = []
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


def assemble_stage_states(stage_states) -> dict:
    """One state dict for the whole model from the per-stage checkpoints
    (:meth:`PipelineStrategy.state_dict` of each stage, any order): stage modules
    keep the full model's layer names, so their entries merge without renaming."""
    states = sorted(stage_states, key=lambda s: s["stage"])
    stages = [s["stage"] for s in states]
    if stages != list(range(states[0]["stages"] if states else 0)) or not states:
        raise ConfigError(f"need one checkpoint per stage 0..S-1, got stages {stages}")
    merged = {}
    for state in states:
        merged.update(state["model"])
    return merged


def _decode(blob: bytes, specs) -> list[torch.Tensor]:
    """Split ``blob`` into tensors of the given (shape, dtype), in order."""
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
    tensors, offset = [], 0
    for shape, dtype in specs:
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        # clone before view: a dtype view needs an aligned start, a slice may not have one
        tensors.append(data[offset:offset + nbytes].clone().view(dtype).reshape(shape))
        offset += nbytes
    if offset != len(data):
        raise RuntimeError(f"stage state has {len(data)} bytes, layout expects {offset}")
    return tensors
