"""Models as a user would write them, outside the harness (tests import them by their path)."""

import torch
from torch import nn


class TinyNet(nn.Module):
    """A small CNN for 28x28 grayscale inputs in [0, 1]."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(32 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class OneOutput(nn.Module):
    def __init__(self, **_: object) -> None:
        super().__init__()
        self.lin = nn.Linear(784, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


def not_a_module(**_: object) -> str:
    return "a string"
