"""Odd values for every flag of ``paratrain train`` (issue 14, finding 7), run through
everything the CLI checks before it starts a process (the parser, the config tree,
paths, data, model, strategy, checkpoints): each case is refused in one line with
nothing written, or is in the frozen list of values that make a valid run. No case
may raise anything else (a traceback)."""
from __future__ import annotations

import contextlib
import io
import os

import pytest

from paratrain import cli
from paratrain.env import read_env
from paratrain.errors import ConfigError

ODD = ["", "nan", "inf", "-inf", "-1", "0", "1e308", str(2**70), "abc", "/proc/x", "FILE", "DIR"]

#: Odd-looking values that are valid, and why.
ACCEPTED = {
    "--seed 0", "--loader-workers 0", "--momentum 0", "--weight-decay 0", "--warmup-steps 0", "--max-restarts 0", "--step-delay 0",
    "--pin-memory", "--no-progress", "--json",
    # path flags: a folder or file of that name is made when the run writes it
    *{f"{flag} {value}" for flag in ("--checkpoint-dir", "--log-dir", "--timeline")
      for value in ("nan", "inf", "-1", "0", "1e308", str(2**70), "abc")},
    "--checkpoint-dir DIR", "--log-dir DIR",   # an empty folder
    "--timeline FILE",   # a file the timeline replaces
}

#: Pairs that each part alone would allow: refused together.
CONFLICTS = [
    ("--optimizer", "adam", "--momentum", "0.5"),
    ("--schedule", "gpipe"),
    ("--bind", "127.0.0.1"),
    ("--straggler", "0:nan"),
    ("--straggler", "1:2,1:3"),
    ("--strategy", "local", "--workers", "2"),
    ("--strategy", "dist_sync", "--compression", "powersgd"),
    ("--batch-size", "2000"),   # more than the 1437 training samples
    ("--checkpoint-dir", "FILE"),
    ("--timeline", "DIR", "--strategy", "local", "--workers", "1"),
    ("--keep-checkpoints", "3"),
    ("--strategy", "dist_sync", "--servers", "100000"),
]


def _train_flags() -> list:
    parser = cli.build_parser()
    train = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["train"]
    return [a for a in train._actions if a.option_strings and a.dest not in ("help", "print_config", "config")]


def _check(argv: list[str], tmp_path) -> str | None:
    """Run the CLI's checks for ``argv`` in an empty folder; None if accepted, else the
    one-line refusal. Asserts nothing was written and nothing else was raised."""
    work = tmp_path / "work"
    work.mkdir(parents=True)
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "DIR").mkdir()
    argv = [str(tmp_path / a) if a in ("FILE", "DIR") else a for a in argv]
    before = os.getcwd()
    err = io.StringIO()
    os.chdir(work)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                args = cli.build_parser().parse_args(["train", "--epochs", "1", *argv])
                cli._check_before_launch(cli.build_run_config(args, read_env()), "fuzz")
                return None
            except SystemExit as exc:   # argparse's own refusal
                assert exc.code == 2, (argv, exc.code)
                refusal = err.getvalue().strip()
            except ConfigError as exc:
                refusal = str(exc)
    finally:
        os.chdir(before)
    assert refusal and "\n" not in refusal, (argv, refusal)
    assert not os.listdir(work) and not os.listdir(tmp_path / "DIR"), (argv, os.listdir(work))
    return refusal


FLAGS = _train_flags()


@pytest.mark.parametrize("flag", [a.option_strings[0] for a in FLAGS])
def test_every_odd_value_of_every_flag_is_refused_in_one_line_or_a_valid_run(flag, tmp_path):
    action = next(a for a in FLAGS if a.option_strings[0] == flag)
    values = [None] if action.nargs == 0 else ODD
    for index, value in enumerate(values):
        case = flag if value is None else f"{flag} {value}"
        refusal = _check([flag] if value is None else [flag, value], tmp_path / str(index))
        assert (refusal is None) == (case in ACCEPTED), (case, refusal)


@pytest.mark.parametrize("argv", CONFLICTS, ids=" ".join)
def test_conflicting_or_impossible_combinations_are_refused_before_anything_starts(argv, tmp_path):
    assert _check(list(argv), tmp_path) is not None
