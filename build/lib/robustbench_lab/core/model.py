"""The model wrapper: a classifier on [0, 1] inputs that owns its normalization and input bounds."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std with mean/std as buffers, so they move with the model and are saved with it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``net(normalize(x))`` for inputs ``x`` of shape (B, C, H, W) in ``bounds``; returns logits (B, K).

    Attacks and the evaluator only ever see this object: epsilon is always measured in input space and
    normalization can never be applied twice.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 num_classes: int, bounds: tuple[float, float] = (0.0, 1.0), name: str = "") -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.num_classes = int(num_classes)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


@contextlib.contextmanager
def eval_frozen(model: nn.Module, warn_train: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with parameters frozen; restore the caller's modes afterwards.

    Attacks differentiate only w.r.t. their inputs; BatchNorm must use running statistics (train mode
    during an attack is a classic pitfall, so it is warned about).
    """
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    if warn_train and model.training:
        warnings.warn("model was in train mode when an attack started; attacking it in eval mode "
                      "(its mode is restored afterwards)", stacklevel=3)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, t in modes.items():
            m.train(t)
        for p, r in grads.items():
            p.requires_grad_(r)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Argmax predictions for ``x`` (B, C, H, W) in eval mode, batched. Returns (B,) long."""
    out = []
    with eval_frozen(model, warn_train=False):
        for i in range(0, x.shape[0], batch_size):
            out.append(model(x[i:i + batch_size]).argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)
