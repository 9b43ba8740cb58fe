"""The ``paratrain`` command: ``train``, ``launch``, ``server`` and ``report``.

``paratrain train`` resolves its options into one typed config (:mod:`paratrain.config`:
flags, a ``--config`` TOML file, defaults), validates everything it can, then either runs
in this process (one worker, no servers), or launches its workers (``--workers N``,
``--servers M``), each of which runs ``python -m paratrain.cli train --config`` with the
resolved config and the torchrun environment. Under ``torchrun`` (``RANK`` set) it is a
worker directly, so the same command serves both.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import sys
import tempfile
import typing
from pathlib import Path

from paratrain import config as config_module
from paratrain.env import DistEnv, read_env
from paratrain.errors import ConfigError, TrainingDiverged

#: A usage error, a checkpoint that cannot be used, a diverged run: one line on
#: stderr, and no restart could fix it (the launcher ends the job at once).
EXIT_USAGE = 2
MiB = 1 << 20


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, with no usage dump."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive(name: str, *, zero_ok: bool = False, most: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: must be an integer") from None
        if value < (0 if zero_ok else 1):
            raise argparse.ArgumentTypeError(f"{name} {value}: must be >= {0 if zero_ok else 1}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{name} {value}: must be <= {most}")
        return value
    return parse


def _choices(annotation) -> tuple | None:
    """The allowed values of a ``Literal`` (or ``Optional[Literal]``) option."""
    for part in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(part) is typing.Literal:
            return typing.get_args(part)
    return None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option of the config tree (:mod:`paratrain.config`), grouped by its
    section. Flags keep their text: the tree's validation turns it into a value, so
    flags and TOML files are checked alike."""
    groups = {}
    for name, section in config_module.FIELD_SECTIONS.items():
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
        info = config_module.field_info(name)
        default = "" if info.default in (None, False) else f" (default {info.default})"
        options = {"dest": name, "default": argparse.SUPPRESS, "help": (info.description or "") + default}
        if info.annotation is bool:
            options["action"] = "store_true"
        elif _choices(info.annotation):
            options["choices"] = _choices(info.annotation)
        else:
            options["metavar"] = name.upper()
        group.add_argument(config_module.flag(name), **options)
    parser.add_argument("--config", default=None, metavar="FILE.toml", help="read options from a TOML file "
                        "(flags given here override it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")


def build_run_config(args: argparse.Namespace, env: DistEnv):
    """The resolved :class:`~paratrain.config.RunConfig` of ``paratrain train``:
    defaults, then ``--config``, then the flags given."""
    given = vars(args)
    sections = config_module.read_toml(args.config) if args.config else {}
    values = {name: given[name] for name in config_module.FIELD_SECTIONS if name in given}
    config = config_module.parse_run_config(values, sections=sections)
    return config_module.resolve_run_config(config, launched_world=env.world_size if env.launched else None)


def _check_before_launch(config, run_id: str) -> dict:
    """What can be checked only with the data, the model and the file system, before
    anything starts. Returns the environment the job's servers get from it."""
    from paratrain.data.loading import dataset_len
    from paratrain.workloads import build_workload
    config_module.check_paths(config)
    config_module.check_bind(config)
    _job_secret(config)
    from paratrain.train.checkpoint import check_directory
    check_directory(config.resilience.checkpoint_dir, _run_identity(config, run_id), resume=config.resilience.resume)
    workload = build_workload(config)
    config_module.check_batch(config, dataset_len(workload.train))
    _check_server_tables(config, workload.model)
    # Builds the strategy (its own checks) and validates it against the model; starts nothing.
    _build_strategy(config, DistEnv(world_size=config.job.workers)).validate(
        config.job.batch_size, config.job.workers, lambda: workload.model)
    return _server_env(config, workload.model) if config.spec.uses_servers else {}


def _job_secret(config) -> str | None:
    """The secret of ``--secret-file`` (checked: a file of this user, mode 0600), if given."""
    if not config.comm.secret_file:
        return None
    from paratrain.comm.security import read_secret_file
    return read_secret_file(config.comm.secret_file)


def _run_identity(config, run_id: str):
    from paratrain.train.checkpoint import RunIdentity
    return RunIdentity(run_id, config_module.resume_options(config))


def _optimizer_params(config) -> dict:
    """The optimizer's parameters the options give (the same for workers and servers)."""
    optim = config.optim
    params = {"lr": optim.lr}
    if optim.momentum is not None:
        params["momentum"] = optim.momentum
    if optim.weight_decay is not None:
        params["weight_decay"] = optim.weight_decay
    if optim.beta1 is not None or optim.beta2 is not None:
        params["betas"] = (0.9 if optim.beta1 is None else optim.beta1, 0.999 if optim.beta2 is None else optim.beta2)
    return params


def _server_env(config, model) -> dict:
    """What the job's configuration fixes for its parameter servers: their message limit
    (the model's largest key slice), the compression, and, for the asynchronous kinds
    (whose servers always run the optimizer), the optimizer: so a restarted rank 0
    never has to be the one that tells them."""
    from paratrain.comm.codecs import parse_compression
    from paratrain.ps.sharding import largest_message_bytes
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    largest = largest_message_bytes(tensors, config.job.servers)
    env = {"PARATRAIN_MAX_MESSAGE_MB": str(max(1, -(-largest // MiB)) + 1),   # one MiB of headroom
           "PARATRAIN_SERVER_LOCKED": "1"}   # nothing changes the optimizer or codec mid-run
    compression = parse_compression(config.comm.compression)
    if compression.enabled:
        env["PARATRAIN_SERVER_COMPRESSION"] = json.dumps(compression.to_dict())
    if config.spec.asynchronous:
        from paratrain.optimizers import build_server_optimizer, server_optimizer_spec
        spec = server_optimizer_spec(config.optim.optimizer, _optimizer_params(config))
        env["PARATRAIN_SERVER_OPTIMIZER"] = json.dumps(build_server_optimizer(spec).to_spec())
    return env


def _check_server_tables(config, model) -> None:
    """Tables that live on the servers (ServerEmbedding under dist_*) are in no worker's
    checkpoint, and need the optimizer on the servers."""
    from paratrain.nn import server_tables
    if not (config.spec.uses_servers and server_tables(model)):
        return
    if config.resilience.checkpoint_dir:
        raise ConfigError(f"--checkpoint-dir with --model {config.model.model} under --strategy {config.job.strategy}: "
                          f"its embedding tables live on the parameter servers, not in the workers' checkpoints; "
                          f"use --server-snapshot-dir (dist_async | dist_ssp) or --strategy allreduce")
    from paratrain.optimizers import row_server_optimizer_names
    lazy = row_server_optimizer_names()
    if config.optim.optimizer not in lazy:
        raise ConfigError(f"--optimizer {config.optim.optimizer} with --model {config.model.model} under --strategy "
                          f"{config.job.strategy}: its tables on the servers need a rule with a lazy row update, "
                          f"one of: {', '.join(lazy)}")
    if config.job.strategy == "dist_sync" and (config.resilience.max_restarts or config.optim.max_grad_norm):
        raise ConfigError(f"--model {config.model.model} under --strategy dist_sync: its tables are updated on the "
                          f"servers, so --max-restarts and --max-grad-norm (which move the optimizer to the "
                          f"workers) cannot be used")


def _build_strategy(config, env: DistEnv, example_input=None):
    from paratrain.train import build_strategy
    from paratrain.train.straggler import Straggler
    # A dist_sync group restarts from the workers' checkpoint with fresh servers, so the
    # optimizer and its state must live on the workers.
    workers_optimize = config.job.strategy == "dist_sync" and config.resilience.max_restarts > 0
    strategy = build_strategy(config, env=env, update_on_kvstore=False if workers_optimize else None,
                              example_input=example_input)
    factor = config_module.parse_stragglers(config.output.straggler).get(env.rank, 1.0)
    step_delay = config.output.step_delay
    return Straggler(strategy, factor, step_delay) if factor != 1.0 or step_delay else strategy


def run_worker(config, env: DistEnv, run_id: str = "") -> dict | None:
    """One worker's whole job: workload (data, model, task), strategy, callbacks, fit.
    ``run_id`` names the run in its checkpoints when no launcher gave one
    (``PARATRAIN_RUN_ID``). Returns the run's summary on the worker that reports it
    (the logging rank), None elsewhere."""
    import torch
    from paratrain.data.loading import dataset_len
    from paratrain.timeline import build_timeline
    from paratrain.train import MetricsLogger, ProgressBar, Speedometer, fit
    from paratrain.train.schedules import build_lr_schedule
    from paratrain.workloads import SummaryExtras, build_workload, dataset_tokens_per_sample
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")) if env.launched else torch.get_num_threads())
    job, optim, output, resilience = config.job, config.optim, config.output, config.resilience
    workload = build_workload(config)
    tokens = dataset_tokens_per_sample(workload.train) if workload.task.name == "lm" else None
    callbacks = [SummaryExtras(workload), ProgressBar(enabled=not output.no_progress and sys.stderr.isatty()),
                 Speedometer(output.log_interval, tokens_per_sample=tokens)]
    if output.log_dir:
        callbacks.append(MetricsLogger(output.log_dir))
    optimizer_params = _optimizer_params(config)
    length = dataset_len(workload.train)
    total_steps = job.epochs * -(-length // job.batch_size) if length else None
    scheduler = None if optim.lr_schedule == "constant" and not optim.warmup_steps else (
        lambda opt: build_lr_schedule(opt, kind=optim.lr_schedule, warmup_steps=optim.warmup_steps,
                                      total_steps=total_steps or optim.warmup_steps + 1,
                                      min_factor=optim.min_lr_factor))
    # A restart resumes its own run's checkpoints by itself (fit knows it restarted);
    # --resume also continues another run's with the same options.
    strategy = _build_strategy(config, env, _example_input(config, workload))
    summary = fit(workload.model, workload.train, heldout=workload.heldout, strategy=strategy,
                  epochs=job.epochs, batch_size=job.batch_size, optimizer=optim.optimizer,
                  optimizer_params=optimizer_params, loss_fn=workload.task.loss_fn,
                  loss_reduction=workload.task.loss_reduction, heldout_stats=workload.task.heldout_stats,
                  seed=job.seed, callbacks=callbacks,
                  checkpoint_dir=resilience.checkpoint_dir, checkpoint_every=resilience.checkpoint_every,
                  resume=resilience.resume, keep_checkpoints=resilience.keep_checkpoints,
                  run_identity=_run_identity(config, env.job_run_id or run_id or secrets.token_hex(8)),
                  amp=optim.amp, max_grad_norm=optim.max_grad_norm, scheduler=scheduler,
                  num_workers=config.data.loader_workers, pin_memory=config.data.pin_memory,
                  timeline=build_timeline(output.timeline, env.rank))
    return summary if strategy.is_logging_rank else None


def _example_input(config, workload):
    """One micro-batch of the training inputs, which a pipeline traces a model that is
    not ``nn.Sequential`` with (None for other strategies and models)."""
    import torch
    if not config.spec.pipelined or isinstance(workload.model, torch.nn.Sequential):
        return None
    rows = max(2, config.job.batch_size // (config.parallel.replicas * config.parallel.micro_batches))
    return torch.stack([workload.train[i][0] for i in range(min(rows, len(workload.train)))])


def _train(args: argparse.Namespace) -> int:
    env = read_env()
    config = build_run_config(args, env)
    if args.print_config:
        print(config_module.to_toml(config), end="", flush=True)
        return 0
    run_id = secrets.token_hex(8)
    server_env = {} if env.launched else _check_before_launch(config, run_id)
    servers = []
    if config.spec.uses_servers and env.under_torchrun and env.num_servers == 0:
        from paratrain.launch import start_servers_under_torchrun
        env, servers = start_servers_under_torchrun(env, config.job.servers, _server_args(config),
                                                    server_env=_torchrun_server_env(config, env),
                                                    secret=_job_secret(config))
    elif env.launched and config.comm.secret_file:   # torchrun: every rank reads the same file
        env = dataclasses.replace(env, secret=_job_secret(config))
    if env.launched or (config.job.workers == 1 and config.job.servers == 0):
        try:
            summary = run_worker(config, env, run_id)
        finally:
            if servers:   # they exit once every worker said goodbye
                from paratrain.launch import wait_children
                wait_children(servers, timeout_s=env.timeout_s)
        if summary is not None:
            if env.summary_file:
                Path(env.summary_file).write_text(json.dumps(summary))
            elif config.output.json_summary:
                print(json.dumps(summary), flush=True)
        return 0
    return _launch_workers(config, run_id, server_env)


def _torchrun_server_env(config, env: DistEnv) -> dict:
    """Under torchrun rank 0 starts the servers: what they need, from its own checks."""
    if env.rank != 0:
        return {}
    from paratrain.workloads import build_workload
    return _server_env(config, build_workload(config).model)


def _server_args(config) -> tuple:
    resilience = config.resilience
    return () if not resilience.server_snapshot_dir else (
        "--snapshot-dir", resilience.server_snapshot_dir, "--snapshot-every", str(resilience.server_snapshot_every))


def _launch_workers(config, run_id: str, server_env: dict) -> int:
    """Run the job's workers (and servers) on this machine; each reads the resolved
    config this process wrote, so they all run exactly what was checked here."""
    from paratrain.launch import LaunchConfig, launch
    job, resilience = config.job, config.resilience
    with tempfile.TemporaryDirectory(prefix="paratrain-") as tmp:
        config_file, summary_file = Path(tmp) / "run.toml", Path(tmp) / "summary.json"
        config_file.write_text(config_module.to_toml(config))
        worker_argv = [sys.executable, "-m", "paratrain.cli", "train", "--config", str(config_file)]
        # Async workers carry on without a dead peer, so only the dead one restarts;
        # lockstep strategies restart the whole group from the last checkpoint.
        policy = "worker" if config.spec.asynchronous else "group"
        server_args = _server_args(config)
        status = launch(worker_argv, LaunchConfig(num_workers=job.workers, num_servers=job.servers,
                                                  max_restarts=resilience.max_restarts, restart_policy=policy,
                                                  bind=config.comm.bind, server_args=server_args,
                                                  server_restarts=resilience.max_restarts if server_args else 0,
                                                  secret_file=config.comm.secret_file, run_id=run_id,
                                                  extra_env={"PARATRAIN_SUMMARY_FILE": str(summary_file),
                                                             **server_env},
                                                  **_elastic_launch(config)))
        if status == 0 and config.output.json_summary and summary_file.exists():
            print(summary_file.read_text(), flush=True)   # unprefixed, and the last line
    return status


def _elastic_launch(config) -> dict:
    """The launcher's per-step fault tolerance options (none without --min-workers)."""
    resilience = config.resilience
    if resilience.min_workers is None:
        return {}
    return {"min_workers": resilience.min_workers, "spares": resilience.spares,
            "heartbeat_timeout_s": resilience.heartbeat_timeout}


def _launch(args: argparse.Namespace) -> int:
    from paratrain.launch import LaunchConfig, launch
    if not args.script:
        raise ConfigError("launch needs a script: paratrain launch -n N script.py [args...]")
    config = LaunchConfig(num_workers=args.nproc, num_servers=args.servers, nnodes=args.nnodes,
                          node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port,
                          max_restarts=args.max_restarts, bind=args.bind, secret_file=args.secret_file)
    script = args.script
    argv = [sys.executable, "-m", script[2:]] if script.startswith("-m") else [sys.executable, script]
    return launch(argv + args.script_args, config)


def _report(argv: list[str]) -> int:
    from paratrain.report import main as report_main
    return report_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paratrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train a reference model (defaults: digits, CNN, 2 workers)")
    add_config_flags(train)
    launch = commands.add_parser("launch", help="run a script as N workers with the torchrun environment")
    most = config_module.MAX_LOCAL_PROCESSES
    launch.add_argument("-n", "--nproc", type=_positive("-n", most=most), default=1, help="workers on this node")
    launch.add_argument("--servers", type=_positive("--servers", zero_ok=True, most=most), default=0)
    launch.add_argument("--nnodes", type=_positive("--nnodes", most=1 << 16), default=1)
    launch.add_argument("--node-rank", type=_positive("--node-rank", zero_ok=True), default=0)
    launch.add_argument("--master-addr", default="127.0.0.1")
    launch.add_argument("--master-port", type=_positive("--master-port", zero_ok=True, most=65535), default=0)
    launch.add_argument("--max-restarts", type=_positive("--max-restarts", zero_ok=True, most=1000), default=0)
    launch.add_argument("--bind", default=None)
    launch.add_argument("--secret-file", default=None, help="the job secret (hex, mode 0600), the same file on "
                        "every node (default PARATRAIN_SECRET; one machine: a fresh one)")
    launch.add_argument("script", nargs="?", help="script.py, or -mmodule")
    launch.add_argument("script_args", nargs=argparse.REMAINDER)
    commands.add_parser("server", help="run one parameter server (reads PARATRAIN_* variables)", add_help=False)
    commands.add_parser("report", help="plots and a summary from one or more --log-dir folders", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return _report(argv[1:])
    if argv[:1] == ["server"]:   # the server parses its own arguments
        from paratrain.ps.server import run
        return run(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": _train, "launch": _launch}
    from paratrain.comm.elastic import BelowMinWorkers, JobFinished
    try:
        return handlers[args.command](args)
    except (ConfigError, TrainingDiverged) as exc:   # user error, or a run that cannot succeed: one line
        print(f"paratrain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except JobFinished as exc:   # a replacement that came after training ended
        print(f"paratrain {args.command}: {exc}", file=sys.stderr)
        return 0
    except BelowMinWorkers as exc:   # the launcher falls back to a group restart
        from paratrain.launch_elastic import EXIT_BELOW_MIN_WORKERS
        print(f"paratrain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BELOW_MIN_WORKERS
    except KeyboardInterrupt:
        return 130


def exit_without_teardown(code: int) -> None:
    """End a finished process without the interpreter's teardown.

    Workers (``python -m paratrain.cli``) have written everything by now: summary,
    metrics, checkpoints, timeline. With torch 2.13, gloo's threads (``gloo_tcp_loop``,
    ``pt_gloo_runloop``) outlive ``destroy_process_group`` and can abort the teardown
    that follows ("terminate called without an active exception", SIGABRT), which
    would report a good run as a failed job (docs/internals.md, "Process exit").
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main_without_teardown() -> None:
    """``python -m paratrain.cli``: :func:`main`, then :func:`exit_without_teardown`,
    also when it raised (the traceback is printed; the status is 1)."""
    try:
        code = main()
    except SystemExit as exc:   # argparse's --help (0) and usage errors (2), sys.exit(...)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:   # noqa: B036 -- a worker's failure still ends it without teardown
        import traceback
        traceback.print_exc()
        code = 1
    exit_without_teardown(code)


if __name__ == "__main__":
    _main_without_teardown()
