"""Run several ``paratrain train`` configurations one after another in the same
launched workers: ``paratrain launch -n N train_many_worker.py RUNS.json OUT_DIR``.

RUNS.json is a list of ``{"name": ..., "options": {option: value, ...}}``; each run
goes through the CLI's own path (the typed config, ``cli.run_worker``, fit), with
``--log-dir OUT_DIR/<name>``. Only process start-up and the process group are shared,
which on a 2-core machine cost more than training the digits CNN itself. Rank 0 writes
``OUT_DIR/<name>/summary.json`` after each run.
"""
import json
import sys
import time
from pathlib import Path

import torch

from paratrain import cli
from paratrain import config as cfg
from paratrain.comm.process_group import init_process_group
from paratrain.env import read_env

torch.set_num_threads(1)
env = read_env()
init_process_group(env)   # owned here, so every fit leaves it open for the next run
runs = json.loads(Path(sys.argv[1]).read_text())
out_dir = Path(sys.argv[2])
for run in runs:
    log_dir = out_dir / run["name"]
    options = {"workers": env.world_size, "no_progress": True, "log_interval": 100000,
               **run["options"], "log_dir": str(log_dir)}
    config = cfg.resolve_run_config(cfg.parse_run_config(options), launched_world=env.world_size)
    started = time.monotonic()
    summary = cli.run_worker(config, env)
    if env.rank == 0:
        summary["run_s"] = round(time.monotonic() - started, 2)
        (log_dir / "summary.json").write_text(json.dumps(summary))
        print(f"RUN {run['name']} accuracy={summary['accuracy']} run_s={summary['run_s']}", flush=True)
cli.exit_without_teardown(0)
