"""`paratrain train` whose rank 1 SIGKILLs itself 2.5 s into the first attempt, to test
restarts under torchrun --max-restarts. Later attempts run normally (and resume)."""
import os
import signal
import sys
import threading

from paratrain.cli import exit_without_teardown, main  # gloo threads can abort the teardown
from paratrain.env import read_env

env = read_env()
if env.restart_count == 0 and env.rank == 1:
    def die():
        print("flaky_train: killing myself", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Timer(2.5, die).start()
exit_without_teardown(main(sys.argv[1:]))
