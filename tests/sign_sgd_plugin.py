"""A server update rule of a user's own, registered at import (PARATRAIN_SERVER_IMPORTS)."""
from dataclasses import dataclass
from typing import ClassVar

import torch

from paratrain.optimizers import register_optimizer
from paratrain.ps.optimizer import ServerOptimizer


@dataclass
class SignSGD(ServerOptimizer):
    """w -= lr * sign(g): easy to tell apart from SGD."""

    lr: float = 0.1
    type: ClassVar[str] = "sign_sgd"

    def update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict, scale: float = 1.0,
               lr: float | None = None) -> None:
        weight.sub_(torch.sign(grad * scale) * (self.lr if lr is None else lr))


register_optimizer("sign_sgd", server=SignSGD)
