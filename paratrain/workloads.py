"""The jobs ``paratrain train`` runs: a dataset, a model for it, and how to score it.

``--dataset`` is a built-in name or ``package.module:factory``, a callable taking no
arguments that returns ``(train, heldout)``: each a ``torch.utils.data.Dataset`` (map
style or iterable) or a paratrain ``TensorDataset``; ``heldout`` may be None.
``--model`` is a built-in name or ``package.module:factory``, a callable that takes the
training dataset and returns an ``nn.Module``. A dataset says how it is scored with a
``task`` attribute (default ``"classification"``):

| task | batches | loss | reported |
|---|---|---|---|
| classification | ``(inputs, class_targets)`` | cross-entropy (summed) | accuracy, held-out loss |
| lm | ``(tokens, next_tokens)`` | token cross-entropy (mean) | held-out loss in nats per byte, bits per byte, tokens/s |

Each task is one :class:`Task` in :data:`TASKS`; a built-in model or dataset is one
entry in :data:`MODELS` or :data:`DATASETS`.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from paratrain.errors import ConfigError
from paratrain.train.callbacks import Callback


@dataclass(frozen=True)
class Task:
    """How a kind of dataset is scored. ``loss_fn(outputs, batch)`` with
    ``loss_reduction`` (None: fit's default cross-entropy); ``summary(summary,
    dataset)`` gives the keys this task adds to the run's summary."""

    name: str
    loss_fn: Callable | None = None
    loss_reduction: str | None = None
    summary: Callable[[dict, Any], dict] = lambda summary, dataset: {}


def _token_loss(outputs: torch.Tensor, batch):
    """Mean next-token cross-entropy over every position of the batch (nats per byte
    for byte-level text), and the same in bits per byte as a metric."""
    logits, targets = outputs, batch[1]
    loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, {"bpb": float(loss.detach()) / math.log(2)}


def _lm_summary(summary: dict, dataset) -> dict:
    tokens = dataset_tokens_per_sample(dataset)
    extra = {"tokens_per_sec": summary["samples_per_sec"] * tokens} if tokens else {}
    if summary.get("heldout_loss") is not None:   # also where a pipeline gathers no metrics
        extra["heldout_bpb"] = summary["heldout_loss"] / math.log(2)
    return extra


TASKS: dict[str, Task] = {
    "classification": Task("classification"),
    "lm": Task("lm", loss_fn=_token_loss, loss_reduction="mean", summary=_lm_summary),
}


def dataset_tokens_per_sample(dataset) -> int | None:
    """Tokens in one sample of a language-model dataset (its ``context``), if it says."""
    context = getattr(dataset, "context", None)
    return context if isinstance(context, int) else None


@dataclass
class Workload:
    """What one worker trains: built from the run's config."""

    train: Any
    heldout: Any
    model: nn.Module
    task: Task
    extras: dict = field(default_factory=dict)   # what the task adds to the summary


# ----------------------------------------------------------------- built-in entries


def _digits(config):
    from paratrain.data.datasets import load_digits
    return load_digits()


def _synthetic(config):
    from paratrain.data.datasets import load_synthetic
    return load_synthetic()


def _classifier(name: str):
    def build(train, config) -> nn.Module:
        from paratrain.models import build_model
        if not hasattr(train, "sample_shape"):
            raise ConfigError(f"--model {name} needs a dataset of (inputs, class) samples with a sample_shape, "
                              f"such as digits or synthetic; --dataset {config.data.dataset} is not one")
        return build_model(name, train.sample_shape, train.num_classes, seed=config.job.seed)
    return build


def _pytext(config):
    from paratrain.data.text import build_pytext
    return build_pytext(context=config.model.context or 128)


def _gpt(train, config) -> nn.Module:
    from paratrain.models.gpt import build_gpt
    if getattr(train, "task", None) != "lm":
        raise ConfigError(f"--model gpt needs a language-model dataset (task 'lm', such as pytext); --dataset "
                          f"{config.data.dataset} is not one")
    model = config.model
    shape = {name: getattr(model, name) for name in ("n_layer", "n_head", "n_embd") if getattr(model, name)}
    return build_gpt(vocab_size=train.vocab_size, context=train.context, seed=config.job.seed, **shape)


#: name -> callable(config) -> (train, heldout)
DATASETS: dict[str, Callable] = {"digits": _digits, "synthetic": _synthetic, "pytext": _pytext}
#: name -> callable(train_dataset, config) -> nn.Module
MODELS: dict[str, Callable] = {"mlp": _classifier("mlp"), "cnn": _classifier("cnn"), "gpt": _gpt}


# ----------------------------------------------------------------- building


def load_factory(spec: str, what: str) -> Callable:
    """The callable ``package.module:factory`` names; ConfigError in one line otherwise."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"--{what} {spec!r} is not a built-in name; give one of "
                          f"{', '.join(DATASETS if what == 'dataset' else MODELS)} or package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--{what} {spec!r}: module {module_name!r} cannot be imported ({exc})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"--{what} {spec!r}: {module_name} has no callable {attribute!r}")
    return factory


def build_datasets(config) -> tuple[Any, Any]:
    """``(train, heldout)`` of ``--dataset``."""
    name = config.data.dataset
    if name in DATASETS:
        return DATASETS[name](config)
    result = load_factory(name, "dataset")()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ConfigError(f"--dataset {name!r} returned {type(result).__name__}; a dataset factory returns "
                          f"(train, heldout)")
    from paratrain.data.loading import check_dataset
    for part, data in zip(("train", "heldout"), result):
        if data is not None or part == "train":
            try:
                check_dataset(data, f"--dataset {name!r} {part} split")
            except TypeError as exc:
                raise ConfigError(str(exc)) from None
    return result


def build_workload(config) -> Workload:
    """The datasets, the model and the task of a resolved run config."""
    train, heldout = build_datasets(config)
    name = config.model.model
    if name in MODELS:
        model = MODELS[name](train, config)
    else:
        torch.manual_seed(config.job.seed)
        model = load_factory(name, "model")(train)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"--model {name!r} returned {type(model).__name__}; a model factory returns an "
                              f"nn.Module")
    task_name = getattr(train, "task", "classification")
    if task_name not in TASKS:
        raise ConfigError(f"dataset task={task_name!r} is not known; tasks are: {', '.join(TASKS)}")
    return Workload(train, heldout, model, TASKS[task_name])


class SummaryExtras(Callback):
    """A fit callback (every rank) that adds the task's keys to the run's summary
    before anything reports it (put it first)."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload

    def on_train_end(self, state) -> None:
        state.summary.update(self.workload.task.summary(state.summary, self.workload.train))
