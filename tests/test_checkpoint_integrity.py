"""Checkpoints that cannot lie (issue 14, findings 1 and 2): each is sealed with a
sha256 and named by its run; the newest K are kept; a damaged one is never loaded
silently; a restart takes only its own job's files, falling back past a damaged one
and saying so; a folder of another run is refused in one line, exit 2, before
anything starts. Files and fit in this process (strategy local); the CLI checks run
in-process too (they refuse before launching); SIGKILLs hit real processes."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import cli_in_process

import paratrain
from paratrain import cli
from paratrain.train import checkpoint as ckpt
from paratrain.train.checkpoint import CheckpointError, RunIdentity

REPO = Path(__file__).resolve().parent.parent
MINE = RunIdentity("run-a", {"lr": 0.1, "seed": 0})
X = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
Y = (X[:, 0] > 0).long()


def _save(directory, step, identity=MINE, keep=2, value=None):
    state = {"w": torch.full((100,), float(step if value is None else value)), "step": step}
    return ckpt.save_checkpoint(state, directory, "model", step=step, identity=identity, keep=keep)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "bytes":        # 200 random bytes in the last 3/4, as the adversarial pass did
        rng = random.Random(0)
        for _ in range(200):
            data[rng.randrange(len(data) // 4, len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(bytes(data[:len(data) // 2]))
    elif how == "empty":
        path.write_bytes(b"")
    else:                     # foreign: another program's file of the same size under the same name
        path.write_bytes((b"\x00not a checkpoint\xff" * len(data))[:len(data)])


# -- the files ---------------------------------------------------------------------------------


def test_save_keeps_the_newest_k_with_their_hashes_and_leaves_nothing_else(tmp_path):
    for step in (5, 10, 15, 20):
        _save(tmp_path, step, keep=3)
    manifest = ckpt.read_manifest(tmp_path, "model")
    assert [e.step for e in manifest.entries] == [20, 15, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-0000000010.pt", "model-0000000015.pt",
                                                          "model-0000000020.pt", "model.json"]
    for entry in manifest.entries:
        assert entry.run_id == "run-a" and entry.options_hash == MINE.options_hash
        assert torch.all(ckpt.load_entry(tmp_path, entry)["w"] == entry.step)
    # A plain torch.load still reads every file (weights_only).
    assert torch.load(tmp_path / "model-0000000020.pt", weights_only=True)["step"] == 20


@pytest.mark.parametrize("how", ["bytes", "truncated", "empty", "foreign"])
def test_a_damaged_file_is_named_in_one_line_never_loaded(tmp_path, how):
    path = _save(tmp_path, 7)
    _damage(path, how)
    entry = ckpt.read_manifest(tmp_path, "model").entries[0]
    with pytest.raises(CheckpointError) as caught:
        ckpt.load_entry(tmp_path, entry)
    text = str(caught.value)
    assert str(path) in text and "\n" not in text
    assert ("sha256" in text) if how in ("bytes", "foreign") else ("bytes, but" in text)


def test_a_damaged_manifest_or_an_unsealed_file_is_refused(tmp_path):
    _save(tmp_path, 3)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest .*model.json is damaged"):
        ckpt.read_manifest(tmp_path, "model")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"strategy": {}}, legacy / "model.pt")
    with pytest.raises(CheckpointError, match="without a content hash"):
        ckpt.check_directory(legacy, MINE, resume=True)


def test_choosing_a_checkpoint_restart_falls_back_resume_refuses(tmp_path):
    for step in (10, 20):
        _save(tmp_path, step)
    _damage(tmp_path / "model-0000000020.pt", "bytes")
    choice = ckpt.choose_checkpoint(tmp_path, MINE, adopt=False, restarting=True)
    assert choice.step == 10 and "model-0000000020.pt does not match its sha256" in choice.skipped[0]
    with pytest.raises(CheckpointError, match="model-0000000020.pt does not match its sha256"):
        ckpt.choose_checkpoint(tmp_path, MINE, adopt=True, restarting=False)
    _damage(tmp_path / "model-0000000010.pt", "truncated")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ckpt.choose_checkpoint(tmp_path, MINE, adopt=False, restarting=True)


def test_a_restart_takes_only_its_own_runs_files(tmp_path):
    _save(tmp_path, 40, identity=RunIdentity("old-run", MINE.options))
    other_options = RunIdentity("run-a", {"lr": 0.3, "seed": 0})
    assert ckpt.choose_checkpoint(tmp_path, MINE, adopt=False, restarting=True) is None
    assert ckpt.choose_checkpoint(tmp_path, MINE, adopt=True, restarting=False).step == 40
    assert ckpt.choose_checkpoint(tmp_path, other_options, adopt=True, restarting=False) is None


def test_a_folder_of_another_run_is_refused_naming_the_differences(tmp_path):
    _save(tmp_path, 40, identity=RunIdentity("old-run", {"lr": 0.05, "seed": 0}))
    new = RunIdentity("new-run", {"lr": 0.3, "seed": 0})
    with pytest.raises(CheckpointError, match=r"holds run old-run's checkpoint \(step 40; --lr 0.05 there, 0.3 "
                                              r"here\): give --resume"):
        ckpt.check_directory(tmp_path, new, resume=False)
    with pytest.raises(CheckpointError, match=r"--resume: .* other options \(--lr 0.05 there, 0.3 here\)"):
        ckpt.check_directory(tmp_path, new, resume=True)
    ckpt.check_directory(tmp_path, RunIdentity("new-run", {"lr": 0.05, "seed": 0}), resume=True)
    with pytest.raises(CheckpointError, match="same options"):
        ckpt.check_directory(tmp_path, RunIdentity("new-run", {"lr": 0.05, "seed": 0}), resume=False)


@pytest.mark.timeout(120)
def test_sigkill_during_checkpoint_writes_every_load_succeeds_or_falls_back(tmp_path):
    """SIGKILL a process that checkpoints every step (a 4 MB state, keep 2), 4 times at
    random instants; after each kill, whichever instant it landed, a restart finds a
    complete checkpoint: the newest, or the one before it, saying so."""
    code = textwrap.dedent(f"""
        import torch
        from paratrain.train import checkpoint as ckpt
        identity = ckpt.RunIdentity("run-a", {{"lr": 0.1}})
        manifest = ckpt.read_manifest({str(tmp_path)!r}, "model")
        step = manifest.entries[0].step if manifest.entries else 0
        while True:
            step += 1
            ckpt.save_checkpoint({{"w": torch.full((1_000_000,), float(step)), "step": step}}, {str(tmp_path)!r},
                                 "model", step=step, identity=identity, keep=2)
            if step % 2 == 0:
                print(step, flush=True)
    """)
    rng, steps_seen = random.Random(5), []
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
        try:
            proc.stdout.readline()
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        choice = ckpt.choose_checkpoint(tmp_path, RunIdentity("run-a", {"lr": 0.1}), adopt=False, restarting=True)
        state = ckpt.load_entry(tmp_path, choice.entries["model"])
        assert torch.all(state["w"] == float(state["step"])) and state["step"] == choice.step
        steps_seen.append(choice.step)
    assert steps_seen == sorted(steps_seen) and len(set(steps_seen)) == 4
    # what a kill cut short is swept by the next save
    _save(tmp_path, 10_000, identity=RunIdentity("run-a", {"lr": 0.1}))
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- fit ---------------------------------------------------------------------------------------


def _fit(directory, lr=0.1, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    return paratrain.fit(model, TensorDataset(X, Y), strategy="local", epochs=2, batch_size=16,
                         optimizer_params={"lr": lr}, checkpoint_dir=str(directory), checkpoint_every=2, **options)


def test_fit_restart_falls_back_past_a_damaged_newest_checkpoint_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PARATRAIN_RUN_ID", "job-1")
    straight = _fit(tmp_path / "straight")
    _fit(tmp_path / "ck")
    newest = ckpt.read_manifest(tmp_path / "ck", "model").entries[0]
    _damage(tmp_path / "ck" / newest.file, "bytes")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")   # the launcher restarted this job
    resumed = _fit(tmp_path / "ck")
    assert f"{newest.file} does not match its sha256 (changed after it was written: corrupt); falling back to " \
           f"the checkpoint of step {newest.step - 2}" in caplog.text
    assert resumed["param_checksum"] == straight["param_checksum"] and resumed["steps"] == straight["steps"]


def test_fit_restarted_before_its_first_checkpoint_never_adopts_another_runs(tmp_path, monkeypatch):
    """Finding 1: a finished run left its checkpoints; a new run (another lr) in the
    same folder is restarted before its first save. It starts afresh: it never resumes
    the old run's parameters."""
    monkeypatch.setenv("PARATRAIN_RUN_ID", "old")
    old = _fit(tmp_path, lr=0.3)
    monkeypatch.setenv("PARATRAIN_RUN_ID", "new")
    with pytest.raises(CheckpointError, match="holds run old's checkpoint .*--optimizer-params"):
        _fit(tmp_path)    # a fresh run is refused before it trains
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = _fit(tmp_path)   # a restart of run "new", which saved nothing yet: from scratch
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    monkeypatch.setenv("PARATRAIN_RUN_ID", "straight")
    straight = _fit(tmp_path / "straight")
    assert restarted["param_checksum"] == straight["param_checksum"] != old["param_checksum"]


# -- the CLI, before anything starts -------------------------------------------------------------


def _cli(*argv):
    code, _, err = cli_in_process("train", "--model", "mlp", "--epochs", "1", "--workers", "2", *argv)
    return code, err


@pytest.mark.parametrize("how", ["bytes", "truncated", "empty", "foreign"])
def test_resume_from_a_damaged_checkpoint_is_one_line_exit_2(tmp_path, how):
    options = cli.build_run_config(cli.build_parser().parse_args(
        ["train", "--model", "mlp", "--epochs", "1", "--workers", "2", "--checkpoint-dir", str(tmp_path)]),
        cli.read_env())
    identity = RunIdentity("earlier", paratrain.config.resume_options(options))
    path = _save(tmp_path, 23, identity=identity)
    _damage(path, how)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = _cli("--checkpoint-dir", str(tmp_path), "--resume", "--epochs", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # nothing written


def test_a_new_run_in_another_runs_folder_is_refused_before_it_starts(tmp_path):
    """Finding 1 at the door: the folder holds a finished run's checkpoint; a run with
    --lr 0.3 in the same folder without --resume is refused in one line naming the
    difference, and nothing starts."""
    old = cli.build_run_config(cli.build_parser().parse_args(
        ["train", "--model", "mlp", "--epochs", "1", "--workers", "2"]), cli.read_env())
    _save(tmp_path, 23, identity=RunIdentity("finished", paratrain.config.resume_options(old)))
    code, err = _cli("--checkpoint-dir", str(tmp_path), "--lr", "0.3")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds run finished's checkpoint (step 23; --lr 0.05 there, 0.3 here): give --resume" in err
    code, err = _cli("--checkpoint-dir", str(tmp_path), "--lr", "0.3", "--resume")
    assert code == 2 and "written with other options (--lr 0.05 there, 0.3 here)" in err
