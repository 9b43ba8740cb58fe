"""``paratrain report LOGDIR [LOGDIR ...] [--out DIR]``: plots and a summary of runs.

Reads each run's ``metrics.jsonl`` (the format is in docs/internals.md) and writes PNG
plots with matplotlib's Agg backend (no display needed):

* ``loss.png``       loss against step and against wall time (train lines, eval dots)
* ``accuracy.png``   held-out accuracy (eval) and batch accuracy (train, faint)
* ``throughput.png`` samples/sec against step (raw, faint, and a moving average)
* ``bytes.png``      bytes on the wire: cumulative and per step

Several runs share each plot; the legend names them by their run directory. A short
text summary is printed and written to ``DIR/summary.txt``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

from paratrain.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
MOVING_AVERAGE_STEPS = 20


@dataclass
class Run:
    """One run's metrics, split by kind."""

    label: str
    path: str
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    skipped_lines: int = 0

    @property
    def strategy(self) -> str:
        for record in [self.summary, *self.train[:1]]:
            if record.get("strategy"):
                return str(record["strategy"])
        return "?"


def find_metrics_files(logdir: str) -> list[str]:
    """``logdir/metrics.jsonl``, or else those of its direct subdirectories (so
    ``paratrain report runs/`` compares every run kept under ``runs/``)."""
    if not os.path.isdir(logdir):
        raise ConfigError(f"LOGDIR={logdir!r} is not a directory")
    direct = os.path.join(logdir, METRICS_FILE)
    if os.path.isfile(direct):
        return [direct]
    nested = sorted(os.path.join(logdir, name, METRICS_FILE) for name in os.listdir(logdir))
    found = [path for path in nested if os.path.isfile(path)]
    if not found:
        raise ConfigError(f"LOGDIR={logdir!r} has no {METRICS_FILE} (nor do its subdirectories); "
                          f"write one with `paratrain train --log-dir {logdir}`")
    return found


def load_run(metrics_path: str, label: str) -> Run:
    """Parse one ``metrics.jsonl``. Lines that do not parse (a run killed mid-write)
    are skipped and counted, not fatal."""
    run = Run(label=label, path=metrics_path)
    with open(metrics_path) as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                run.skipped_lines += 1
                continue
            if not isinstance(record, dict):
                run.skipped_lines += 1
                continue
            kind = record.get("kind")
            if kind == "train":
                run.train.append(record)
            elif kind == "eval":
                run.eval.append(record)
            elif kind == "summary":
                run.summary = record
            else:
                run.skipped_lines += 1
    if not run.train and not run.eval and not run.summary:
        raise ConfigError(f"{metrics_path!r} holds no train, eval or summary records")
    return run


def load_runs(logdirs: list[str]) -> list[Run]:
    """Every run under ``logdirs``, labelled by its directory name (made unique)."""
    paths = [path for logdir in logdirs for path in find_metrics_files(logdir)]
    labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    if len(set(labels)) < len(labels):  # same basename twice: use the longer path
        labels = [os.path.relpath(os.path.dirname(os.path.abspath(p))) for p in paths]
    return [load_run(path, label) for path, label in zip(paths, labels)]


def _series(records: list[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    points = [(r[x_key], r[y_key]) for r in records
              if _is_number(r.get(x_key)) and _is_number(r.get(y_key))]
    return [p[0] for p in points], [p[1] for p in points]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (shorter at the start)."""
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    averages, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averages.append(total / min(index + 1, window))
    return averages


def cumulative(values: list[float]) -> list[float]:
    """Running sum of ``values``."""
    sums, total = [], 0.0
    for value in values:
        total += value
        sums.append(total)
    return sums


# -- plots ---------------------------------------------------------------------

def _new_figure(title: str, columns: int):
    import matplotlib
    matplotlib.use("Agg")  # files only: works without a display, in any process
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=(6 * columns, 4.2), squeeze=False)
    figure.suptitle(title)
    return figure, list(axes[0])


def _finish(figure, axes, path: str) -> str:
    import matplotlib.pyplot as plt

    for axis in axes:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_metric(runs: list[Run], metric: str, title: str, path: str) -> str:
    """``metric`` against step (left) and wall time (right); train as lines,
    eval as dots in the same colour."""
    figure, axes = _new_figure(title, 2)
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        for axis, x_key in zip(axes, ("step", "wall_s")):
            x, y = _series(run.train, x_key, metric)
            if x:
                faint = metric == "accuracy"  # batch accuracy is noisy; eval is the story
                axis.plot(x, y, color=colour, alpha=0.35 if faint else 0.9, linewidth=1,
                          label=f"{run.label} train")
            x, y = _series(run.eval, x_key, metric)
            if x:
                axis.plot(x, y, "o-", color=colour, markersize=4, label=f"{run.label} eval")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall time (s)")
    for axis in axes:
        axis.set_ylabel(metric)
    return _finish(figure, axes, path)


def plot_throughput(runs: list[Run], path: str) -> str:
    """samples/sec against step and wall time: raw (faint) and a moving average."""
    figure, axes = _new_figure("throughput", 2)
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        for axis, x_key in zip(axes, ("step", "wall_s")):
            x, y = _series(run.train, x_key, "samples_per_sec")
            if x:
                axis.plot(x, y, color=colour, alpha=0.25, linewidth=0.8)
                axis.plot(x, moving_average(y, MOVING_AVERAGE_STEPS), color=colour,
                          label=f"{run.label} ({MOVING_AVERAGE_STEPS}-step mean)")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall time (s)")
    for axis in axes:
        axis.set_ylabel("samples/sec")
    return _finish(figure, axes, path)


def plot_bytes(runs: list[Run], path: str) -> str:
    """Bytes rank 0 put on the wire: cumulative (left) and per step (right)."""
    figure, axes = _new_figure("bytes on the wire (rank 0)", 2)
    for index, run in enumerate(runs):
        x, y = _series(run.train, "step", "bytes_sent")
        if x:
            colour = f"C{index % 10}"
            axes[0].plot(x, [b / 1e6 for b in cumulative(y)], color=colour, label=run.label)
            axes[1].plot(x, [b / 1e3 for b in y], color=colour, label=run.label)
    axes[0].set_ylabel("MB sent so far")
    axes[1].set_ylabel("kB sent in the step")
    for axis in axes:
        axis.set_xlabel("step")
    return _finish(figure, axes, path)


def write_plots(runs: list[Run], out_dir: str) -> list[str]:
    """Write every plot into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    return [
        plot_metric(runs, "loss", "loss", os.path.join(out_dir, "loss.png")),
        plot_metric(runs, "accuracy", "accuracy", os.path.join(out_dir, "accuracy.png")),
        plot_throughput(runs, os.path.join(out_dir, "throughput.png")),
        plot_bytes(runs, os.path.join(out_dir, "bytes.png")),
    ]


# -- summary -------------------------------------------------------------------

def summarize(run: Run) -> dict:
    """The headline numbers of one run; the summary line wins where it has them."""
    last_train = run.train[-1] if run.train else {}
    last_eval = run.eval[-1] if run.eval else {}
    speeds = [r["samples_per_sec"] for r in run.train if _is_number(r.get("samples_per_sec"))]
    sent = [r["bytes_sent"] for r in run.train if _is_number(r.get("bytes_sent"))]
    return {
        "run": run.label,
        "strategy": run.strategy,
        "steps": run.summary.get("steps", last_train.get("step")),
        "wall_s": run.summary.get("wall_s", last_train.get("wall_s")),
        "final_loss": run.summary.get("final_loss", last_train.get("loss")),
        "eval_loss": last_eval.get("loss"),
        "accuracy": run.summary.get("accuracy", last_eval.get("accuracy")),
        "samples_per_sec": run.summary.get(
            "samples_per_sec", statistics.median(speeds) if speeds else None),
        "mb_sent": sum(sent) / 1e6 if sent else None,
    }


def _format(value, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_text(runs: list[Run]) -> str:
    """A fixed-width table, one line per run, plus notes on skipped lines."""
    columns = [("run", 0), ("strategy", 0), ("steps", 0), ("wall_s", 1), ("final_loss", 4),
               ("eval_loss", 4), ("accuracy", 4), ("samples_per_sec", 1), ("mb_sent", 2)]
    rows = [[_format(summarize(run)[name], digits) for name, digits in columns] for run in runs]
    header = [name for name, _ in columns]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    for run in runs:
        if run.skipped_lines:
            lines.append(f"note: {run.path}: skipped {run.skipped_lines} unreadable line(s)")
    return "\n".join(lines) + "\n"


# -- command line --------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paratrain report",
        description="Plot and summarise the metrics.jsonl of one or more runs.")
    parser.add_argument("logdirs", nargs="+", metavar="LOGDIR",
                        help="a run's --log-dir, or a directory whose subdirectories are runs")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where plots and summary.txt go (default: LOGDIR/report for one "
                             "run, ./report for several)")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``paratrain report``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        runs = load_runs(args.logdirs)
    except ConfigError as error:
        print(f"paratrain report: error: {error}", file=sys.stderr)
        return 2
    out_dir = args.out or (os.path.join(args.logdirs[0], "report") if len(runs) == 1 else "report")
    paths = write_plots(runs, out_dir)
    text = summary_text(runs)
    with open(os.path.join(out_dir, "summary.txt"), "w") as handle:
        handle.write(text)
    print(text, end="")
    print("plots: " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
