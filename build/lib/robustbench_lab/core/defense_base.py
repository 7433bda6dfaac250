"""Defense protocols.

A defense can act at two points of a run, and implements either or both:

* a **training procedure** (adversarial training, ACL, neural guidance): a ``TrainingProcedure`` subclass
  that replaces the per-batch training loss and, through its declared hooks (``prepare``, ``parameters``,
  ``fit``), what the training loop does around it; its ``spec()`` enters the checkpoint key, so differently
  trained models never share a cache entry. ``TrainingProcedure`` and ``StandardTraining`` are defined in
  ``robustbench_lab.core.train`` beside the loop that runs them (its default ``fit`` is that loop) and are
  re-exported here;
* a **model transform** (JumpReLU retrofitting): it maps a trained classifier to a defended one, without
  mutating the original.

``NoDefense`` is the identity for both.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from robustbench_lab.core.train import StandardTraining, TrainingProcedure

__all__ = ["Defense", "NoDefense", "StandardTraining", "TrainingProcedure"]


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
