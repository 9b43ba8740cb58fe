"""Optimizers that run on the parameter servers.

Each server updates only the key slices it holds, and keeps their optimizer state
(momentum, Adam moments) beside them, so state is sharded exactly as the keys are.
The update follows ``torch.optim`` (SGD with momentum, Adam) so that a model trained
with updates on the servers matches one trained with a local optimizer. The
gradient the update sees is ``rescale_grad * scale * sum_of_pushes``: ``scale``
travels with each push (1 / global batch from the Trainer), and the sum of a round's
pushes is what MXNet feeds its server optimizer.

Specs travel as JSON (``{"type": "sgd", "lr": 0.1, ...}``), never pickled.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from paratrain.errors import ConfigError


def _check_number(name: str, value: Any, *, low: float = 0.0, high: float | None = None,
                  low_inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} must be a number")
    too_low = value < low if low_inclusive else value <= low
    if too_low or (high is not None and value >= high) or value != value:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if high is not None else "")
        raise ConfigError(f"{name}={value!r} must be {bound}")


def _write_back(weight: torch.Tensor, master: torch.Tensor) -> None:
    # weight.float() is the weight itself for float32 (updated in place already)
    # and an upcast copy for half types, whose result is rounded back once.
    if master is not weight:
        weight.copy_(master)


def step_gradient(grad: torch.Tensor, master: torch.Tensor, *, multiplier: float,
                  weight_decay: float) -> torch.Tensor:
    """The gradient a rule steps on: ``grad`` times ``multiplier`` (``rescale_grad``
    times the push's scale), plus coupled weight decay ``weight_decay * master``."""
    step = grad * multiplier if multiplier != 1.0 else grad
    return step + weight_decay * master if weight_decay else step


def check_decay_and_rescale(rule) -> None:
    """The two knobs every built-in rule has: ``weight_decay >= 0``, ``rescale_grad > 0``."""
    _check_number("weight_decay", rule.weight_decay)
    _check_number("rescale_grad", rule.rescale_grad, low_inclusive=False)


class ServerOptimizer(abc.ABC):
    """Updates one key slice in place from the summed gradient.

    Subclasses are dataclasses whose fields are the rule's hyperparameters; register
    one under a name with :func:`paratrain.optimizers.register_optimizer` (a server
    imports the modules named in ``PARATRAIN_SERVER_IMPORTS`` at start-up, so a rule of
    your own reaches the servers without editing them).
    """

    type: ClassVar[str]
    #: torch.optim options that a worker's optimizer may carry only at these values,
    #: since this rule has no equivalent (``maximize``, SGD's ``dampening``, ...).
    torch_defaults_only: ClassVar[dict[str, Any]] = {"maximize": False}

    @classmethod
    def from_params(cls, params: dict) -> "ServerOptimizer":
        """The rule with these hyperparameters (a spec without its ``type``);
        unknown names are refused, naming the allowed ones."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - fields)
        if unknown:
            raise ConfigError(f"optimizer {cls.type!r} got unknown option(s) {unknown}; allowed: {sorted(fields)}")
        return cls(**params)

    @abc.abstractmethod
    def update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict, scale: float = 1.0,
               lr: float | None = None) -> None:
        """``weight``: the slice (any float dtype); ``grad``: float32 (read only), to
        be multiplied by ``scale * rescale_grad``; ``state``: this slice's optimizer
        state, created on first use; ``lr``: this step's learning rate (None: the
        rule's own ``lr``)."""

    def to_spec(self) -> dict:
        return {"type": self.type, **dataclasses.asdict(self)}


@dataclass
class SGD(ServerOptimizer):
    """``torch.optim.SGD``: ``buf = momentum * buf + g``; ``w -= lr * buf``."""

    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    rescale_grad: float = 1.0
    type: ClassVar[str] = "sgd"
    torch_defaults_only: ClassVar[dict[str, Any]] = {"maximize": False, "dampening": 0, "nesterov": False}

    @classmethod
    def from_params(cls, params: dict) -> "SGD":
        params = dict(params)
        if params.pop("nesterov", False):
            raise ConfigError("nesterov=True is not supported by the server SGD")
        return super().from_params(params)

    def __post_init__(self) -> None:
        _check_number("lr", self.lr)
        _check_number("momentum", self.momentum, high=1.0)
        check_decay_and_rescale(self)

    def update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict, scale: float = 1.0,
               lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        master = weight.float()
        multiplier = self.rescale_grad * scale
        if not (self.weight_decay or self.momentum):
            # Plain SGD: one pass over the weights, the rescale folded into alpha.
            _write_back(weight, master.add_(grad, alpha=-lr * multiplier))
            return
        step = step_gradient(grad, master, multiplier=multiplier, weight_decay=self.weight_decay)
        if self.momentum:
            buf = state.get("momentum")
            if buf is None:
                buf = state["momentum"] = step.clone()
            else:
                buf.mul_(self.momentum).add_(step)
            step = buf
        _write_back(weight, master.add_(step, alpha=-lr))


@dataclass
class Adam(ServerOptimizer):
    """``torch.optim.Adam`` with bias correction."""

    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    rescale_grad: float = 1.0
    type: ClassVar[str] = "adam"
    torch_defaults_only: ClassVar[dict[str, Any]] = {"maximize": False, "amsgrad": False}

    @classmethod
    def from_params(cls, params: dict) -> "Adam":
        params = dict(params)
        if "betas" in params:   # torch's spelling
            params["beta1"], params["beta2"] = params.pop("betas")
        return super().from_params(params)

    def __post_init__(self) -> None:
        _check_number("lr", self.lr)
        _check_number("beta1", self.beta1, high=1.0)
        _check_number("beta2", self.beta2, high=1.0)
        _check_number("eps", self.eps, low_inclusive=False)
        check_decay_and_rescale(self)

    def update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict, scale: float = 1.0,
               lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        master = weight.float()
        g = step_gradient(grad, master, multiplier=self.rescale_grad * scale, weight_decay=self.weight_decay)
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        state["step"] += 1
        exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
        exp_avg.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        bias1 = 1 - self.beta1 ** step
        bias2 = 1 - self.beta2 ** step
        denom = (exp_avg_sq.sqrt() / bias2 ** 0.5).add_(self.eps)
        _write_back(weight, master.addcdiv_(exp_avg, denom, value=-lr / bias1))


@dataclass
class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay (``w *= 1 - lr * wd``
    before the Adam step, on the weight, not the gradient)."""

    weight_decay: float = 0.01
    type: ClassVar[str] = "adamw"

    def update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict, scale: float = 1.0,
               lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        decay, self.weight_decay = self.weight_decay, 0.0   # Adam's own decay is the coupled one
        try:
            if decay:
                master = weight.float()
                _write_back(weight, master.mul_(1 - lr * decay))
            super().update(weight, grad, state, scale, lr=lr)
        finally:
            self.weight_decay = decay

