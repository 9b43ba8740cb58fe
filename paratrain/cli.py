"""The ``paratrain`` command: ``train``, ``launch``, ``server`` and ``report``.

``paratrain train`` validates everything it can, then either runs in this process (one
worker, no servers), or launches its workers (``--workers N``, ``--servers M``), each of
which runs ``python -m paratrain.cli train`` again with the torchrun environment. Under
``torchrun`` (``RANK`` set) it is a worker directly, so the same command serves both.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from paratrain.env import DistEnv, read_env
from paratrain.errors import ConfigError
from paratrain.strategies import strategy_spec
from paratrain.train.straggler import Straggler, parse_stragglers

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


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    from paratrain.data import DATASETS
    from paratrain.models import MODELS
    from paratrain.train import STRATEGIES
    job = parser.add_argument_group("job")
    job.add_argument("--workers", type=_positive("--workers"), default=None,
                     help="worker processes (default 2; stages*replicas for pipeline/hybrid)")
    job.add_argument("--servers", type=_positive("--servers", zero_ok=True), default=None,
                     help="parameter-server processes (default 1 for dist_*, else 0)")
    job.add_argument("--strategy", choices=STRATEGIES, default="allreduce")
    job.add_argument("--model", choices=MODELS, default="cnn")
    job.add_argument("--dataset", choices=DATASETS, default="digits")
    job.add_argument("--epochs", type=_positive("--epochs"), default=8)
    job.add_argument("--batch-size", type=_positive("--batch-size"), default=64, help="global batch size")
    job.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    job.add_argument("--lr", type=float, default=0.05)
    job.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    job.add_argument("--seed", type=int, default=0)
    comm = parser.add_argument_group("communication")
    comm.add_argument("--compression", default=None, help="fp16 | bf16 | 2bit[:threshold] | topk[:ratio] | powersgd[:rank]")
    comm.add_argument("--accumulate", type=_positive("--accumulate"), default=1, help="micro-batches per step")
    comm.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    comm.add_argument("--sync-every", type=_positive("--sync-every"), default=None, help="local SGD period H")
    comm.add_argument("--staleness", type=_positive("--staleness", zero_ok=True), default=None, help="dist_ssp bound")
    comm.add_argument("--backup-workers", type=_positive("--backup-workers", zero_ok=True), default=0,
                      help="dist_sync: apply a round once N-b workers pushed; late gradients are dropped")
    comm.add_argument("--stages", type=_positive("--stages"), default=None)
    comm.add_argument("--micro-batches", type=_positive("--micro-batches"), default=None)
    comm.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b")
    comm.add_argument("--replicas", type=_positive("--replicas"), default=1)
    out = parser.add_argument_group("output and resilience")
    out.add_argument("--checkpoint-dir", default=None)
    out.add_argument("--checkpoint-every", type=_positive("--checkpoint-every"), default=None, help="steps")
    out.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    out.add_argument("--max-restarts", type=_positive("--max-restarts", zero_ok=True), default=0)
    out.add_argument("--server-snapshot-dir", default=None,
                     help="parameter servers snapshot here; with --max-restarts a dead server resumes from it")
    out.add_argument("--server-snapshot-every", type=_positive("--server-snapshot-every"), default=None,
                     help="snapshot after at most this many applied pushes (default 100)")
    out.add_argument("--log-dir", default=None, help="metrics.jsonl and TensorBoard events")
    out.add_argument("--timeline", default=None, help="Chrome trace file (rank r writes FILE.rank<r>)")
    out.add_argument("--log-interval", type=_positive("--log-interval"), default=50, help="Speedometer period")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--bind", default=None, help="address parameter servers bind to")
    out.add_argument("--straggler", default=None, metavar="RANK:FACTOR[,...]",
                     help="simulate slow workers: each step of RANK takes FACTOR times as long")
    out.add_argument("--step-delay", type=float, default=0.0, metavar="SECONDS",
                     help="simulated extra compute per step on every worker (for straggler studies)")
    out.add_argument("--json", action="store_true", help="print the summary as one JSON line, last")
    out.add_argument("--summary-file", default=None, help=argparse.SUPPRESS)


def _resolve(args: argparse.Namespace, env: DistEnv) -> None:
    """Fill defaults that depend on other flags and check what argparse cannot."""
    spec = strategy_spec(args.strategy)
    pipelined = spec.pipelined
    if args.workers is None:
        args.workers = env.world_size if env.launched else (
            (args.stages or 2) * (args.replicas if args.strategy == "hybrid" else 1) if pipelined else 2)
    if args.servers is None:
        args.servers = 1 if spec.uses_servers else 0
    if spec.uses_servers and args.servers < 1 and not env.launched:
        raise ConfigError(f"--strategy {args.strategy} needs --servers >= 1; got --servers {args.servers}")
    if args.servers and not spec.uses_servers:
        raise ConfigError(f"--servers {args.servers} applies to dist_sync|dist_async|dist_ssp, not --strategy {args.strategy}")
    if args.replicas != 1 and args.strategy != "hybrid":
        raise ConfigError(f"--replicas {args.replicas} applies to --strategy hybrid only")
    data_world = args.replicas if pipelined else args.workers
    if args.batch_size % data_world:
        raise ConfigError(f"--batch-size {args.batch_size} is not divisible by the {data_world} data-parallel "
                          f"workers; use a multiple of {data_world}")
    if (args.resume or args.checkpoint_every) and not args.checkpoint_dir:
        raise ConfigError("--resume and --checkpoint-every need --checkpoint-dir")
    if args.resume and not any(Path(args.checkpoint_dir).glob("*.pt")):
        raise ConfigError(f"--resume: no checkpoint in --checkpoint-dir {args.checkpoint_dir!r}")
    strategy = _build_plain_strategy(args, DistEnv(world_size=args.workers))   # validates options, starts nothing

    def model_factory():
        from paratrain.data import build_dataset
        from paratrain.models import build_model
        train, _ = build_dataset(args.dataset)
        return build_model(args.model, train.sample_shape, train.num_classes, seed=args.seed)
    strategy.validate(args.batch_size, args.workers, model_factory)
    if (args.server_snapshot_dir or args.server_snapshot_every) and not spec.uses_servers:
        raise ConfigError(f"--server-snapshot-dir/--server-snapshot-every apply to dist_sync|dist_async|dist_ssp, "
                          f"not --strategy {args.strategy}")
    if args.server_snapshot_dir and args.strategy == "dist_sync" and args.max_restarts:
        raise ConfigError("--server-snapshot-dir with --strategy dist_sync --max-restarts: a dist_sync group "
                          "restarts from the workers' checkpoint with fresh servers; server snapshots are for "
                          "dist_async|dist_ssp")
    if args.server_snapshot_every and not args.server_snapshot_dir:
        raise ConfigError(f"--server-snapshot-every {args.server_snapshot_every} needs --server-snapshot-dir")
    if args.backup_workers and (args.strategy != "dist_sync" or args.backup_workers >= args.workers):
        raise ConfigError(f"--backup-workers {args.backup_workers} needs --strategy dist_sync and fewer than "
                          f"--workers {args.workers}; got --strategy {args.strategy}")
    if args.step_delay < 0:
        raise ConfigError(f"--step-delay {args.step_delay}: must be >= 0 seconds")
    slow = parse_stragglers(args.straggler)
    if any(rank >= args.workers for rank in slow):
        raise ConfigError(f"--straggler {args.straggler!r} names a rank >= --workers {args.workers}")


def _build_strategy(args: argparse.Namespace, env: DistEnv):
    strategy = _build_plain_strategy(args, env)
    factor = parse_stragglers(args.straggler).get(env.rank, 1.0)
    return Straggler(strategy, factor, args.step_delay) if factor != 1.0 or args.step_delay else strategy


def _build_plain_strategy(args: argparse.Namespace, env: DistEnv):
    from paratrain.train import build_strategy
    return build_strategy(args.strategy, compression=args.compression, accumulate=args.accumulate, amp=args.amp,
                          sync_every=args.sync_every, staleness=args.staleness, stages=args.stages,
                          micro_batches=args.micro_batches, schedule=args.schedule, replicas=args.replicas,
                          backup_workers=args.backup_workers, env=env,
                          # A dist_sync group restarts from the workers' checkpoint with fresh
                          # servers, so the optimizer and its state must live on the workers.
                          update_on_kvstore=False if args.strategy == "dist_sync" and args.max_restarts else None)


def run_worker(args: argparse.Namespace, env: DistEnv) -> dict:
    """One worker's whole job: data, model, strategy, callbacks, fit."""
    import torch
    from paratrain.data import build_dataset
    from paratrain.models import build_model
    from paratrain.timeline import build_timeline
    from paratrain.train import MetricsLogger, ProgressBar, Speedometer, fit
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")) if env.launched else torch.get_num_threads())
    train, heldout = build_dataset(args.dataset)
    model = build_model(args.model, train.sample_shape, train.num_classes, seed=args.seed)
    callbacks = [ProgressBar(enabled=not args.no_progress and sys.stderr.isatty()), Speedometer(args.log_interval)]
    if args.log_dir:
        callbacks.append(MetricsLogger(args.log_dir))
    timeline = build_timeline(args.timeline, env.rank)
    optimizer_params = {"lr": args.lr}
    if args.optimizer == "sgd":
        optimizer_params["momentum"] = args.momentum
    return fit(model, train, heldout=heldout, strategy=_build_strategy(args, env), epochs=args.epochs,
               batch_size=args.batch_size, optimizer=args.optimizer, optimizer_params=optimizer_params,
               seed=args.seed, callbacks=callbacks, checkpoint_dir=args.checkpoint_dir,
               checkpoint_every=args.checkpoint_every,
               resume=args.resume or (env.restart_count > 0 and _has_checkpoint(args)), timeline=timeline)


def _has_checkpoint(args: argparse.Namespace) -> bool:
    return bool(args.checkpoint_dir) and any(Path(args.checkpoint_dir).glob("*.pt"))


def _train(args: argparse.Namespace) -> int:
    env = read_env()
    _resolve(args, env)
    if env.launched or (args.workers == 1 and args.servers == 0):
        summary = run_worker(args, env)
        if env.rank == 0:
            if args.summary_file:
                Path(args.summary_file).write_text(json.dumps(summary))
            elif args.json:
                print(json.dumps(summary), flush=True)
        return 0
    from paratrain.launch import LaunchConfig, launch
    with tempfile.TemporaryDirectory(prefix="paratrain-") as tmp:
        summary_file = Path(tmp) / "summary.json"
        worker_argv = [sys.executable, "-m", "paratrain.cli", *sys.argv[1:], "--summary-file", str(summary_file)]
        # Async workers carry on without a dead peer, so only the dead one restarts;
        # lockstep strategies restart the whole group from the last checkpoint.
        policy = "worker" if strategy_spec(args.strategy).asynchronous else "group"
        server_args = () if not args.server_snapshot_dir else (
            "--snapshot-dir", args.server_snapshot_dir, "--snapshot-every", str(args.server_snapshot_every or 100))
        status = launch(worker_argv, LaunchConfig(num_workers=args.workers, num_servers=args.servers,
                                                  max_restarts=args.max_restarts, restart_policy=policy,
                                                  bind=args.bind, server_args=server_args,
                                                  server_restarts=args.max_restarts if server_args else 0))
        if status == 0 and args.json and summary_file.exists():
            print(summary_file.read_text(), flush=True)   # unprefixed, and the last line
    return status


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


def _server(args: argparse.Namespace) -> int:
    from paratrain.ps.server import run
    return run(args.server_args)


def _report(argv: list[str]) -> int:
    from paratrain.report import main as report_main
    return report_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paratrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train a reference model (defaults: digits, CNN, 2 workers)")
    _add_train_args(train)
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
    server = commands.add_parser("server", help="run one parameter server (reads PARATRAIN_* variables)")
    server.add_argument("server_args", nargs=argparse.REMAINDER, help="--snapshot-dir DIR, --snapshot-every N, ...")
    commands.add_parser("report", help="plots and a summary from one or more --log-dir folders", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return _report(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": _train, "launch": _launch, "server": _server}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:   # user error: one line, no traceback
        print(f"paratrain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
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


if __name__ == "__main__":
    exit_without_teardown(main())
