"""The training procedure of neural guidance: a linear neural head on the guided layer, trained with

    loss = (1 - alpha) * cross_entropy(logits, y) + alpha * MSE(neural_head(features), target(x)),

``alpha = 0.9`` by default (the authors' ``RegLoss``). The head trains with the model's optimizer and
schedule in the core's shared loop (``robustbench_lab.core.train`` calls ``prepare`` and adds
``parameters``); it is not part of the checkpoint: the evaluated model is the plain classifier.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core import data as data_mod
from robustbench_lab.core.model import eval_frozen
from robustbench_lab.core.defense_base import TrainingProcedure

from .features import PENULTIMATE, FeatureTap
from .predictor import PredictorSettings
from .target import FittedTarget, TargetSource

log = logging.getLogger(__name__)

TARGET_SCALES = ("none", "unit")


class NeuralGuidanceProcedure(TrainingProcedure):
    """The per-batch loss of neural guidance (implements ``robustbench_lab.core.defense_base.TrainingProcedure``
    plus the loop's optional ``prepare``/``parameters`` hooks).

    ``prepare(model, splits, device)`` fits the target (``source.fit``) and builds the head
    ``nn.Linear(D, k)`` (D: the layer's feature size, k: target components; initialised under ``seed``);
    ``loss`` for inputs ``x`` (B, C, H, W) in [0, 1] and labels ``y`` (B,) returns the scalar
    ``(1 - alpha) * CE + alpha * MSE`` (exactly ``F.cross_entropy`` at ``alpha = 0``).
    """

    def __init__(self, source: TargetSource | None, predictor: PredictorSettings, alpha: float = 0.9,
                 layer: str = PENULTIMATE, pool: int = 2, seed: int = 0, target_scale: str = "none") -> None:
        self.source = source
        self.target_scale = target_scale
        self.scale = 1.0   # targets are multiplied by this (1 / RMS of the fit scores when target_scale = unit)
        self.predictor = predictor
        self.alpha = float(alpha)
        self.layer = layer
        self.pool = int(pool)
        self.seed = int(seed)
        self.fitted: FittedTarget | None = None
        self.head: nn.Linear | None = None
        self.stats: dict[str, list[float]] = {"ce": [], "mse": []}

    def spec(self) -> dict[str, Any]:
        return {"procedure": "neural_guidance", "alpha": self.alpha, "layer": self.layer, "pool": self.pool,
                "head_seed": self.seed, "target_scale": self.target_scale, "predictor": self.predictor.spec(),
                "target": self.source.spec() if self.source is not None else None}

    def use_target(self, fitted: FittedTarget) -> None:
        """Use an already fitted target (e.g. one built by hand in a test) instead of fitting the source."""
        self.fitted = fitted

    def prepare(self, model: nn.Module, splits: data_mod.Splits | None, device: torch.device) -> None:
        if self.fitted is None:
            if self.source is None or splits is None:
                raise ValueError("neural guidance needs a target source and the data to fit it (or use_target)")
            self.fitted = self.source.fit(splits, device, self.predictor)
            log.info("neural target %s: %s", self.source.label, self.fitted.info)
        assert self.fitted.target is not None, "the fitted target has no target module (fitted for analysis only)"
        self.fitted.target.to(device).eval()
        rms = float(self.fitted.info.get("score_rms") or 1.0)
        self.scale = 1.0 / rms if self.target_scale == "unit" and rms > 0 else 1.0
        card_shape = tuple(splits.x_train.shape[1:]) if splits is not None else None
        probe = torch.full((2, *card_shape), 0.5) if card_shape else None
        if probe is None:
            raise ValueError("prepare needs the data splits to size the neural head")
        dev = next(model.parameters()).device
        with eval_frozen(model, warn_train=False), FeatureTap(model, self.layer, self.pool) as tap:
            model(probe.to(dev))
        assert tap.features is not None
        d, k = tap.features.shape[1], self.fitted.n_components
        with torch.random.fork_rng(devices=[]):    # its own seed; the caller's RNG stream is untouched
            torch.manual_seed(self.seed)
            self.head = nn.Linear(d, k)
        self.head.to(device)
        self.stats = {"ce": [], "mse": []}

    def parameters(self) -> list[nn.Parameter]:
        """The head's parameters (trained with the model's optimizer, weight decay and schedule)."""
        return list(self.head.parameters()) if self.head is not None else []

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.alpha == 0.0:
            return F.cross_entropy(model(x), y)
        if self.head is None or self.fitted is None or self.fitted.target is None:
            raise RuntimeError("NeuralGuidanceProcedure.prepare() has not run: the shared training loop calls it "
                               "before the first batch (robustbench_lab.core.train.train)")
        tap = FeatureTap(model, self.layer, self.pool)
        with tap:
            logits = model(x)
        assert tap.features is not None
        with torch.no_grad():
            target = self.fitted.target(x) * self.scale
        ce = F.cross_entropy(logits, y)
        mse = F.mse_loss(self.head(tap.features), target)
        if not torch.isfinite(mse):
            # unnormalised PCA scores (as the authors) can be large: a too-high learning rate diverges; say so
            # instead of training (and caching) a NaN model
            raise FloatingPointError(
                f"neural guidance diverged at batch {len(self.stats['mse']) + 1}: MSE {float(mse.detach())} "
                f"(CE {float(ce.detach()):.4g}, targets' mean square {float(target.pow(2).mean()):.4g}); "
                "lower model.train.lr or defense.alpha, "
                "or set defense.target_scale=unit")
        self.stats["ce"].append(float(ce.detach()))
        self.stats["mse"].append(float(mse.detach()))
        return (1.0 - self.alpha) * ce + self.alpha * mse

    def train_summary(self) -> dict[str, Any]:
        """Mean CE and MSE over the first and the last 20 batches of training (empty if it did not run here)."""
        if not self.stats["mse"]:
            return {}
        m = lambda v: float(sum(v) / len(v))  # noqa: E731
        return {"train_ce_first": m(self.stats["ce"][:20]), "train_ce_last": m(self.stats["ce"][-20:]),
                "train_mse_first": m(self.stats["mse"][:20]), "train_mse_last": m(self.stats["mse"][-20:]),
                "train_batches": len(self.stats["mse"])}

