"""`paratrain train` whose rank 1 SIGKILLs itself in its first attempt, as soon as the
first checkpoint is sealed (the manifest appears in --checkpoint-dir), to test restarts
under torchrun --max-restarts. Later attempts run normally (and resume). Tied to progress,
not to a clock, so it kills mid-run however fast the machine trains."""
import os
import signal
import sys
import threading
import time
from pathlib import Path

from paratrain.cli import exit_without_teardown, main  # gloo threads can abort the teardown
from paratrain.env import read_env

env = read_env()
if env.restart_count == 0 and env.rank == 1:
    manifest = Path(sys.argv[sys.argv.index("--checkpoint-dir") + 1]) / "model.json"

    def die_after_the_first_checkpoint():
        deadline = time.monotonic() + 120
        while not manifest.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        print("flaky_train: killing myself", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=die_after_the_first_checkpoint, daemon=True).start()
exit_without_teardown(main(sys.argv[1:]))
