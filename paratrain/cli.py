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
import json
import os
import sys
import tempfile
import typing
from pathlib import Path

from paratrain import config as config_module
from paratrain.env import DistEnv, read_env
from paratrain.errors import ConfigError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, with no usage dump."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive(name: str, *, zero_ok: bool = False):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: must be an integer") from None
        if value < (0 if zero_ok else 1):
            raise argparse.ArgumentTypeError(f"{name} {value}: must be >= {0 if zero_ok else 1}")
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


def _check_before_launch(config) -> None:
    """What can be checked only with the data, the model and the file system, before
    anything starts."""
    from paratrain.data.loading import dataset_len
    from paratrain.workloads import build_workload
    config_module.check_paths(config)
    resilience = config.resilience
    if resilience.resume and not any(Path(resilience.checkpoint_dir).glob("*.pt")):
        raise ConfigError(f"--resume: no checkpoint in --checkpoint-dir {resilience.checkpoint_dir!r}")
    workload = build_workload(config)
    config_module.check_batch(config, dataset_len(workload.train))
    # Builds the strategy (its own checks) and validates it against the model; starts nothing.
    _build_strategy(config, DistEnv(world_size=config.job.workers)).validate(
        config.job.batch_size, config.job.workers, lambda: workload.model)


def _build_strategy(config, env: DistEnv):
    from paratrain.train import build_strategy
    from paratrain.train.straggler import Straggler
    # A dist_sync group restarts from the workers' checkpoint with fresh servers, so the
    # optimizer and its state must live on the workers.
    workers_optimize = config.job.strategy == "dist_sync" and config.resilience.max_restarts > 0
    strategy = build_strategy(config, env=env, update_on_kvstore=False if workers_optimize else None)
    factor = config_module.parse_stragglers(config.output.straggler).get(env.rank, 1.0)
    step_delay = config.output.step_delay
    return Straggler(strategy, factor, step_delay) if factor != 1.0 or step_delay else strategy


def run_worker(config, env: DistEnv) -> dict | None:
    """One worker's whole job: workload (data, model, task), strategy, callbacks, fit.
    Returns the run's summary on the worker that reports it (the logging rank), None
    elsewhere."""
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
    optimizer_params = {"lr": optim.lr}
    if optim.momentum is not None:
        optimizer_params["momentum"] = optim.momentum
    if optim.weight_decay is not None:
        optimizer_params["weight_decay"] = optim.weight_decay
    if optim.beta1 is not None or optim.beta2 is not None:
        optimizer_params["betas"] = (0.9 if optim.beta1 is None else optim.beta1,
                                     0.999 if optim.beta2 is None else optim.beta2)
    resume = resilience.resume or (env.restart_count > 0 and _has_checkpoint(resilience.checkpoint_dir))
    length = dataset_len(workload.train)
    total_steps = job.epochs * -(-length // job.batch_size) if length else None
    scheduler = None if optim.lr_schedule == "constant" and not optim.warmup_steps else (
        lambda opt: build_lr_schedule(opt, kind=optim.lr_schedule, warmup_steps=optim.warmup_steps,
                                      total_steps=total_steps or optim.warmup_steps + 1,
                                      min_factor=optim.min_lr_factor))
    strategy = _build_strategy(config, env)
    summary = fit(workload.model, workload.train, heldout=workload.heldout, strategy=strategy,
                  epochs=job.epochs, batch_size=job.batch_size, optimizer=optim.optimizer,
                  optimizer_params=optimizer_params, loss_fn=workload.task.loss_fn,
                  loss_reduction=workload.task.loss_reduction, seed=job.seed, callbacks=callbacks,
                  checkpoint_dir=resilience.checkpoint_dir, checkpoint_every=resilience.checkpoint_every,
                  resume=resume, amp=optim.amp, max_grad_norm=optim.max_grad_norm, scheduler=scheduler,
                  num_workers=config.data.loader_workers, pin_memory=config.data.pin_memory,
                  timeline=build_timeline(output.timeline, env.rank))
    return summary if strategy.is_logging_rank else None


def _has_checkpoint(directory: str | None) -> bool:
    return bool(directory) and any(Path(directory).glob("*.pt"))


def _train(args: argparse.Namespace) -> int:
    env = read_env()
    config = build_run_config(args, env)
    if args.print_config:
        print(config_module.to_toml(config), end="", flush=True)
        return 0
    if not env.launched:
        _check_before_launch(config)
    servers = []
    if config.spec.uses_servers and env.under_torchrun and env.num_servers == 0:
        from paratrain.launch import start_servers_under_torchrun
        env, servers = start_servers_under_torchrun(env, config.job.servers, _server_args(config))
    if env.launched or (config.job.workers == 1 and config.job.servers == 0):
        try:
            summary = run_worker(config, env)
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
    return _launch_workers(config)


def _server_args(config) -> tuple:
    resilience = config.resilience
    return () if not resilience.server_snapshot_dir else (
        "--snapshot-dir", resilience.server_snapshot_dir, "--snapshot-every", str(resilience.server_snapshot_every))


def _launch_workers(config) -> int:
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
                                                  extra_env={"PARATRAIN_SUMMARY_FILE": str(summary_file)},
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
                          max_restarts=args.max_restarts, bind=args.bind)
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
    launch.add_argument("-n", "--nproc", type=_positive("-n"), default=1, help="workers on this node")
    launch.add_argument("--servers", type=_positive("--servers", zero_ok=True), default=0)
    launch.add_argument("--nnodes", type=_positive("--nnodes"), default=1)
    launch.add_argument("--node-rank", type=_positive("--node-rank", zero_ok=True), default=0)
    launch.add_argument("--master-addr", default="127.0.0.1")
    launch.add_argument("--master-port", type=_positive("--master-port", zero_ok=True), default=0)
    launch.add_argument("--max-restarts", type=_positive("--max-restarts", zero_ok=True), default=0)
    launch.add_argument("--bind", default=None)
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
    except ConfigError as exc:   # user error: one line, no traceback
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
    except BaseException:   # noqa: B036 -- a worker's failure still ends it without teardown
        import traceback
        traceback.print_exc()
        code = 1
    exit_without_teardown(code)


if __name__ == "__main__":
    _main_without_teardown()
