"""The KVStore, as MXNet users know it: init, push, pull, an optimizer on the servers,
and gradient compression.

    paratrain launch -n 2 --servers 1 examples/kvstore_basics.py
"""
import torch

import paratrain
from paratrain.cli import exit_without_teardown

kv = paratrain.kvstore.create("dist_sync")          # local | allreduce | dist_sync | dist_async | dist_ssp
kv.init("w", torch.ones(2, 3))                      # every worker calls it; rank 0's value wins
grad = torch.full((2, 3), float(kv.rank + 1))
kv.push("w", [grad, grad])                          # a list (one per device) is summed first
weights = torch.empty(2, 3)
kv.pull("w", out=weights)                           # dist_sync: every worker's round is in
assert torch.equal(weights, torch.full((2, 3), float(sum(2 * (r + 1) for r in range(kv.num_workers)))))
kv.init("v", torch.zeros(4))
kv.set_optimizer({"type": "sgd", "lr": 0.1})        # from here on the update runs on the servers
kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
kv.push("v", torch.ones(4))
out = torch.empty(4)
kv.pull("v", out=out)
print(f"worker {kv.rank} of {kv.num_workers}: w={weights[0, 0].item()} v={out.tolist()}", flush=True)
kv.close()
exit_without_teardown(0)
