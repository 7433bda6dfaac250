"""What neural guidance measures after training (``defense.analysis``; no effect on training or its key).

On the evaluation points: robust accuracy vs L-inf radius (PGD) and the decision-surface smoothness score at
the PGD points; on held-out images: the RSA between the guided layer and the target source's own responses
(``robustbench_lab.core.analyses``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import pandas as pd
import torch
from torch import nn

from attacks.pgd import PGD
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.analyses import robustness_profile, rsa, smoothness_score
from robustbench_lab.core.errors import ConfigError, check_bool, check_known_fields, check_number

from .features import layer_features, resolve_layer
from .target import FittedTarget


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
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
    def from_config(cls, node: Mapping[str, Any] | None, key: str = "defense.analysis") -> "AnalysisSettings":
        d = dict(node or {})
        check_known_fields(cls, d, key, "analysis field")
        if "eps" in d:
            eps = d["eps"]
            if not isinstance(eps, (list, tuple)):
                raise ConfigError(f"{key}.eps", eps, "a list of L-inf radii in (0, 1]")
            d["eps"] = tuple(float(check_number(f"{key}.eps[{i}]", e, low=0, low_open=True, high=1))
                             for i, e in enumerate(eps))
        s = cls(**d)
        check_bool(f"{key}.enabled", s.enabled)
        for name, lo in (("n", 0), ("steps", 1), ("rsa_n", 0), ("batch_size", 1)):
            check_number(f"{key}.{name}", getattr(s, name), low=lo, integer=True)
        if s.rsa_n and s.rsa_n < 3:
            raise ConfigError(f"{key}.rsa_n", s.rsa_n, "0 (no RSA) or an integer >= 3")
        return s


def robustness(model: nn.Module, splits: data_mod.Splits, device: torch.device, spec: AnalysisSettings,
               seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """PGD robust accuracy and smoothness vs radius on the first ``spec.n`` evaluation points: the profile
    table (one row per radius, eps = 0 first) and its summary for ``metrics.json``."""
    n = splits.eval_indices.shape[0] if spec.n == 0 else min(spec.n, splits.eval_indices.shape[0])
    x = data_mod.to_float(splits.x_eval[:n]).to(device)
    y = splits.y_eval[:n].to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    profile = robustness_profile(model, x, y, PGD(norm="linf", steps=spec.steps), spec.eps, gen, spec.batch_size)
    return profile, {"n": n, "pgd_steps": spec.steps, "eps": profile["eps"].tolist(),
                     "robust_accuracy": profile["robust_accuracy"].tolist(),
                     "smoothness": profile["smoothness"].tolist(), "smoothness_score": smoothness_score(profile)}


def heldout_rsa(model: nn.Module, fitted: FittedTarget, splits: data_mod.Splits, device: torch.device,
                layer: str, pool: int, n: int) -> dict[str, Any]:
    """RSA between the guided ``layer`` and the target source's own responses on up to ``n`` held-out images:
    the test evaluation points for surrogates, the file's held-out images for measured data ({} if < 3)."""
    if fitted.heldout is not None:
        xr, ref = fitted.heldout
        xr, ref = xr[:n].to(device), ref[:n]
    elif fitted.response is not None:
        xr = data_mod.to_float(splits.x_eval[:n]).to(device)
        ref = fitted.reference(xr)
    else:
        return {}
    if xr.shape[0] < 3:
        return {}
    feats = layer_features(model, xr, layer, pool)
    return {"rsa": rsa(feats, ref), "rsa_n": int(xr.shape[0]), "rsa_layer": resolve_layer(model, layer)[0]}
