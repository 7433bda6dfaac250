"""Neural guidance as a defense (Shao et al., arXiv 2405.02564; ``docs/neural_guidance.md``).

A training procedure (``procedure``) when ``alpha > 0``; ``alpha = 0`` is exactly cross-entropy training, so
it shares the standard checkpoint (the authors' ``alpha = 0`` control is their baseline). The transform is
the identity; with ``analysis.enabled`` it measures (``analysis``) and records the results in
``metrics.json`` (``defense_config.analysis``) and ``neural_guidance_profile.csv``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from robustbench_lab.core import data as data_mod
from robustbench_lab.core.defense_base import Defense
from robustbench_lab.core.errors import ConfigError, check_choice, check_number

from .analysis import AnalysisSettings, heldout_rsa, robustness
from .features import PENULTIMATE
from .predictor import PredictorSettings
from .procedure import TARGET_SCALES, NeuralGuidanceProcedure
from .target import FittedTarget, TargetSource

log = logging.getLogger(__name__)


class NeuralGuidance(Defense):
    """Neural guidance as a defense: a training procedure (``alpha > 0``) plus measurements in the transform.

    ``neural_target``: a target source (a ``robustbench_lab/conf/defense/neural_target`` node: ``file``, ``v1_gabor``,
    ``model_stage``); ``alpha`` in [0, 1]; ``layer``: ``penultimate`` or a module name of the model;
    ``pool``: pooled size of a 4-D layer; ``predictor``: ``PredictorSettings`` fields (``mode``: direct / trained /
    random / shuffled); ``analysis``: ``AnalysisSettings`` fields; ``seed``: the head's initialisation;
    ``target_scale``: ``none`` (the authors' raw PCA scores) or ``unit`` (every target divided by one number,
    the RMS of the source's fit scores, so the MSE starts near 1 whatever the source's unit count: the same
    alpha then weighs sources of different sizes alike; equivalent to rescaling alpha's MSE term).
    """

    name = "neural_guidance"

    def __init__(self, *, neural_target: TargetSource, alpha: float = 0.9, layer: str = PENULTIMATE, pool: int = 2,
                 predictor: Mapping[str, Any] | None = None, analysis: Mapping[str, Any] | None = None,
                 seed: int = 0, target_scale: str = "none") -> None:
        if not isinstance(neural_target, TargetSource):
            raise ConfigError("defense.neural_target", neural_target, "a neural target config node "
                              "(defense/neural_target=file|v1_gabor|model_stage)")
        check_number("defense.alpha", alpha, low=0, high=1, hint="the weight of the neural loss")
        if not isinstance(layer, str) or not layer:
            raise ConfigError("defense.layer", layer, "'penultimate' or a module name of the model")
        check_number("defense.pool", pool, low=1, integer=True)
        check_number("defense.seed", seed, integer=True)
        check_choice("defense.target_scale", target_scale, TARGET_SCALES)
        self.source = neural_target
        self.predictor = PredictorSettings.from_config(predictor)
        if self.predictor.mode == "direct" and not neural_target.supports_direct:
            raise ConfigError("defense.predictor.mode", "direct", ["trained", "random", "shuffled"],
                              f"{neural_target.kind} data have responses only for their own images; a predictor "
                              "gives every training image a target")
        self.analysis = AnalysisSettings.from_config(analysis)
        self.procedure = NeuralGuidanceProcedure(neural_target, self.predictor, float(alpha), layer, pool, seed,
                                                 target_scale)
        self.results: dict[str, Any] = {}
        self._reference: FittedTarget | None = None

    @property
    def alpha(self) -> float:
        return self.procedure.alpha

    def training_procedure(self) -> NeuralGuidanceProcedure | None:
        # alpha = 0 is cross-entropy training exactly: the standard checkpoint, not a copy of it
        return None if self.alpha == 0.0 else self.procedure

    def transform(self, model: nn.Module, context: dict[str, Any]) -> nn.Module:
        """The identity (the evaluated model is the plain classifier); runs the analyses when enabled.
        Reads ``splits``, ``device``, ``seed`` and ``writer`` from the context."""
        if self.analysis.enabled and context.get("splits") is not None:
            self.results = self.analyse(model, context["splits"], context.get("device") or torch.device("cpu"),
                                        int(context.get("seed", 0)), context.get("writer"))
        return model

    def analyse(self, model: nn.Module, splits: data_mod.Splits, device: torch.device, seed: int = 0,
                writer: Any = None) -> dict[str, Any]:
        """Robust accuracy vs epsilon, smoothness, and RSA for ``model`` (see ``AnalysisSettings``)."""
        profile, out = robustness(model, splits, device, self.analysis, seed)
        if self.analysis.rsa_n:
            fitted = self.procedure.fitted or self._reference
            if fitted is None:   # alpha = 0, or the guided checkpoint came from the cache: fit for reference only
                fitted = self._reference = self.source.fit(splits, device, None)
            out.update(heldout_rsa(model, fitted, splits, device, self.procedure.layer, self.procedure.pool,
                                   self.analysis.rsa_n))
        if writer is not None:
            writer.write_csv("neural_guidance_profile.csv", profile.assign(**{
                "target": self.source.label, "source_kind": self.source.source_kind, "alpha": self.alpha}))
        log.info("neural guidance analysis: %s", out)
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alpha": self.alpha, "layer": self.procedure.layer, "pool": self.procedure.pool,
                               "target_scale": self.procedure.target_scale,
                               "predictor": self.predictor.spec(), "target": self.source.describe(),
                               "source_kind": self.source.source_kind, "target_label": self.source.label,
                               "target_level": self.source.level, "shares_standard_checkpoint": self.alpha == 0.0}
        fitted = self.procedure.fitted or self._reference
        if fitted is not None:
            out["target_fit"] = fitted.info
        out.update(self.procedure.train_summary())
        if self.results:
            out["analysis"] = self.results
        return out
