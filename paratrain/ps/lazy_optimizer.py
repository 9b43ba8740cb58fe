"""Server rules that also update row-sparse keys lazily: only the rows a push carries
change, and only those rows' state (MXNet's ``lazy_update``, ``torch.optim.SparseAdam``).

Each rule here is a :class:`~paratrain.ps.optimizer.ServerOptimizer` whose dense
``update`` is the dense rule's own (``LazySGD`` *is* :class:`~paratrain.ps.optimizer.SGD`
for a dense key, to the bit), plus :meth:`RowUpdates.update_rows` for a server's range
of a table. Per-row state (momentum, Adam's moments, Adagrad's sums) is a tensor of the
range's shape, made on first use; a step counter (Adam's bias correction, Adagrad's
decay) counts the updates of the range, as torch's sparse optimizers count steps.

| rule | rows it changes | per-row state | matches |
|---|---|---|---|
| ``sgd`` | pushed rows: ``buf = m buf + g; w -= lr buf`` | momentum (if m > 0) | ``torch.optim.SGD`` with sparse gradients (m = 0) |
| ``adam`` | pushed rows, bias-corrected by the range's step count | first and second moments | ``torch.optim.SparseAdam`` |
| ``adagrad`` | pushed rows: ``s += g^2; w -= lr g / (sqrt(s) + eps)`` | sum of squares | ``torch.optim.Adagrad`` with sparse gradients |
| ``test`` | pushed rows: ``w += rescale_grad g`` | none | MXNet's ``test`` optimizer |
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from paratrain.ps.optimizer import SGD, Adam, ServerOptimizer, _check_number, _write_back, step_gradient


class RowUpdates(abc.ABC):
    """A server rule that can update a range of a row-sparse key lazily."""

    @abc.abstractmethod
    def update_rows(self, weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, state: dict,
                    scale: float = 1.0, lr: float | None = None, lr_mult: float = 1.0) -> None:
        """``weight``: the range ``(n, dim)``, changed in place at ``rows`` (int64 indices
        into it, sorted, unique) only; ``grad``: float32 ``(len(rows), dim)``, to be
        multiplied by ``scale * rescale_grad``; ``lr``: this step's rate (None: the rule's
        own), times ``lr_mult`` (the key's)."""


def _row_state(state: dict, name: str, weight: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Per-row state of the range's shape, float32, made on first use."""
    tensor = state.get(name)
    if tensor is None:
        tensor = state[name] = torch.full(weight.shape, fill, dtype=torch.float32)
    return tensor


def _count_step(state: dict) -> int:
    state["step"] = state.get("step", 0) + 1
    return state["step"]


@dataclass
class LazySGD(SGD, RowUpdates):
    """SGD (with momentum and weight decay) on the rows a push carries."""

    type: ClassVar[str] = "sgd"

    def update_rows(self, weight, rows, grad, state, scale=1.0, lr=None, lr_mult=1.0) -> None:
        lr = (self.lr if lr is None else lr) * lr_mult
        if not rows.numel():
            return
        multiplier = self.rescale_grad * scale
        if not (self.weight_decay or self.momentum) and weight.dtype == torch.float32:
            weight.index_add_(0, rows, grad, alpha=-lr * multiplier)   # w + alpha g, as the dense rule
            return
        master = weight[rows].float()
        step = step_gradient(grad, master, multiplier=multiplier, weight_decay=self.weight_decay)
        if self.momentum:
            buffer = _row_state(state, "momentum", weight)
            step = buffer[rows].mul_(self.momentum).add_(step)   # a row's first push: 0 * m + g, as torch's clone
            buffer[rows] = step
        weight[rows] = master.add_(step, alpha=-lr).to(weight.dtype)


@dataclass
class LazyAdam(Adam, RowUpdates):
    """Adam in its lazy form on the pushed rows: ``torch.optim.SparseAdam``'s arithmetic
    (``step_size = lr sqrt(1 - b2^t) / (1 - b1^t)``, ``w -= step_size m / (sqrt(v) + eps)``)."""

    type: ClassVar[str] = "adam"

    def update_rows(self, weight, rows, grad, state, scale=1.0, lr=None, lr_mult=1.0) -> None:
        lr = (self.lr if lr is None else lr) * lr_mult
        exp_avg = _row_state(state, "exp_avg", weight)
        exp_avg_sq = _row_state(state, "exp_avg_sq", weight)
        step = _count_step(state)
        if not rows.numel():
            return
        multiplier = self.rescale_grad * scale
        master = weight[rows].float()
        g = step_gradient(grad, master, multiplier=multiplier, weight_decay=self.weight_decay)
        m = exp_avg[rows].mul_(self.beta1).add_(g, alpha=1 - self.beta1)
        v = exp_avg_sq[rows].mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        exp_avg[rows], exp_avg_sq[rows] = m, v
        step_size = lr * math.sqrt(1 - self.beta2 ** step) / (1 - self.beta1 ** step)
        weight[rows] = master.addcdiv_(m, v.sqrt().add_(self.eps), value=-step_size).to(weight.dtype)


@dataclass
class Adagrad(ServerOptimizer, RowUpdates):
    """``torch.optim.Adagrad``: ``s += g^2``; ``w -= clr g / (sqrt(s) + eps)`` with
    ``clr = lr / (1 + (t - 1) lr_decay)``; on a row-sparse key, for the pushed rows."""

    lr: float = 0.01
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    rescale_grad: float = 1.0
    type: ClassVar[str] = "adagrad"
    torch_defaults_only: ClassVar[dict[str, Any]] = {"maximize": False, "foreach": None, "differentiable": False,
                                                     "fused": None}

    def __post_init__(self) -> None:
        for name in ("lr", "lr_decay", "weight_decay", "initial_accumulator_value"):
            _check_number(name, getattr(self, name))
        _check_number("eps", self.eps, low_inclusive=False)
        _check_number("rescale_grad", self.rescale_grad, low_inclusive=False)

    def _rate(self, lr: float | None, step: int) -> float:
        return (self.lr if lr is None else lr) / (1 + (step - 1) * self.lr_decay)

    def update(self, weight, grad, state, scale=1.0, lr=None) -> None:
        master = weight.float()
        multiplier = self.rescale_grad * scale
        g = step_gradient(grad, master, multiplier=multiplier, weight_decay=self.weight_decay)
        total = _row_state(state, "sum", master, self.initial_accumulator_value)
        rate = self._rate(lr, _count_step(state))
        total.addcmul_(g, g, value=1)
        _write_back(weight, master.addcdiv_(g, total.sqrt().add_(self.eps), value=-rate))

    def update_rows(self, weight, rows, grad, state, scale=1.0, lr=None, lr_mult=1.0) -> None:
        total = _row_state(state, "sum", weight, self.initial_accumulator_value)
        rate = self._rate(lr, _count_step(state)) * lr_mult
        if not rows.numel():
            return
        multiplier = self.rescale_grad * scale
        master = weight[rows].float()
        g = step_gradient(grad, master, multiplier=multiplier, weight_decay=self.weight_decay)
        sums = total[rows].addcmul_(g, g, value=1)
        total[rows] = sums
        weight[rows] = master.addcdiv_(g, sums.sqrt().add_(self.eps), value=-rate).to(weight.dtype)


@dataclass
class MXNetTest(ServerOptimizer, RowUpdates):
    """MXNet's ``test`` optimizer (``mx.optimizer.create('test', rescale_grad=r)``), which
    MXNet's own KVStore tests run on the servers: ``w += rescale_grad * g``. The
    learning rate is ignored."""

    rescale_grad: float = 1.0
    type: ClassVar[str] = "test"

    def __post_init__(self) -> None:
        _check_number("rescale_grad", self.rescale_grad, low=float("-inf"))

    def update(self, weight, grad, state, scale=1.0, lr=None) -> None:
        master = weight.float()
        _write_back(weight, master.add_(grad, alpha=self.rescale_grad * scale))

    def update_rows(self, weight, rows, grad, state, scale=1.0, lr=None, lr_mult=1.0) -> None:
        if rows.numel():
            weight.index_add_(0, rows, grad.to(weight.dtype), alpha=self.rescale_grad * scale)
