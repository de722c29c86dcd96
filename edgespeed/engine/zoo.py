"""Architectures a device knows by name, for weights-only model formats.

A safetensors file holds weights, never code; the code that gives them a shape
is here, or in an installed plugin that registers factories in the
``edgespeed.architectures`` entry-point group. Importing this module imports torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import nn

from edgespeed.errors import ConfigError

__all__ = [
    "DigitsCNN",
    "ENTRY_POINT_GROUP",
    "Mlp",
    "build",
    "names",
]

ENTRY_POINT_GROUP = "edgespeed.architectures"


class DigitsCNN(nn.Module):  # type: ignore[misc]
    """A small CNN for 1x8x8 images (scikit-learn's digits)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


class Mlp(nn.Module):  # type: ignore[misc]
    """A multilayer perceptron: ``inputs`` → hidden layers with ReLU → ``outputs``."""

    def __init__(self, inputs: int, outputs: int, hidden: tuple[int, ...] | list[int] = (64,)) -> None:
        super().__init__()
        sizes = [inputs, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


_BUILTIN: dict[str, Callable[..., nn.Module]] = {"digits-cnn": DigitsCNN, "mlp": Mlp}


def names() -> list[str]:
    """Every architecture name known here."""
    return sorted({*_BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def build(name: str, **options: Any) -> nn.Module:
    """A fresh module of architecture ``name``.

    Raises:
        ConfigError: unknown name, or options the architecture does not take.
    """
    factory = _BUILTIN.get(name)
    if factory is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(names())}")
        factory = found[0].load()
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"architecture {name!r} does not take {options}: {exc}") from exc
