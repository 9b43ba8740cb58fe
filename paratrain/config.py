"""One typed configuration for a training run: every default, every bound, and every
rule of which option goes with which strategy, in one place.

The tree is pydantic models, one per concern (job, model, data, optimisation,
parallelism, communication, resilience, output); each leaf is one CLI flag of the same
name (``batch_size`` is ``--batch-size``, :mod:`paratrain.cli` generates them), one TOML
key in its section (``paratrain train --config run.toml``), and is printed back by
``--print-config``. Building a run takes three steps, each raising
:class:`~paratrain.errors.ConfigError` with one line that names the option, its value
and what is allowed:

1. :func:`parse_run_config`: types and bounds of each value (pydantic; NaN and
   infinities are refused everywhere);
2. :func:`resolve_run_config`: defaults that depend on other options (``--servers`` is
   1 for ``dist_*``, the workers of a pipeline are stages x replicas, ...), and the rules
   that join options: an option given for a strategy it does not apply to is refused
   (:data:`APPLIES`);
3. the caller's checks that need the outside world (paths writable, the batch no
   larger than the dataset), in :func:`check_paths` and the CLI.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from paratrain.env import DEFAULT_HEARTBEAT_TIMEOUT_S
from paratrain.errors import ConfigError
from paratrain.strategies import STRATEGIES, StrategySpec, strategy_spec

#: The most worker (or server) processes one launcher starts on one machine. Each is a
#: full Python process with its own copy of the model; past this a typo (``--workers
#: 100000``) would fork the machine to death. Set PARATRAIN_MAX_LOCAL_PROCESSES to raise it.
MAX_LOCAL_PROCESSES = int(os.environ.get("PARATRAIN_MAX_LOCAL_PROCESSES", "64"))
MAX_SEED = 2**63 - 1
AMP_MODES = ("none", "bf16", "fp16")
SCHEDULES = ("gpipe", "1f1b")
LR_SCHEDULES = ("constant", "cosine", "linear")
OUTER_OPTIMIZERS = ("nesterov", "sgd")   # paratrain.parallel.diloco.OUTER_OPTIMIZERS


class Section(BaseModel):
    """A part of the tree: unknown keys and non-finite floats are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True, populate_by_name=True)


def _opt(default: Any, help: str, **bounds) -> Any:
    return Field(default, description=help, **bounds)


class JobConfig(Section):
    workers: Optional[int] = _opt(None, "worker processes (default 2; stages x replicas for pipeline/hybrid)",
                                  ge=1, le=MAX_LOCAL_PROCESSES)
    servers: Optional[int] = _opt(None, "parameter-server processes (default 1 for dist_*)",
                                  ge=0, le=MAX_LOCAL_PROCESSES)
    strategy: Literal[STRATEGIES] = _opt("allreduce", "how work and parameters are shared")
    epochs: int = _opt(8, "passes over the training set", ge=1, le=100_000)
    batch_size: int = _opt(64, "the GLOBAL batch, split across data-parallel workers", ge=1, le=1 << 24)
    seed: int = _opt(0, "seeds the model, the data order and every random choice", ge=0, le=MAX_SEED)


class ModelConfig(Section):
    model: str = _opt("cnn", "mlp | cnn | dlrm | gpt, or package.module:factory", min_length=1)
    table_sizes: Optional[str] = _opt(None, "dlrm: rows of each embedding table, comma-separated (default "
                                            "4000000,1000000,100000,10000,1000,100)", min_length=1)
    embedding_dim: Optional[int] = _opt(None, "dlrm: width of every embedding table (default 16)", ge=1, le=1 << 16)
    n_layer: Optional[int] = _opt(None, "gpt: transformer blocks (default 4)", ge=1, le=256)
    n_head: Optional[int] = _opt(None, "gpt: attention heads (default 4)", ge=1, le=256)
    n_embd: Optional[int] = _opt(None, "gpt: width (default 128)", ge=1, le=1 << 16)
    context: Optional[int] = _opt(None, "gpt: tokens per sequence (default 128)", ge=2, le=1 << 16)


class DataConfig(Section):
    dataset: str = _opt("digits", "digits | synthetic | clicks | pytext, or package.module:factory", min_length=1)
    train_samples: Optional[int] = _opt(None, "clicks: samples in the training split (default 768000, one "
                                              "epoch's worth)", ge=1, le=1 << 31)
    heldout_samples: Optional[int] = _opt(None, "clicks: samples in the held-out split (default 100000)",
                                          ge=1, le=1 << 31)
    loader_workers: int = _opt(0, "DataLoader worker processes per training process (fit's num_workers)",
                               ge=0, le=MAX_LOCAL_PROCESSES)
    pin_memory: bool = _opt(False, "pinned host memory for batches (faster copies to a GPU)")


class OptimConfig(Section):
    optimizer: str = _opt("sgd", "a registered optimizer name (paratrain.optimizers)", min_length=1)
    lr: float = _opt(0.05, "learning rate", gt=0, le=1e6)
    momentum: Optional[float] = _opt(None, "SGD momentum (default 0.9)", ge=0, lt=1)
    accumulate: int = _opt(1, "micro-batches per step (communicate once per step)", ge=1, le=1 << 16)
    amp: Literal[AMP_MODES] = _opt("none", "mixed precision: bf16 (CPU/GPU) or fp16 (GPU, loss scaling)")
    max_grad_norm: Optional[float] = _opt(None, "clip by the global norm of the aggregated gradient", gt=0, le=1e9)
    weight_decay: Optional[float] = _opt(None, "weight decay (decoupled for adamw); default: the optimizer's",
                                         ge=0, le=10)
    beta1: Optional[float] = _opt(None, "adam/adamw first-moment decay (default 0.9)", ge=0, lt=1)
    beta2: Optional[float] = _opt(None, "adam/adamw second-moment decay (default 0.999)", ge=0, lt=1)
    lr_schedule: Literal[LR_SCHEDULES] = _opt("constant", "learning rate over the run, after the warm-up")
    warmup_steps: int = _opt(0, "linear warm-up steps from 0 to --lr", ge=0, le=1 << 30)
    min_lr_factor: float = _opt(0.0, "cosine and linear schedules end at this fraction of --lr", ge=0, le=1)


class ParallelConfig(Section):
    stages: Optional[int] = _opt(None, "pipeline stages per replica (default 2)", ge=1, le=MAX_LOCAL_PROCESSES)
    micro_batches: Optional[int] = _opt(None, "micro-batches per step (default 4)", ge=1, le=1 << 16)
    schedule: Optional[Literal[SCHEDULES]] = _opt(None, "pipeline schedule (default 1f1b)")
    replicas: Optional[int] = _opt(None, "data-parallel replicas of the pipeline (default 1)",
                                   ge=1, le=MAX_LOCAL_PROCESSES)
    split_points: Optional[str] = _opt(None, "where a model that is not nn.Sequential is cut: comma-separated "
                                             "module names each starting a stage (transformer.h.2), or auto "
                                             "(default: balanced over its repeated blocks)", min_length=1)
    sync_every: Optional[int] = _opt(None, "local SGD / DiLoCo period H in inner steps (default 8 / 16)",
                                     ge=1, le=1 << 20)
    fragments: Optional[int] = _opt(None, "diloco: sync 1/F of the parameters every H/F steps, overlapped "
                                          "with the next steps (Streaming DiLoCo; default 1)", ge=1, le=1 << 16)
    outer_optimizer: Optional[Literal[OUTER_OPTIMIZERS]] = _opt(None, "diloco: outer optimizer (default nesterov)")
    outer_lr: Optional[float] = _opt(None, "diloco: outer learning rate (default 0.7)", gt=0, le=1e3)
    outer_momentum: Optional[float] = _opt(None, "diloco: outer momentum (default 0.9)", ge=0, lt=1)
    staleness: Optional[int] = _opt(None, "dist_ssp bound (default 2)", ge=0, le=1 << 20)
    backup_workers: int = _opt(0, "dist_sync: apply a round once N-b workers pushed it", ge=0,
                               le=MAX_LOCAL_PROCESSES)


class CommConfig(Section):
    compression: Optional[str] = _opt(None, "fp16 | bf16 | 2bit[:threshold] | 1bit[:threshold] | topk[:ratio] | "
                                            "powersgd[:rank]",
                                      min_length=1)
    bind: Optional[str] = _opt(None, "address parameter servers and pipeline links bind to (default 127.0.0.1)",
                               min_length=1)
    secret_file: Optional[str] = _opt(None, "the job secret (hex, mode 0600), the same file on every machine; "
                                            "default PARATRAIN_SECRET, else a fresh one", min_length=1)


class ResilienceConfig(Section):
    checkpoint_dir: Optional[str] = _opt(None, "atomic checkpoints go here (end of each epoch)", min_length=1)
    checkpoint_every: Optional[int] = _opt(None, "also checkpoint every N steps", ge=1, le=1 << 30)
    keep_checkpoints: int = _opt(2, "checkpoints kept per shard; a restart falls back to an older one when the "
                                    "newest is damaged", ge=1, le=1000)
    resume: bool = _opt(False, "continue from --checkpoint-dir")
    max_restarts: int = _opt(0, "restart the worker group from the last checkpoint when a worker dies",
                             ge=0, le=1000)
    server_snapshot_dir: Optional[str] = _opt(None, "dist_*: servers snapshot here; with --max-restarts a dead "
                                                    "server resumes from it", min_length=1)
    server_snapshot_every: Optional[int] = _opt(None, "snapshot after at most N applied pushes (default 100)",
                                                ge=1)
    min_workers: Optional[int] = _opt(None, "per-step fault tolerance (allreduce): when a worker dies the others "
                                            "train on while M live; a replacement joins with a healthy peer's "
                                            "state", ge=1, le=MAX_LOCAL_PROCESSES)
    spares: Optional[int] = _opt(None, "with --min-workers: warm spare workers that take a dead one's place "
                                       "(default 1)", ge=0, le=MAX_LOCAL_PROCESSES)
    heartbeat_timeout: Optional[float] = _opt(None, "with --min-workers: seconds without a heartbeat after which "
                                                    "the launcher takes a worker for hung and kills it (default 10)",
                                              gt=0, le=600)


class OutputConfig(Section):
    log_dir: Optional[str] = _opt(None, "metrics.jsonl and TensorBoard events", min_length=1)
    timeline: Optional[str] = _opt(None, "Chrome trace file (rank r writes FILE.rank<r>)", min_length=1)
    log_interval: int = _opt(50, "Speedometer period in batches", ge=1, le=1 << 30)
    no_progress: bool = _opt(False, "no progress bar")
    # "json" itself would shadow a pydantic method: the option keeps its name as an alias
    json_summary: bool = Field(False, alias="json", description="print the summary as one JSON line, last")
    straggler: Optional[str] = _opt(None, "RANK:FACTOR[,...]: each step of RANK takes FACTOR times as long",
                                    min_length=1)
    step_delay: float = _opt(0.0, "seconds of simulated compute per step on every worker", ge=0, le=3600)


class RunConfig(Section):
    """The whole tree. Sections are TOML tables; their fields are the flags."""

    job: JobConfig = Field(default_factory=JobConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    comm: CommConfig = Field(default_factory=CommConfig)
    resilience: ResilienceConfig = Field(default_factory=ResilienceConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def get(self, name: str) -> Any:
        """The value of option ``name`` (``batch_size``, ``json``, ...)."""
        return getattr(getattr(self, FIELD_SECTIONS[name]), _ATTRIBUTES.get(name, name))

    def flat(self) -> dict[str, Any]:
        """Every leaf by its option name."""
        return {name: self.get(name) for name in FIELD_SECTIONS}

    def given(self) -> set[str]:
        """Options set explicitly (by a flag or a TOML key), not left at their default."""
        return {name for name, section in FIELD_SECTIONS.items()
                if _ATTRIBUTES.get(name, name) in getattr(self, section).model_fields_set}

    @property
    def spec(self) -> StrategySpec:
        return strategy_spec(self.job.strategy)


#: Option name -> its section (names are unique across the tree); an option is its
#: field's alias where it has one.
FIELD_SECTIONS: dict[str, str] = {info.alias or name: section
                                  for section, section_info in RunConfig.model_fields.items()
                                  for name, info in section_info.annotation.model_fields.items()}
_ATTRIBUTES: dict[str, str] = {info.alias: name for section_info in RunConfig.model_fields.values()
                               for name, info in section_info.annotation.model_fields.items() if info.alias}


def field_info(name: str):
    """The pydantic FieldInfo of option ``name`` (type, default, bounds, help)."""
    return RunConfig.model_fields[FIELD_SECTIONS[name]].annotation.model_fields[_ATTRIBUTES.get(name, name)]


# ----------------------------------------------------------------- which option goes where


@dataclass(frozen=True)
class Applies:
    """When an option may be given: ``test(config)``, described as ``says`` (the values
    of option ``on`` it goes with)."""

    test: Callable[[RunConfig], bool]
    says: str
    on: str = "strategy"


def _strategies(predicate: Callable[[StrategySpec], bool]) -> Applies:
    names = [name for name in STRATEGIES if predicate(strategy_spec(name))]
    return Applies(lambda config: predicate(config.spec), " | ".join(names))


_SERVERS = _strategies(lambda s: s.uses_servers)
_PIPELINED = _strategies(lambda s: s.pipelined)
_DILOCO = _strategies(lambda s: s.name == "diloco")
# Per-step fault tolerance: plain allreduce only so far (docs/resilience.md).
_ELASTIC = _strategies(lambda s: s.name == "allreduce")

#: The one table of which option applies where. Options not listed apply everywhere.
APPLIES: dict[str, Applies] = {
    "servers": _SERVERS,
    "server_snapshot_dir": _SERVERS,
    "server_snapshot_every": _SERVERS,
    "backup_workers": _strategies(lambda s: s.name == "dist_sync"),
    "staleness": _strategies(lambda s: s.name == "dist_ssp"),
    "sync_every": _strategies(lambda s: s.name in ("local_sgd", "diloco")),
    "fragments": _DILOCO,
    "outer_optimizer": _DILOCO,
    "outer_lr": _DILOCO,
    "outer_momentum": _DILOCO,
    "stages": _PIPELINED,
    "micro_batches": _PIPELINED,
    "schedule": _PIPELINED,
    "split_points": _PIPELINED,
    "replicas": _strategies(lambda s: s.name == "hybrid"),
    "compression": _strategies(lambda s: s.name in ("allreduce", "diloco") or s.uses_servers),
    "accumulate": _strategies(lambda s: not s.pipelined),
    "amp": _strategies(lambda s: not s.pipelined),
    "bind": _strategies(lambda s: s.uses_servers or s.pipelined),
    "secret_file": _strategies(lambda s: s.uses_servers or s.pipelined),
    "min_workers": _ELASTIC,
    "spares": _ELASTIC,
    "heartbeat_timeout": _ELASTIC,
    "momentum": Applies(lambda config: config.optim.optimizer in ("sgd", "rmsprop"), "sgd | rmsprop", on="optimizer"),
    "table_sizes": Applies(lambda config: config.model.model == "dlrm", "dlrm", on="model"),
    "embedding_dim": Applies(lambda config: config.model.model == "dlrm", "dlrm", on="model"),
    "train_samples": Applies(lambda config: config.data.dataset == "clicks", "clicks", on="dataset"),
    "heldout_samples": Applies(lambda config: config.data.dataset == "clicks", "clicks", on="dataset"),
    "keep_checkpoints": Applies(lambda config: config.resilience.checkpoint_dir is not None, "FOLDER",
                                on="checkpoint_dir"),
    **{name: Applies(lambda config: config.optim.optimizer in ("adam", "adamw"), "adam | adamw", on="optimizer")
       for name in ("beta1", "beta2")},
    "min_lr_factor": Applies(lambda config: config.optim.lr_schedule in ("cosine", "linear"), "cosine | linear",
                             on="lr_schedule"),
    **{name: Applies(lambda config: config.model.model == "gpt", "gpt", on="model")
       for name in ("n_layer", "n_head", "n_embd", "context")},
}

#: Defaults of a built-in model, for the options a run does not give (those that do not
#: apply to the rest of the run, such as the betas with ``--optimizer sgd``, are dropped).
#: One epoch of the pytext corpus with the gpt ones (511 steps) reaches about 2.4 bits per
#: byte in a few minutes on 2 cores (docs/gpt_pytext.md). A click model learns from one
#: pass over its logs (a second one overfits the rare ids), with Adam (lazy on the
#: tables) and a rate that decays to 0 (docs/dlrm.md).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt": {"dataset": "pytext", "optimizer": "adamw", "lr": 6e-3, "beta1": 0.9, "beta2": 0.95,
            "weight_decay": 0.1, "epochs": 1, "batch_size": 32, "lr_schedule": "cosine", "warmup_steps": 50,
            "min_lr_factor": 0.1, "max_grad_norm": 1.0},
    "dlrm": {"dataset": "clicks", "epochs": 1, "batch_size": 512, "optimizer": "adam", "lr": 0.005,
             "lr_schedule": "linear"},
}
#: A built-in dataset's own model, used when ``--model`` is not given.
DATASET_MODELS: dict[str, str] = {"clicks": "dlrm"}


def parse_table_sizes(text: str | None) -> tuple[int, ...] | None:
    """``"4000000,1000"`` -> ``(4000000, 1000)``; ConfigError naming ``--table-sizes``."""
    if text is None:
        return None
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 or size > 2**31 - 1 for size in sizes):
        raise ConfigError(f"--table-sizes {text!r}: give rows per table as comma-separated ints in [1, 2**31), "
                          f"e.g. 4000000,1000000,1000")
    return sizes


#: Options a resumed run may change: how long it runs, where and how often it saves,
#: what it reports, and how its processes reach each other. Every other option is part
#: of a checkpoint's identity (:func:`resume_options`).
RESUME_MUTABLE = frozenset({
    "epochs", "resume", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "log_dir", "timeline",
    "log_interval", "no_progress", "json", "straggler", "step_delay", "loader_workers", "pin_memory", "bind",
    "secret_file", "server_snapshot_dir", "server_snapshot_every",
})


def resume_options(config: RunConfig) -> dict[str, Any]:
    """The options a checkpoint of this run must have been written with to be resumed."""
    return {name: value for name, value in config.flat().items() if name not in RESUME_MUTABLE}


def applies(name: str, config: RunConfig) -> bool:
    """Whether option ``name`` means something for this run."""
    rule = APPLIES.get(name)
    return rule is None or rule.test(config)


# ----------------------------------------------------------------- building a run


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_run_config(values: dict[str, Any] | None = None, *, sections: dict[str, dict] | None = None) -> RunConfig:
    """A :class:`RunConfig` from TOML-shaped ``sections`` overridden by flat option
    ``values`` (the flags given); ConfigError names the first bad option."""
    nested: dict[str, dict] = {section: dict(table) for section, table in (sections or {}).items()}
    for section in nested:
        if section not in RunConfig.model_fields:
            raise ConfigError(f"config section [{section}] is not known; sections are: "
                              f"{', '.join(RunConfig.model_fields)}")
    for name, value in (values or {}).items():
        if name not in FIELD_SECTIONS:
            raise ConfigError(f"option {name!r} is not known")
        nested.setdefault(FIELD_SECTIONS[name], {})[name] = value
    try:
        return RunConfig.model_validate(nested)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


_PHRASES = {
    "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}", "less_than": "must be < {lt}",
    "int_parsing": "must be an integer", "int_type": "must be an integer", "int_from_float": "must be an integer",
    "float_parsing": "must be a number", "float_type": "must be a number",
    "finite_number": "must be a finite number", "string_too_short": "must not be empty",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false",
    "literal_error": "must be one of: {expected}", "string_type": "must be a string",
}


def _show(value: Any) -> str:
    """A value as the user typed it: numbers bare, anything else quoted."""
    if isinstance(value, str):
        try:
            float(value)
            return value
        except ValueError:
            return repr(value)
    return repr(value)


def _one_line(exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    if error["type"] == "extra_forbidden":
        return f"config key {'.'.join(loc)!r} is not an option"
    name = loc[-1] if loc else "?"
    name = next((option for option, attribute in _ATTRIBUTES.items() if attribute == name), name)
    where = flag(name) if name in FIELD_SECTIONS else f"[{'.'.join(loc)}]"
    phrase = _PHRASES.get(error["type"])
    message = phrase.format(**error.get("ctx", {})) if phrase else error["msg"][0].lower() + error["msg"][1:]
    return f"{where} {_show(error.get('input'))}: {message}"


def resolve_run_config(config: RunConfig, *, launched_world: int | None = None) -> RunConfig:
    """Fill the defaults that depend on other options and check every rule that joins
    options. ``launched_world`` is WORLD_SIZE when this process was started by a
    launcher (then ``--workers`` must agree with it). Returns a new config."""
    config = _with_model_defaults(config)
    _refuse_options_that_do_not_apply(config)
    spec = config.spec
    job, parallel = config.job.model_copy(), config.parallel.model_copy()
    optim, resilience = config.optim.model_copy(), config.resilience.model_copy()
    if spec.pipelined:
        parallel.stages = parallel.stages or 2
        parallel.micro_batches = parallel.micro_batches or 4
        parallel.schedule = parallel.schedule or "1f1b"
        parallel.replicas = parallel.replicas or 1
    if spec.name == "local_sgd":
        parallel.sync_every = parallel.sync_every or 8
    if spec.name == "diloco":
        _fill_diloco_defaults(parallel)
    if spec.name == "dist_ssp" and parallel.staleness is None:
        parallel.staleness = 2
    if applies("momentum", config) and optim.momentum is None:
        optim.momentum = 0.9
    if job.workers is None:
        job.workers = launched_world or (parallel.stages * parallel.replicas if spec.pipelined
                                         else 1 if spec.name == "local" else 2)
    if job.servers is None:
        job.servers = 1 if spec.uses_servers else 0
    if resilience.server_snapshot_dir and resilience.server_snapshot_every is None:
        resilience.server_snapshot_every = 100
    if resilience.min_workers is not None:
        resilience.spares = 1 if resilience.spares is None else resilience.spares
        resilience.heartbeat_timeout = resilience.heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT_S
    resolved = config.model_copy(update={"job": job, "parallel": parallel, "optim": optim,
                                         "resilience": resilience})
    _check_rules(resolved, launched_world)
    return resolved


def _with_model_defaults(config: RunConfig) -> RunConfig:
    """The config with its model's defaults (:data:`MODEL_DEFAULTS`; the model is the
    dataset's own, :data:`DATASET_MODELS`, when ``--model`` is not given) for every option
    the run did not give; they count as given from here on, as a TOML file's would."""
    given_names = config.given()
    model = config.model.model
    if "model" not in given_names and config.data.dataset in DATASET_MODELS:
        model = DATASET_MODELS[config.data.dataset]
    preset = {name: value for name, value in MODEL_DEFAULTS.get(model, {}).items() if name not in given_names}
    if model != config.model.model:
        preset["model"] = model
    if not preset:
        return config
    given = {name: config.get(name) for name in given_names}
    merged = parse_run_config({**given, **preset})
    return parse_run_config({**given, **{name: value for name, value in preset.items() if applies(name, merged)}})


def _fill_diloco_defaults(parallel: ParallelConfig) -> None:
    from paratrain.parallel.diloco import DiLoCoConfig
    defaults = DiLoCoConfig()
    for name in ("sync_every", "fragments", "outer_optimizer", "outer_lr", "outer_momentum"):
        if getattr(parallel, name) is None:
            setattr(parallel, name, getattr(defaults, name))


def diloco_config(config: RunConfig):
    """The :class:`~paratrain.parallel.diloco.DiLoCoConfig` of a resolved diloco run."""
    from paratrain.parallel.diloco import DiLoCoConfig
    parallel = config.parallel
    return DiLoCoConfig(sync_every=parallel.sync_every, fragments=parallel.fragments,
                        outer_optimizer=parallel.outer_optimizer, outer_lr=parallel.outer_lr,
                        outer_momentum=parallel.outer_momentum, compression=config.comm.compression)


def _refuse_options_that_do_not_apply(config: RunConfig) -> None:
    for name in sorted(config.given()):
        if not applies(name, config):
            rule, value = APPLIES[name], config.get(name)
            raise ConfigError(f"{flag(name)} {_show(value)} applies to {flag(rule.on)} {rule.says}, "
                              f"not to {flag(rule.on)} {config.get(rule.on)}")


def _check_rules(config: RunConfig, launched_world: int | None) -> None:
    job, parallel, spec = config.job, config.parallel, config.spec
    if launched_world is not None and job.workers != launched_world:
        raise ConfigError(f"--workers {job.workers}: this process was launched as one of WORLD_SIZE={launched_world}")
    if spec.name == "local" and job.workers != 1:
        raise ConfigError(f"--workers {job.workers}: --strategy local trains in one process; use --workers 1, "
                          f"or --strategy allreduce for several")
    if spec.uses_servers and job.servers < 1:
        raise ConfigError(f"--strategy {spec.name} needs --servers >= 1; got --servers {job.servers}")
    if spec.pipelined and job.workers != parallel.stages * parallel.replicas:
        raise ConfigError(f"--workers {job.workers} must be --stages {parallel.stages} x --replicas "
                          f"{parallel.replicas} = {parallel.stages * parallel.replicas}")
    if parallel.backup_workers and parallel.backup_workers >= job.workers:
        raise ConfigError(f"--backup-workers {parallel.backup_workers} must be fewer than --workers {job.workers}")
    parse_table_sizes(config.model.table_sizes)
    _check_optimizer(config)
    _check_compression(config)
    if spec.name == "diloco":
        _check_diloco(config)
    _check_resilience(config)
    parse_stragglers(config.output.straggler, job.workers)


def _check_optimizer(config: RunConfig) -> None:
    from paratrain.optimizers import server_optimizer_names, worker_optimizer_names
    optim = config.optim
    if optim.optimizer not in worker_optimizer_names():
        raise ConfigError(f"--optimizer {optim.optimizer!r} is not allowed; choose one of: "
                          f"{', '.join(worker_optimizer_names())}")
    if config.spec.asynchronous and optim.optimizer not in server_optimizer_names():
        raise ConfigError(f"--optimizer {optim.optimizer!r} has no server rule, and --strategy "
                          f"{config.job.strategy} runs the optimizer on the servers; choose one of: "
                          f"{', '.join(server_optimizer_names())}")


def _check_compression(config: RunConfig) -> None:
    from paratrain.comm.codecs import parse_compression
    from paratrain.ps.compressed_push import SERVER_CODECS
    compression = parse_compression(config.comm.compression)
    if config.spec.uses_servers and compression.enabled and compression.type not in SERVER_CODECS:
        raise ConfigError(f"--compression {config.comm.compression!r}: parameter servers decode one key slice "
                          f"at a time, which {compression.type} cannot do; choose one of: {', '.join(SERVER_CODECS)}")


def _check_diloco(config: RunConfig) -> None:
    """DiLoCoConfig's own rules (fragments divide H, pseudo-gradient codecs, ...),
    said with the flags' names."""
    try:
        diloco_config(config)
    except ConfigError as exc:
        message = str(exc)
        for name in ("sync_every", "fragments", "outer_optimizer", "outer_lr", "outer_momentum", "compression"):
            message = message.replace(f"{name}=", f"{flag(name)} ")
        raise ConfigError(message) from None


def _check_resilience(config: RunConfig) -> None:
    resilience = config.resilience
    if (resilience.resume or resilience.checkpoint_every) and not resilience.checkpoint_dir:
        raise ConfigError("--resume and --checkpoint-every need --checkpoint-dir")
    if resilience.server_snapshot_every and not resilience.server_snapshot_dir:
        raise ConfigError(f"--server-snapshot-every {resilience.server_snapshot_every} needs --server-snapshot-dir")
    if resilience.server_snapshot_dir and config.job.strategy == "dist_sync" and resilience.max_restarts:
        raise ConfigError("--server-snapshot-dir with --strategy dist_sync --max-restarts: a dist_sync group "
                          "restarts from the workers' checkpoint with fresh servers; server snapshots are for "
                          "dist_async|dist_ssp")
    _check_min_workers(config)


def _check_min_workers(config: RunConfig) -> None:
    resilience = config.resilience
    if resilience.min_workers is None:
        for name in ("spares", "heartbeat_timeout"):
            if getattr(resilience, name) is not None:
                raise ConfigError(f"{flag(name)} {getattr(resilience, name)} needs --min-workers "
                                  f"(per-step fault tolerance)")
        return
    members = data_parallel_world(config)
    if members < 2 or resilience.min_workers > members:
        raise ConfigError(f"--min-workers {resilience.min_workers} must be <= --workers {members}, and --workers >= 2: "
                          f"the survivors of a dead worker go on while --min-workers of them live")
    from paratrain.comm.codecs import parse_compression
    if parse_compression(config.comm.compression).enabled:
        raise ConfigError(f"--compression {config.comm.compression} with --min-workers: per-step fault tolerance "
                          f"covers uncompressed allreduce only")
    if config.optim.amp == "fp16":
        raise ConfigError("--amp fp16 with --min-workers: the loss scaler's state is not sent to a replacement")


def data_parallel_world(config: RunConfig) -> int:
    """How many ways each global batch is split (pipeline stages of a replica share one)."""
    return config.parallel.replicas if config.spec.pipelined else config.job.workers


def check_batch(config: RunConfig, dataset_len: int | None = None) -> None:
    """The global batch splits evenly over the data-parallel workers and is no larger
    than the training set (when its length is known)."""
    world, batch = data_parallel_world(config), config.job.batch_size
    # An elastic group cuts each batch over whoever is alive: slices may differ by one.
    if batch % world and config.resilience.min_workers is None:
        raise ConfigError(f"--batch-size {batch} is not divisible by the {world} data-parallel "
                          f"workers; use a multiple of {world}")
    if dataset_len is not None and batch > dataset_len:
        raise ConfigError(f"--batch-size {batch} is larger than the {dataset_len} training samples of "
                          f"--dataset {config.data.dataset}")


def parse_stragglers(spec: str | None, workers: int | None = None) -> dict[int, float]:
    """``"1:3,2:1.5"`` -> ``{1: 3.0, 2: 1.5}`` (rank: slowdown factor, finite and >= 1;
    each rank once; ranks below ``workers`` when given)."""
    if not spec:
        return {}
    result: dict[int, float] = {}
    for item in spec.split(","):
        rank_text, sep, factor_text = item.partition(":")
        try:
            rank, factor = int(rank_text), float(factor_text)
        except ValueError:
            raise ConfigError(f"--straggler {spec!r}: use RANK:FACTOR[,RANK:FACTOR], e.g. 3:2.5") from None
        if not sep or rank < 0 or not math.isfinite(factor) or factor < 1:
            raise ConfigError(f"--straggler {item!r}: rank must be >= 0 and factor a finite number >= 1")
        if rank in result:
            raise ConfigError(f"--straggler {spec!r} names rank {rank} twice")
        if workers is not None and rank >= workers:
            raise ConfigError(f"--straggler {spec!r} names rank {rank}, but --workers is {workers}")
        result[rank] = factor
    return result


def check_paths(config: RunConfig) -> None:
    """Refuse path options that cannot be written, before anything starts."""
    resilience, output = config.resilience, config.output
    for name, value, kind in (("checkpoint_dir", resilience.checkpoint_dir, "dir"),
                              ("server_snapshot_dir", resilience.server_snapshot_dir, "dir"),
                              ("log_dir", output.log_dir, "dir"), ("timeline", output.timeline, "file")):
        if value:
            _check_writable(name, Path(value), kind)


def check_bind(config: RunConfig) -> None:
    """Refuse a ``--bind`` address this machine cannot listen on, before anything starts."""
    import socket
    if not config.comm.bind:
        return
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((config.comm.bind, 0))
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"--bind {config.comm.bind!r}: this machine cannot listen there "
                          f"({getattr(exc, 'strerror', None) or exc})") from None


def _check_writable(name: str, path: Path, kind: str) -> None:
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ConfigError(f"{flag(name)} {str(path)!r} is a file, not a folder")
    if kind == "file" and path.is_dir():
        raise ConfigError(f"{flag(name)} {str(path)!r} is a folder; give a file name")
    target = path if kind == "dir" else path.parent
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:   # os.access says yes to root everywhere (/proc too): try it, leaving nothing behind
        fd, probe = tempfile.mkstemp(prefix=".paratrain-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{flag(name)} {str(path)!r} cannot be written ({str(existing)!r}: {exc.strerror})") from None


# ----------------------------------------------------------------- TOML


def read_toml(path: str | os.PathLike) -> dict[str, dict]:
    """The sections of a TOML config file; ConfigError (one line) if it cannot be read."""
    import tomllib
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config {str(path)!r} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {str(path)!r} is not valid TOML: {exc}") from None
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"--config {str(path)!r}: {section!r} must be a [section] table; options live in "
                              f"sections: {', '.join(RunConfig.model_fields)}")
    return data


def to_toml(config: RunConfig) -> str:
    """The config as TOML: every option that applies to this run, by section
    (unset optional values are left out, as TOML has no null)."""
    import tomli_w
    tables: dict[str, dict] = {}
    for name, section in FIELD_SECTIONS.items():
        value = config.get(name)
        if value is not None and applies(name, config):
            tables.setdefault(section, {})[name] = value
    return tomli_w.dumps(tables)
