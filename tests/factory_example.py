"""A user's own model and dataset, for `paratrain train --model factory_example:model
--dataset factory_example:data` (tests/test_workloads.py)."""
import torch
from torch import nn
from torch.utils.data import TensorDataset


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, generator=generator)
    y = (x.sum(1) > 0).long()
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])


def model(train):
    features = train[0][0].numel()
    return nn.Sequential(nn.Linear(features, 8), nn.ReLU(), nn.Linear(8, 2))


def not_a_model(train):
    return "a string"


def not_a_pair():
    return [1, 2, 3]


def tinytext():
    """A few kilobytes of the pytext corpus at context 16: a language-model dataset small
    enough to train under every strategy in seconds (tests/test_gpt_strategies.py)."""
    from paratrain.data.text import build_pytext
    return build_pytext(context=16, max_train_bytes=8_192, max_heldout_bytes=2_048)
