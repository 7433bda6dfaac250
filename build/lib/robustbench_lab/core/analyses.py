"""Representation and decision-surface analyses (used by neural guidance, usable on any classifier).

* :func:`robustness_profile`: robust accuracy vs epsilon under a fixed-epsilon attack, and at the same
  adversarial points the decision-surface **smoothness score** of Shao et al. (arXiv 2405.02564): the mean
  squared input-gradient norm of the loss, ``mean_i ||d CE(f(x_i'), y_i) / d x_i'||_2^2``, at the attack's
  points ``x_i'`` for each epsilon (lower = smoother). Gradients are per example (summed loss), so the
  number does not depend on the batch size; the authors' script differentiates the batch-mean loss and
  multiplies by 400 (``analysis/smoothness.py``), so only orderings, not values, compare with theirs.
* :func:`rsa`: representational similarity analysis: Spearman correlation between the upper triangles of two
  correlation-distance RDMs (``1 - Pearson r`` between the rows of each representation), as the authors'
  ``analysis/RSA.py`` builds them.

Input gradients of the loss are measured here once (:func:`input_gradients`) for every user: the smoothness
score, the evaluation's ``zero_gradients`` check and the JumpReLU trade-off (:func:`zero_gradient_mask`).

The core stays attack-agnostic: the attack is an argument (any ``Attack`` of the fixed-epsilon family).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core.attack_base import Attack
from robustbench_lab.core.evaluator import attack_points
from robustbench_lab.core.model import eval_frozen, predict
from robustbench_lab.core.norms import l2

# An input gradient whose L2 norm is at most this is "exactly zero" (the shattered-gradient symptom: a
# quantized or jump activation passes no gradient at all, so the norm is 0, not merely small).
ZERO_GRADIENT_NORM = 1e-12


def correlation_rdm(features: torch.Tensor) -> torch.Tensor:
    """Representational dissimilarity matrix: ``1 - Pearson r`` between rows. (n, d) -> (n, n), float64.

    A row with zero variance (a constant pattern) has no defined correlation; its entries are set to 1
    (uncorrelated) rather than NaN, so one dead pattern cannot void the whole analysis.
    """
    f = features.detach().double().flatten(1)
    f = f - f.mean(1, keepdim=True)
    norms = f.norm(dim=1, keepdim=True)
    r = (f @ f.T) / (norms @ norms.T)
    r = torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)
    return 1.0 - r


def rsa(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rho between the upper triangles (diagonal excluded) of the RDMs of ``a`` (n, d1) and ``b`` (n, d2).

    Both describe the same ``n >= 3`` images in the same order. Returns a float in [-1, 1].
    """
    from scipy.stats import spearmanr

    if a.shape[0] != b.shape[0]:
        raise ValueError(f"RSA needs the same images in both representations: {a.shape[0]} vs {b.shape[0]} rows")
    if a.shape[0] < 3:
        raise ValueError(f"RSA needs at least 3 images, got {a.shape[0]}")
    iu = torch.triu_indices(a.shape[0], a.shape[0], offset=1)
    da = correlation_rdm(a)[iu[0], iu[1]].cpu().numpy()
    db = correlation_rdm(b)[iu[0], iu[1]].cpu().numpy()
    rho = spearmanr(da, db).statistic
    return float(rho)


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Per-example input gradient of the cross-entropy: ``x`` (N, C, H, W), ``y`` (N,) -> (N, C, H, W).

    The loss is summed over each batch, so row i is example i's own gradient whatever the batch size. Eval
    mode with frozen parameters (the caller's modes are restored).
    """
    out = []
    with eval_frozen(model, warn_train=False):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].detach().clone().requires_grad_(True)
            loss = F.cross_entropy(model(xb), y[i:i + batch_size], reduction="sum")
            (g,) = torch.autograd.grad(loss, xb)
            out.append(g.detach())
    return torch.cat(out) if out else torch.empty_like(x)


def input_gradient_sq_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Per-example squared L2 norm of the cross-entropy's input gradient. ``x`` (B, C, H, W) -> (B,)."""
    return input_gradients(model, x, y, batch_size).flatten(1).pow(2).sum(1)


def zero_gradient_mask(grads: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which per-example gradients ``grads`` (N, ...) are exactly zero (``ZERO_GRADIENT_NORM``)."""
    return l2(grads) <= ZERO_GRADIENT_NORM


def robustness_profile(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                       eps_list: Sequence[float], generator: torch.Generator, batch_size: int = 500) -> pd.DataFrame:
    """Robust accuracy and smoothness at each epsilon. ``x`` (N, C, H, W) in the model's bounds, ``y`` (N,).

    One row per epsilon: ``eps``, ``robust_accuracy`` (clean-correct and not fooled, over all N points; the
    attack's success is the template's recomputed one), ``attack_success_rate`` (among clean-correct points),
    ``smoothness`` (mean squared input-gradient norm at the attack's points, all N points), and ``n``.
    Row ``eps = 0`` is the clean point (accuracy and gradient norm at the clean inputs).
    """
    clean = predict(model, x, batch_size) == y
    every_point = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    rows = [{"eps": 0.0, "robust_accuracy": float(clean.float().mean()), "attack_success_rate": 0.0,
             "smoothness": float(input_gradient_sq_norm(model, x, y, batch_size).mean()), "n": int(x.shape[0])}]
    n_correct = int(clean.sum())
    for eps in eps_list:
        # smoothness is measured at every point's attacked input, so every point is attacked
        out = attack_points(model, attack, x, y, float(eps), generator, batch_size, mask=every_point,
                            clean_correct=clean)
        rows.append({"eps": float(eps), "robust_accuracy": float(out.robust.float().mean()),
                     "attack_success_rate": (float((clean & out.success).sum()) / n_correct if n_correct
                                             else float("nan")),
                     "smoothness": float(input_gradient_sq_norm(model, out.x_adv, y, batch_size).mean()),
                     "n": int(x.shape[0])})
    return pd.DataFrame(rows)


def smoothness_score(profile: pd.DataFrame) -> float:
    """The summary score: mean smoothness over the attacked epsilons (rows with eps > 0)."""
    p = profile[profile["eps"] > 0]
    return float(np.mean(p["smoothness"])) if len(p) else float("nan")
