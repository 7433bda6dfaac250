"""The target-source base: a source's fit data through the pipeline and the predictor to a fitted target.

Every source (``robustbench_lab/conf/defense/neural_target/*.yaml``) runs the authors' four steps (``pipeline``: repeats,
z-score, PCA; ``predictor``: step 4) on its own fit data. Surrogates are not brain data: their
``source_kind`` is ``"surrogate"`` and their labels end in ``"(model-derived)"``, in every table and plot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from robustbench_lab.core import data as data_mod
from robustbench_lab.core.errors import ConfigError, check_number

from .pipeline import PipelineChain, ResponsePipeline, average_repeats, batched
from .predictor import PredictorSettings, build_predictor, pattern_correlation, shuffled_pairs, train_predictor

MODEL_DERIVED = "(model-derived)"
SOURCE_KINDS = ("neural", "surrogate")


@dataclasses.dataclass
class FittedTarget:
    """A source after fitting: what the guidance loss and the analyses use.

    ``target``: frozen module, (B, C, H, W) in [0, 1] -> (B, k) regression targets (None when fitted for
    analysis only); ``pipeline``: steps 2-3; ``response``: the surrogate's raw units (B, U) (None for file
    data); ``heldout``: (images (n, C, H, W) float, reference scores (n, k)) held out from the fit (file data);
    ``info``: numbers worth recording (components, explained variance, predictor quality).
    """

    target: nn.Module | None
    pipeline: ResponsePipeline
    response: nn.Module | None
    info: dict[str, Any]
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_components(self) -> int:
        return self.pipeline.n_components

    @torch.no_grad()
    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The source's own (pipeline-applied) responses to ``x`` (B, C, H, W): surrogates only."""
        if self.response is None:
            raise ValueError("measured data have responses only for the file's images (use FittedTarget.heldout)")
        return self.pipeline(self.response(x))


class TargetSource:
    """Base of the target sources: steps 1-3 from the source's fit data, then the predictor (step 4).

    Subclasses set ``kind``/``source_kind`` and implement ``fit_data`` (and ``response_module`` when the
    source can respond to any image, i.e. a surrogate).
    """

    kind = "source"
    source_kind = "surrogate"
    supports_direct = True

    def __init__(self, *, variance_fraction: float = 0.95, max_components: int | None = 256, n_fit: int = 2000,
                 n_heldout: int = 500, seed: int = 0, key: str = "defense.neural_target") -> None:
        self.key = key
        self.variance_fraction = float(check_number(f"{key}.variance_fraction", variance_fraction, low=0,
                                                    low_open=True, high=1))
        self.max_components = check_number(f"{key}.max_components", max_components, low=1, integer=True,
                                           allow_none=True)
        self.n_fit = check_number(f"{key}.n_fit", n_fit, low=3, integer=True)
        self.n_heldout = check_number(f"{key}.n_heldout", n_heldout, low=0, integer=True)
        self.seed = check_number(f"{key}.seed", seed, integer=True)

    # -- labels
    @property
    def label(self) -> str:
        """Human-readable name of the target level; surrogates end in ``(model-derived)``."""
        return self.kind if self.source_kind == "neural" else f"{self.kind} {MODEL_DERIVED}"

    @property
    def level(self) -> int | None:
        """Position in the surrogate hierarchy (1 = V1-like), None for measured data."""
        return None

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "source_kind": self.source_kind, "variance_fraction": self.variance_fraction,
                "max_components": self.max_components, "n_fit": self.n_fit, "seed": self.seed}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source_kind": self.source_kind, "label": self.label, "level": self.level}

    # -- to implement
    def response_module(self, splits: data_mod.Splits, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def fit_data(self, splits: data_mod.Splits, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(fit images (n, C, H, W) uint8 or float, raw responses (n, U) or (n, R, U), held-out or None)."""
        response = self.response_module(splits, device)
        idx = self.fit_indices(splits)
        images = splits.x_train[idx]
        return images, batched(response, images, device), None

    def fit_indices(self, splits: data_mod.Splits) -> torch.Tensor:
        """``n_fit`` training images drawn with ``seed`` (independent of the guided model's recipe)."""
        n = splits.x_train.shape[0]
        if n < 3:
            raise ConfigError("data.n_val", splits.x_val.shape[0], "a split leaving training images",
                              "the neural target is fitted on training images")
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=g)[:min(self.n_fit, n)].sort().values

    def heldout_images(self, splits: data_mod.Splits) -> torch.Tensor:
        """Images held out from the fit, to measure a predictor: validation images, else unused training ones."""
        if splits.x_val.shape[0]:
            return splits.x_val[:self.n_heldout]
        rest = torch.ones(splits.x_train.shape[0], dtype=torch.bool)
        rest[self.fit_indices(splits)] = False
        return splits.x_train[rest][:self.n_heldout]

    # -- the pipeline
    def fit(self, splits: data_mod.Splits, device: torch.device, predictor: PredictorSettings | None) -> FittedTarget:
        """Steps 1-3 on the fit data, then the predictor of ``predictor.mode`` (None: no target module,
        e.g. to compute reference responses for an analysis)."""
        images, raw, heldout = self.fit_data(splits, device)
        pipeline = ResponsePipeline.fit(raw, self.variance_fraction, self.max_components).to(device)
        scores = batched(pipeline, torch.from_numpy(average_repeats(np.asarray(raw))).float(), device)
        response = None if self.source_kind == "neural" else self.response_module(splits, device)
        info: dict[str, Any] = {"n_fit": int(images.shape[0]), "n_units": int(pipeline.unit_mean.shape[0]),
                                "n_components": pipeline.n_components,
                                "explained_variance": float(sum(pipeline.explained_variance_ratio)),
                                "score_rms": float(scores.pow(2).mean().sqrt())}
        held = None
        if heldout is not None:
            h_img, h_raw = heldout
            h_scores = batched(pipeline, torch.from_numpy(average_repeats(h_raw)).float(), device)
            held = (data_mod.to_float(h_img), h_scores)
        target: nn.Module | None = None
        if predictor is not None:
            target = self._target_module(predictor, splits, device, images, scores, pipeline, response, info)
            info.update(self._predictor_quality(target, splits, device, held, response, pipeline))
        return FittedTarget(target, pipeline, response, info, held)

    def _target_module(self, predictor: PredictorSettings, splits: data_mod.Splits, device: torch.device,
                       images: torch.Tensor, scores: torch.Tensor, pipeline: ResponsePipeline,
                       response: nn.Module | None, info: dict[str, Any]) -> nn.Module:
        """Step 4 in ``predictor.mode``; records the predictor's training numbers in ``info``."""
        if predictor.mode == "direct":
            if response is None:
                raise ConfigError("defense.predictor.mode", "direct", ["trained", "random", "shuffled"],
                                  "measured data have responses only for the file's images; a predictor "
                                  "gives every training image a target")
            return PipelineChain(response, pipeline)
        if predictor.mode == "random":
            target = build_predictor(predictor, splits.card, pipeline.n_components).to(device).eval()
            for p in target.parameters():
                p.requires_grad_(False)
            return target
        fit_targets = scores
        if predictor.mode == "shuffled":
            fit_targets, perm = shuffled_pairs(scores, predictor.seed)
            info["shuffled_fixed_points"] = int((perm == torch.arange(perm.shape[0])).sum())
        target, stats = train_predictor(predictor, splits.card, images, fit_targets, device)
        info.update(stats)
        return target

    def _predictor_quality(self, target: nn.Module, splits: data_mod.Splits, device: torch.device,
                           held: tuple[torch.Tensor, torch.Tensor] | None, response: nn.Module | None,
                           pipeline: ResponsePipeline) -> dict[str, Any]:
        """Mean per-image r between the targets and the source on held-out images (authors' measure)."""
        if held is not None:
            x, ref = held
        elif response is not None and self.n_heldout > 0:
            x = data_mod.to_float(self.heldout_images(splits))
            ref = batched(PipelineChain(response, pipeline), x, device)
        else:
            return {}
        if x.shape[0] == 0:
            return {}
        pred = batched(target, x, device)
        return {"target_heldout_r": float(pattern_correlation(pred, ref).mean()), "n_heldout": int(x.shape[0])}
