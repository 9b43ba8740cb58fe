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
| clicks | ``{"dense", "sparse", "click"}`` | binary cross-entropy (mean) | held-out log loss, AUC (from a score histogram summed over ranks), the planted model's |

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
from paratrain.train.objective import HeldoutStats


@dataclass(frozen=True)
class Task:
    """How a kind of dataset is scored. ``loss_fn(outputs, batch)`` with
    ``loss_reduction`` (None: fit's default cross-entropy); ``heldout_stats``: sums
    the held-out evaluation adds up (fit's ``heldout_stats``); ``summary(summary,
    workload, heldout)`` gives the keys this task adds to the run's summary (``heldout``:
    the held-out StepResult, or None)."""

    name: str
    loss_fn: Callable | None = None
    loss_reduction: str | None = None
    summary: Callable[[dict, Any, Any], dict] = lambda summary, dataset, heldout: {}
    heldout_stats: HeldoutStats | None = None


def _token_loss(outputs: torch.Tensor, batch):
    """Mean next-token cross-entropy over every position of the batch (nats per byte
    for byte-level text), and the same in bits per byte as a metric."""
    logits, targets = outputs, batch[1]
    loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, {"bpb": float(loss.detach()) / math.log(2)}


def _lm_summary(summary: dict, workload, heldout) -> dict:
    tokens = dataset_tokens_per_sample(workload.train)
    extra = {"tokens_per_sec": summary["samples_per_sec"] * tokens} if tokens else {}
    if summary.get("heldout_loss") is not None:   # also where a pipeline gathers no metrics
        extra["heldout_bpb"] = summary["heldout_loss"] / math.log(2)
    return extra


def _click_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean binary cross-entropy of the click logits (the held-out log loss)."""
    from paratrain.models.dlrm import click_loss
    return click_loss(logits, batch)


def _click_histogram(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    from paratrain.metrics import score_histogram
    return score_histogram(logits.detach().float(), batch["click"])


def _clicks_summary(summary: dict, workload, heldout) -> dict:
    """Held-out log loss and AUC, beside the planted model's (the best to expect). The
    AUC comes from the score histogram summed over batches and ranks: exact sums, so it
    does not depend on how the held-out set was split; ``heldout_auc_bound`` says how
    far the histogram's ties can move it from the exact AUC."""
    from paratrain.metrics import auc_from_histogram, histogram_auc_bound
    extra = {"heldout_logloss": summary.get("heldout_loss")}
    if heldout is not None and heldout.stats is not None and heldout.samples:
        extra["heldout_auc"] = auc_from_histogram(heldout.stats)
        extra["heldout_auc_bound"] = histogram_auc_bound(heldout.stats)
    from paratrain.data.clicks import ClickLogs
    if isinstance(workload.heldout, ClickLogs):   # the planted model's: the best to expect
        extra.update(planted_logloss=workload.heldout.planted_logloss, planted_auc=workload.heldout.planted_auc)
    return extra


TASKS: dict[str, Task] = {
    "classification": Task("classification"),
    "lm": Task("lm", loss_fn=_token_loss, loss_reduction="mean", summary=_lm_summary),
    "clicks": Task("clicks", loss_fn=_click_loss, loss_reduction="mean", summary=_clicks_summary,
                   heldout_stats=HeldoutStats(2 * 4096, _click_histogram)),
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


def _clicks(config):
    from paratrain.config import parse_table_sizes
    from paratrain.data.clicks import DEFAULT_TABLE_SIZES, build_clicks
    data = config.data
    return build_clicks(num_train=data.train_samples or 768_000, num_heldout=data.heldout_samples or 100_000,
                        table_sizes=parse_table_sizes(config.model.table_sizes) or DEFAULT_TABLE_SIZES,
                        seed=config.job.seed)


class _ClickModel(nn.Module):
    """A DLRM called with a click batch (``{"dense", "sparse", ...}``), as fit's loss_fn path calls models."""

    def __init__(self, dlrm: nn.Module) -> None:
        super().__init__()
        self.dlrm = dlrm

    def forward(self, batch: dict) -> torch.Tensor:
        return self.dlrm(batch["dense"], batch["sparse"])


#: The servers' rate for the tables, relative to the dense part's: lazy Adam learns the
#: tables best at about 6x the dense rate (docs/dlrm.md: 0.03 against 5e-3).
DLRM_TABLE_LR_MULT = 6.0


def _dlrm(train, config) -> nn.Module:
    import math
    from paratrain.models.dlrm import DLRMConfig, build_dlrm
    from paratrain.nn import ServerEmbedding
    if getattr(train, "task", None) != "clicks":
        raise ConfigError(f"--model dlrm needs a click-log dataset such as clicks; --dataset {config.data.dataset} "
                          f"is not one")

    def table(rows: int, dim: int) -> ServerEmbedding:   # the reference DLRM's init, made where the rows live
        bound = math.sqrt(1.0 / rows)
        return ServerEmbedding(rows, dim, initializer={"kind": "uniform", "low": -bound, "high": bound},
                               lr_mult=DLRM_TABLE_LR_MULT)
    model = build_dlrm(DLRMConfig(num_dense=train.num_dense, table_sizes=train.table_sizes,
                                  embedding_dim=config.model.embedding_dim or 16),
                       seed=config.job.seed, embedding_factory=table)
    return _ClickModel(model)


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
DATASETS: dict[str, Callable] = {"digits": _digits, "synthetic": _synthetic, "clicks": _clicks, "pytext": _pytext}
#: name -> callable(train_dataset, config) -> nn.Module
MODELS: dict[str, Callable] = {"mlp": _classifier("mlp"), "cnn": _classifier("cnn"), "dlrm": _dlrm, "gpt": _gpt}


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
        state.summary.update(self.workload.task.summary(state.summary, self.workload, state.heldout))
