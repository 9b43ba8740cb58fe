"""Writes its PID to DIR/rank<r>.pid and trains slowly until killed (or 120 s pass)."""
import os
import sys
import time

import torch

from paratrain.env import read_env

env = read_env()
with open(os.path.join(sys.argv[1], f"rank{env.rank}.pid"), "w") as handle:
    handle.write(str(os.getpid()))
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    torch.randn(64, 64) @ torch.randn(64, 64)
    time.sleep(0.05)
