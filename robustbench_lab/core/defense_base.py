"""Defense protocols.

A defense can act at two points of a run, and implements either or both:

* a **training procedure** (adversarial training, ACL, neural guidance): it replaces the per-batch training
  loss; its ``spec()`` enters the checkpoint key, so differently trained models never share a cache entry;
* a **model transform** (JumpReLU retrofitting): it maps a trained classifier to a defended one, without
  mutating the original.

``NoDefense`` is the identity for both.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


@runtime_checkable
class TrainingProcedure(Protocol):
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """Training loss for a batch ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,)."""
        ...

    def spec(self) -> dict[str, Any]:
        """Everything about this procedure that changes the trained weights (enters the checkpoint key)."""
        ...


class StandardTraining:
    """Plain cross-entropy training."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = float(label_smoothing)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=self.label_smoothing)

    def spec(self) -> dict[str, Any]:
        return {"procedure": "standard", "label_smoothing": self.label_smoothing}


class Defense:
    """Base class: identity training and identity transform. Subclasses override what they change."""

    name = "none"

    def training_procedure(self) -> TrainingProcedure | None:
        """None means: train the standard way (and share the undefended checkpoint)."""
        return None

    def transform(self, model: nn.Module, context: dict[str, Any]) -> nn.Module:
        """Return the defended model; must not mutate ``model``.

        ``context``: ``splits`` (robustbench_lab.core.data.Splits: validation data for tuning), ``device``, ``cfg``,
        ``seed``, ``run_dir`` and ``writer`` (a ResultWriter: files staged with ``writer.path(name)`` appear in
        the run directory when the run completes). A transform that changes the model should keep the
        original reachable as ``defended.undefended``: transfer ("gray-box") attacks craft on it.
        """
        return model

    def describe(self) -> dict[str, Any]:
        """Values recorded in the results (e.g. a tuned parameter)."""
        return {}


class NoDefense(Defense):
    name = "none"
