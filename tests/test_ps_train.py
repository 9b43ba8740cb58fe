"""Training through the parameter server, end to end through the CLI (launcher,
servers, Trainer with ParameterServerSync), plus the sync object's contract."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from paratrain.errors import ConfigError
from paratrain.optimizers import server_optimizer_spec


def _train(*flags: str, timeout_s: int = 400) -> dict:
    cmd = [sys.executable, "-m", "paratrain.cli", "train", "--no-progress", "--json", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(450)
def test_dist_async_trains_the_digits_cnn_on_four_workers():
    result = _train("--strategy", "dist_async", "--servers", "1", "--workers", "4", "--model", "cnn")
    assert result["accuracy"] >= 0.93, result


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_dist_ssp_trains_the_digits_cnn_with_staleness_two():
    # 12 epochs: async updates depend on timing, and 8 left this near the threshold
    # on a loaded machine (it failed once at 8 epochs).
    result = _train("--strategy", "dist_ssp", "--staleness", "2", "--servers", "2", "--workers", "4",
                    "--model", "cnn", "--epochs", "12")
    assert result["accuracy"] >= 0.93, result


def test_server_optimizer_spec_maps_torch_names_and_refuses_the_rest():
    assert server_optimizer_spec("SGD", {"lr": 0.1, "momentum": 0.9}) == {"type": "sgd", "lr": 0.1, "momentum": 0.9}
    assert server_optimizer_spec("adam", {"lr": 1e-3, "betas": (0.9, 0.99)})["betas"] == (0.9, 0.99)
    assert server_optimizer_spec("adamw", {"lr": 1e-3})["type"] == "adamw"   # decoupled decay, on the servers too
    with pytest.raises(ConfigError, match="rmsprop"):
        server_optimizer_spec("rmsprop", {})
    with pytest.raises(ConfigError, match="dampening"):
        server_optimizer_spec("sgd", {"lr": 0.1, "dampening": 0.5})
