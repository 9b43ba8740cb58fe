"""Reference models: an MLP and a small CNN, both ``nn.Sequential`` so that pipeline
parallelism can split them by layer."""
from __future__ import annotations

import math

import torch
from torch import nn

from paratrain.errors import ConfigError, check_choice

MODELS = ("mlp", "cnn")


def build_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (256, 256)) -> nn.Sequential:
    """Flatten, then Linear+ReLU for each hidden width, then a Linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def build_cnn(input_shape: tuple[int, ...], num_classes: int, channels: int = 32) -> nn.Sequential:
    """Two 3x3 conv blocks and a linear head; sized for 8x8 digits (works for any HxW >= 4)."""
    if len(input_shape) != 3:
        raise ConfigError(f"model 'cnn' needs (C, H, W) inputs; got shape {input_shape}")
    in_channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels * 2, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * 2 * (height // 2) * (width // 2), 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int | None = None,
                hidden: tuple[int, ...] | None = None) -> nn.Sequential:
    """A reference model by name; ``seed`` fixes its initial weights."""
    check_choice("model", name, MODELS)
    if seed is not None:
        torch.manual_seed(seed)
    if name == "mlp":
        return build_mlp(input_shape, num_classes, hidden or (256, 256))
    if hidden is not None:
        raise ConfigError("hidden sizes apply to model 'mlp' only")
    return build_cnn(input_shape, num_classes)
