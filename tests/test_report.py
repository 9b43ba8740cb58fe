"""``paratrain report``: reading metrics.jsonl, the summary table, and the PNG plots."""
from __future__ import annotations

import json
import math

import pytest

from paratrain.errors import ConfigError
from paratrain.report import cumulative, load_runs, main, moving_average, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's C0 and C1


def _write_run(directory, *, strategy: str, steps: int, speed: float, bytes_per_step: int,
               decay: float, garbage_tail: bool = False) -> None:
    directory.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        record = {"kind": "train", "step": step, "epoch": (step - 1) // 10, "wall_s": step / speed * 32,
                  "loss": 2.3 * math.exp(-decay * step), "accuracy": min(1.0, step / steps),
                  "samples_per_sec": speed, "bytes_sent": bytes_per_step, "lr": 0.1}
        if step == 1:
            record["strategy"] = strategy
        lines.append(json.dumps(record))
        if step % 10 == 0:
            lines.append(json.dumps({"kind": "eval", "step": step, "epoch": step // 10 - 1,
                                     "wall_s": step / speed * 32, "loss": 2.0 * math.exp(-decay * step),
                                     "accuracy": 0.5 + 0.4 * step / steps}))
    lines.append(json.dumps({"kind": "summary", "strategy": strategy, "steps": steps,
                             "wall_s": steps / speed * 32, "final_loss": 2.3 * math.exp(-decay * steps),
                             "accuracy": 0.9, "samples_per_sec": speed}))
    text = "\n".join(lines) + "\n"
    if garbage_tail:
        text += '{"kind": "train", "step": 99, "lo'  # a run killed mid-write
    (directory / "metrics.jsonl").write_text(text)


def _colour_pixels(png_path, rgb) -> int:
    import matplotlib.image

    image = matplotlib.image.imread(str(png_path))[..., :3] * 255
    distance = abs(image - rgb).sum(axis=-1)
    return int((distance < 40).sum())


@pytest.fixture
def two_runs(tmp_path):
    _write_run(tmp_path / "runs" / "allreduce", strategy="allreduce", steps=40, speed=800.0,
               bytes_per_step=100_000, decay=0.05)
    _write_run(tmp_path / "runs" / "dist_sync", strategy="dist_sync", steps=40, speed=400.0,
               bytes_per_step=200_000, decay=0.03, garbage_tail=True)
    return tmp_path / "runs"


def test_report_on_two_runs_writes_plots_with_both_runs_and_a_summary(two_runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(two_runs / "allreduce"), str(two_runs / "dist_sync"), "--out", str(out)]) == 0
    for name in ("loss", "accuracy", "throughput", "bytes"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        # each run is drawn in its own colour: the plot really holds both
        assert _colour_pixels(png, BLUE) > 100, name
        assert _colour_pixels(png, ORANGE) > 100, name
    summary = (out / "summary.txt").read_text()
    assert summary == capsys.readouterr().out.split("plots: ")[0]
    header, first, second, note = summary.strip().splitlines()
    assert header.split() == ["run", "strategy", "steps", "wall_s", "final_loss", "eval_loss",
                              "accuracy", "samples_per_sec", "mb_sent"]
    assert first.split()[:3] == ["allreduce", "allreduce", "40"]
    assert second.split()[:3] == ["dist_sync", "dist_sync", "40"]
    assert first.split()[-2:] == ["800.0", "4.00"]  # 40 steps x 100 kB
    assert second.split()[-2:] == ["400.0", "8.00"]
    assert "skipped 1 unreadable line" in note and "dist_sync" in note


def test_a_directory_of_runs_is_expanded_and_labelled_by_run_dir(two_runs):
    runs = load_runs([str(two_runs)])
    assert [run.label for run in runs] == ["allreduce", "dist_sync"]
    assert [len(run.train) for run in runs] == [40, 40]
    assert [len(run.eval) for run in runs] == [4, 4]
    assert runs[1].skipped_lines == 1


def test_one_run_defaults_to_a_report_dir_inside_it(two_runs, capsys):
    assert main([str(two_runs / "allreduce")]) == 0
    assert (two_runs / "allreduce" / "report" / "loss.png").exists()
    assert "allreduce" in (two_runs / "allreduce" / "report" / "summary.txt").read_text()


def test_summary_falls_back_to_train_and_eval_records_without_a_summary_line(tmp_path):
    run_dir = tmp_path / "partial"
    run_dir.mkdir()
    records = [{"kind": "train", "step": s, "wall_s": s * 0.5, "loss": 1.0 / s,
                "samples_per_sec": float(s * 100), "bytes_sent": 10, "strategy": "local"}
               for s in (1, 2, 3)]
    records.append({"kind": "eval", "step": 3, "loss": 0.4, "accuracy": 0.75})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (run,) = load_runs([str(run_dir)])
    summary = summarize(run)
    assert summary["steps"] == 3 and summary["wall_s"] == 1.5
    assert summary["final_loss"] == pytest.approx(1 / 3)
    assert summary["accuracy"] == 0.75 and summary["eval_loss"] == 0.4
    assert summary["samples_per_sec"] == 200.0  # median of the steps
    assert summary["mb_sent"] == pytest.approx(30e-6)
    assert summary["strategy"] == "local"


def test_same_named_run_dirs_get_distinct_labels(tmp_path):
    for parent in ("a", "b"):
        _write_run(tmp_path / parent / "run", strategy="local", steps=3, speed=1.0,
                   bytes_per_step=0, decay=0.1)
    labels = [run.label for run in load_runs([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")])]
    assert len(set(labels)) == 2 and all(label.endswith("run") for label in labels)


def test_bad_logdirs_give_a_clear_error_and_exit_status_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    error = capsys.readouterr().err
    assert "LOGDIR=" in error and "nope" in error and "is not a directory" in error
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="has no metrics.jsonl"):
        load_runs([str(empty)])
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "metrics.jsonl").write_text("not json\n[1, 2]\n")
    with pytest.raises(ConfigError, match="holds no train, eval or summary records"):
        load_runs([str(junk)])
    with pytest.raises(SystemExit):
        main([])  # argparse: LOGDIR is required


def test_helpers():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert cumulative([1.0, 2.0, 3.0]) == [1.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="window=0"):
        moving_average([1.0], 0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_on_two_real_runs(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = {**os.environ, "PARATRAIN_TIMEOUT": "60", "PYTHONPATH": str(root)}
    for name, extra in (("plain", []), ("twobit", ["--compression", "2bit"])):
        result = subprocess.run(
            [sys.executable, "-m", "paratrain.cli", "train", "--workers", "2", "--strategy", "allreduce",
             "--model", "mlp", "--epochs", "1", "--no-progress", "--log-dir", str(tmp_path / "runs" / name),
             *extra], capture_output=True, text=True, timeout=200, cwd=root, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = subprocess.run([sys.executable, "-m", "paratrain.cli", "report", str(tmp_path / "runs"),
                             "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert report.returncode == 0, report.stderr
    for name in ("loss", "accuracy", "throughput", "bytes"):
        assert (tmp_path / "report" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    runs = {run.label: summarize(run) for run in load_runs([str(tmp_path / "runs")])}
    assert set(runs) == {"plain", "twobit"} and runs["plain"]["steps"] == 23
    # 2-bit codes put far fewer bytes on the wire than float32 gradients
    assert runs["twobit"]["mb_sent"] * 8 < runs["plain"]["mb_sent"]
    assert "plain" in report.stdout and "twobit" in report.stdout
