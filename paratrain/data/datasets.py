"""Built-in datasets: scikit-learn's digits (ships with the package) and synthetic data.

Each dataset is a pair of in-memory tensors (train, held-out). Both splits are fixed:
they depend on nothing but the dataset's own parameters, so every worker and every
run sees the same data.
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from paratrain.errors import ConfigError, check_choice

DATASETS = ("digits", "synthetic")
DIGITS_HELDOUT = 360          # of 1797 images: a fixed 20% held-out split
_SPLIT_SEED = 20240601        # fixed, so the split never depends on --seed


@dataclass
class TensorDataset:
    """Inputs and integer labels held in memory."""

    inputs: torch.Tensor
    targets: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ConfigError(f"inputs ({len(self.inputs)}) and targets ({len(self.targets)}) differ in length")

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[indices], self.targets[indices]


def _digits_file() -> Path:
    """scikit-learn's ``digits.csv.gz``, found without importing scikit-learn: its import
    costs a second of CPU in every worker, the file is all that is needed."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("dataset 'digits' needs scikit-learn, which ships the images: pip install scikit-learn")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"


def load_digits() -> tuple[TensorDataset, TensorDataset]:
    """8x8 handwritten digits, scaled to [0, 1], shape (N, 1, 8, 8): the 1797 rows of
    scikit-learn's ``load_digits``, 64 pixels (0..16) then the label, read as it reads them."""
    import numpy as np

    with gzip.open(_digits_file(), mode="rt", encoding="utf-8") as rows:
        data = np.loadtxt(rows, delimiter=",")
    images = torch.tensor(data[:, :-1].reshape(-1, 8, 8), dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data[:, -1].astype(int), dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    held, train = order[:DIGITS_HELDOUT], order[DIGITS_HELDOUT:]
    return (TensorDataset(images[train], labels[train], 10),
            TensorDataset(images[held], labels[held], 10))


def load_synthetic(num_samples: int = 4096, num_features: int = 784, num_classes: int = 10,
                   heldout_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """Gaussian clusters, one per class: learnable, of any size, reproducible."""
    if num_samples < 2 or num_features < 1 or num_classes < 2:
        raise ConfigError(f"synthetic data needs num_samples>=2, num_features>=1, num_classes>=2; "
                          f"got {num_samples}, {num_features}, {num_classes}")
    gen = torch.Generator().manual_seed(_SPLIT_SEED)
    centers = torch.randn(num_classes, num_features, generator=gen)
    labels = torch.randint(0, num_classes, (num_samples,), generator=gen)
    inputs = centers[labels] + 2.0 * torch.randn(num_samples, num_features, generator=gen)
    num_held = max(1, int(num_samples * heldout_fraction))
    return (TensorDataset(inputs[num_held:], labels[num_held:], num_classes),
            TensorDataset(inputs[:num_held], labels[:num_held], num_classes))


def build_dataset(name: str, **options) -> tuple[TensorDataset, TensorDataset]:
    """``(train, heldout)`` for a built-in dataset name."""
    check_choice("dataset", name, DATASETS)
    if name == "digits":
        if options:
            raise ConfigError(f"dataset 'digits' takes no options; got {sorted(options)}")
        return load_digits()
    return load_synthetic(**options)
