"""Neural-guided representation alignment (Shao, Ma, Li, Beck, arXiv 2405.02564; ``docs/methods.md`` section 5).

A training procedure: the classifier gets a second, linear *neural head* on one of its layers (the
penultimate features by default, as the authors' ``CoTrainNet`` on the avg-pooled ``layer4``; an earlier
layer by module name, average-pooled to ``pool`` x ``pool`` as their ``layer1``-``layer3`` heads), trained
with

    loss = (1 - alpha) * cross_entropy(logits, y) + alpha * MSE(neural_head(features), target(x)),

``alpha = 0.9`` by default (their ``RegLoss``). ``target(x)`` comes from a frozen target model
(``defenses/neural_targets.py``: measured data through a trained predictor, or an offline surrogate). The head
trains with the model's optimizer and schedule in the shared loop (``robustbench_lab/train.py`` calls the
procedure's ``prepare`` and adds its ``parameters``), and it is not part of the checkpoint: the evaluated
model is the plain classifier. ``alpha = 0`` is exactly cross-entropy training, so it shares the standard
checkpoint (the authors' ``alpha = 0`` control is their baseline).

The defense's transform is the identity; with ``analysis.enabled`` it measures, on the evaluation points,
robust accuracy vs epsilon (PGD), the decision-surface smoothness score at the PGD points, and the RSA
between the guided layer and the target source on held-out images (``robustbench_lab/analyses.py``), and
records them in ``metrics.json`` (``defense_config.analysis``) and ``neural_guidance_profile.csv``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core import data as data_mod
from robustbench_lab.core.analyses import robustness_profile, rsa, smoothness_score
from robustbench_lab.core.defense_base import Defense, TrainingProcedure
from robustbench_lab.core.errors import ConfigError, check_known_fields
from robustbench_lab.core.model import eval_frozen

from .neural_targets import FittedTarget, PredictorSpec, TargetSource, _plain, pool_flatten

log = logging.getLogger(__name__)

PENULTIMATE = "penultimate"
TARGET_SCALES = ("none", "unit")


# ------------------------------------------------------------------------------------ the guided layer
def layer_names(model: nn.Module) -> list[str]:
    """The module names a head can sit on (``penultimate`` plus every named submodule)."""
    return [PENULTIMATE] + [n for n, _ in model.named_modules() if n]


def resolve_layer(model: nn.Module, layer: str) -> tuple[str, nn.Module, bool]:
    """(name, module, is_input): ``penultimate`` is the *input* of the last ``nn.Linear``; any other name is
    the output of that module (``net.`` may be omitted for a Classifier)."""
    named = dict(model.named_modules())
    if layer == PENULTIMATE:
        linears = [(n, m) for n, m in named.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError("defense.layer", layer, layer_names(model)[1:21],
                              "the model has no nn.Linear classifier layer: name a layer")
        return linears[-1][0], linears[-1][1], True
    for cand in (layer, f"net.{layer}"):
        if cand and cand in named:
            return cand, named[cand], False
    raise ConfigError("defense.layer", layer, layer_names(model)[:40], "a module name of the model")


class FeatureTap:
    """Captures the features of ``layer`` during a forward pass: (B, D), 4-D outputs average-pooled to
    ``pool`` x ``pool`` then flattened. Use as a context manager; the hook is removed on exit."""

    def __init__(self, model: nn.Module, layer: str, pool: int) -> None:
        self.name, self.module, self.is_input = resolve_layer(model, layer)
        self.pool = int(pool)
        self.features: torch.Tensor | None = None
        self._handle: Any = None

    def __enter__(self) -> "FeatureTap":
        if self.is_input:
            self._handle = self.module.register_forward_pre_hook(self._pre)
        else:
            self._handle = self.module.register_forward_hook(self._post)
        return self

    def _pre(self, _m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.features = pool_flatten(inputs[0], self.pool)

    def _post(self, _m: nn.Module, _i: Any, output: torch.Tensor) -> None:
        self.features = pool_flatten(output, self.pool)

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


@torch.no_grad()
def layer_features(model: nn.Module, x: torch.Tensor, layer: str, pool: int, batch_size: int = 500) -> torch.Tensor:
    """Features of ``layer`` for ``x`` (N, C, H, W) in eval mode: (N, D)."""
    out = []
    with eval_frozen(model, warn_train=False):
        tap = FeatureTap(model, layer, pool)
        with tap:
            for i in range(0, x.shape[0], batch_size):
                model(x[i:i + batch_size])
                assert tap.features is not None
                out.append(tap.features.detach())
    return torch.cat(out)


# ------------------------------------------------------------------------------------ the procedure
class NeuralGuidanceProcedure(TrainingProcedure):
    """The per-batch loss of neural guidance (implements ``robustbench_lab.core.defense_base.TrainingProcedure``
    plus the loop's optional ``prepare``/``parameters`` hooks).

    ``prepare(model, splits, device)`` fits the target (``source.fit``) and builds the head
    ``nn.Linear(D, k)`` (D: the layer's feature size, k: target components; initialised under ``seed``);
    ``loss`` for inputs ``x`` (B, C, H, W) in [0, 1] and labels ``y`` (B,) returns the scalar
    ``(1 - alpha) * CE + alpha * MSE`` (exactly ``F.cross_entropy`` at ``alpha = 0``).
    """

    def __init__(self, source: TargetSource | None, predictor: PredictorSpec, alpha: float = 0.9,
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


# ------------------------------------------------------------------------------------ the defense
@dataclasses.dataclass(frozen=True)
class AnalysisSpec:
    """``defense.analysis``: what the transform measures on the evaluation points (no effect on training).

    ``n``: evaluation points used (0 = all of ``data.n_eval``); ``eps``: L-inf radii of the robustness curve;
    ``steps``: PGD steps (step 2.5 * eps / steps, random start); ``rsa_n``: held-out images of the RSA.
    """

    enabled: bool = True
    n: int = 500
    eps: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.1)
    steps: int = 20
    rsa_n: int = 300
    batch_size: int = 500

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None, key: str = "defense.analysis") -> "AnalysisSpec":
        d = dict(_plain(node) or {})
        check_known_fields(cls, d, key, "analysis field")
        if "eps" in d:
            eps = d["eps"]
            if not isinstance(eps, (list, tuple)) or not all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                                            and 0 < e <= 1 for e in eps):
                raise ConfigError(f"{key}.eps", eps, "a list of L-inf radii in (0, 1]")
            d["eps"] = tuple(float(e) for e in eps)
        s = cls(**d)
        for name, lo in (("n", 0), ("steps", 1), ("rsa_n", 0), ("batch_size", 1)):
            v = getattr(s, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{key}.{name}", v, f"an integer >= {lo}")
        if s.rsa_n and s.rsa_n < 3:
            raise ConfigError(f"{key}.rsa_n", s.rsa_n, "0 (no RSA) or an integer >= 3")
        return s


class NeuralGuidance(Defense):
    """Neural guidance as a defense: a training procedure (``alpha > 0``) plus measurements in the transform.

    ``neural_target``: a target source (a ``conf/defense/neural_target`` node: ``file``, ``v1_gabor``,
    ``model_stage``); ``alpha`` in [0, 1]; ``layer``: ``penultimate`` or a module name of the model;
    ``pool``: pooled size of a 4-D layer; ``predictor``: ``PredictorSpec`` fields (``mode``: direct / trained /
    random / shuffled); ``analysis``: ``AnalysisSpec`` fields; ``seed``: the head's initialisation;
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
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ConfigError("defense.alpha", alpha, "a number in [0, 1] (weight of the neural loss)")
        if not isinstance(layer, str) or not layer:
            raise ConfigError("defense.layer", layer, "'penultimate' or a module name of the model")
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ConfigError("defense.pool", pool, "an integer >= 1")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError("defense.seed", seed, "an integer")
        if target_scale not in TARGET_SCALES:
            raise ConfigError("defense.target_scale", target_scale, TARGET_SCALES)
        self.source = neural_target
        self.predictor = PredictorSpec.from_config(predictor)
        if self.predictor.mode == "direct" and not neural_target.supports_direct:
            raise ConfigError("defense.predictor.mode", "direct", ["trained", "random", "shuffled"],
                              f"{neural_target.kind} data have responses only for their own images; a predictor "
                              "gives every training image a target")
        self.analysis = AnalysisSpec.from_config(analysis)
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
        """The identity (the evaluated model is the plain classifier); runs the analyses when enabled."""
        if self.analysis.enabled and context.get("splits") is not None:
            self.results = self.analyse(model, context["splits"], context.get("device") or torch.device("cpu"),
                                        int(context.get("seed", 0)), context.get("writer"))
        return model

    def analyse(self, model: nn.Module, splits: data_mod.Splits, device: torch.device, seed: int = 0,
                writer: Any = None) -> dict[str, Any]:
        """Robust accuracy vs epsilon, smoothness, and RSA for ``model`` (see ``AnalysisSpec``)."""
        from attacks.pgd import PGD
        a = self.analysis
        n = splits.eval_indices.shape[0] if a.n == 0 else min(a.n, splits.eval_indices.shape[0])
        x = data_mod.to_float(splits.x_eval[:n]).to(device)
        y = splits.y_eval[:n].to(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        profile = robustness_profile(model, x, y, PGD(norm="linf", steps=a.steps), a.eps, gen, a.batch_size)
        out: dict[str, Any] = {"n": n, "pgd_steps": a.steps, "eps": profile["eps"].tolist(),
                               "robust_accuracy": profile["robust_accuracy"].tolist(),
                               "smoothness": profile["smoothness"].tolist(),
                               "smoothness_score": smoothness_score(profile)}
        if a.rsa_n:
            out.update(self._rsa(model, splits, device))
        if writer is not None:
            writer.write_csv("neural_guidance_profile.csv", profile.assign(**{
                "target": self.source.label, "source_kind": self.source.source_kind, "alpha": self.alpha}))
        log.info("neural guidance analysis: %s", out)
        return out

    def _rsa(self, model: nn.Module, splits: data_mod.Splits, device: torch.device) -> dict[str, Any]:
        """RSA between the guided layer and the target source's own responses on held-out images: the test
        evaluation points for surrogates, the file's held-out images for measured data."""
        fitted = self.procedure.fitted or self._reference
        if fitted is None:      # alpha = 0, or the guided checkpoint came from the cache: fit for reference only
            fitted = self._reference = self.source.fit(splits, device, None)
        if fitted.heldout is not None:
            xr, ref = fitted.heldout
            xr, ref = xr[:self.analysis.rsa_n].to(device), ref[:self.analysis.rsa_n]
        elif fitted.response is not None:
            xr = data_mod.to_float(splits.x_eval[:self.analysis.rsa_n]).to(device)
            ref = fitted.reference(xr)
        else:
            return {}
        if xr.shape[0] < 3:
            return {}
        feats = layer_features(model, xr, self.procedure.layer, self.procedure.pool)
        return {"rsa": rsa(feats, ref), "rsa_n": int(xr.shape[0]),
                "rsa_layer": resolve_layer(model, self.procedure.layer)[0]}

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
