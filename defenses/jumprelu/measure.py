"""What the tuning measures at each jump, on validation points: the shattered-gradient symptom and the
strength of an attack (through the core's one robust-count loop and one input-gradient measurement), each
with its 95% interval and the number of points behind it, and the pre-activation scale that a grid of jumps
has to span."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from defenses.jumprelu.activation import JumpReLU
from defenses.jumprelu.intervals import median_interval, wilson_interval
from robustbench_lab.core.analyses import input_gradients, zero_gradient_mask
from robustbench_lab.core.attack_base import Attack, AttackFamily
from robustbench_lab.core.evaluator import attack_points
from robustbench_lab.core.norms import Norm


def zero_gradient_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Share of points whose cross-entropy input gradient is exactly zero (the shattered-gradient symptom)."""
    zero = zero_gradient_mask(input_gradients(model, x, y, batch_size))
    return int(zero.sum()) / max(x.shape[0], 1)


def attack_strength(model: nn.Module, attack: Attack, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                    generator: torch.Generator, batch_size: int = 500) -> dict[str, float]:
    """Attack the points of ``x`` (N, C, H, W) in [0, 1] that ``model`` classifies correctly.

    Returns the robust accuracy over all N points (at ``eps``; for a minimization attack with ``eps=None``,
    "not fooled at any size") with its 95% Wilson interval (``robust_accuracy_ci_low``/``_ci_high``) and
    ``robust_accuracy_n`` = N, the success rate among clean-correct points, and for minimization attacks
    the median minimal perturbation norm over clean-correct points (+inf for points never fooled, so the
    median is honest when the attack fails often) with its distribution-free 95% interval from order
    statistics (``median_min_<norm>_ci_low``/``_ci_high``) and ``median_min_<norm>_n``, the number of
    clean-correct points it is the median of.
    """
    out = attack_points(model, attack, x, y, eps, generator, batch_size)
    ok = out.clean_correct
    n_ok = int(ok.sum())
    res = {"subset_clean_accuracy": float(ok.float().mean()),
           "robust_accuracy": float(out.robust.float().mean()),
           **_with_n("robust_accuracy", wilson_interval(int(out.robust.sum()), x.shape[0]), x.shape[0]),
           "attack_success_rate": float(out.success[ok].float().mean()) if n_ok else float("nan")}
    if attack.family == AttackFamily.MINIMIZATION:
        size = out.linf if attack.norm is Norm.LINF else out.l2
        size = torch.where(out.fooled, size, torch.full_like(size, float("inf")))
        key = f"median_min_{attack.norm.value}"
        # torch's median is the lower of the two middle values for even n: still inside the interval's ranks
        res[key] = float(size[ok].median()) if n_ok else float("nan")
        res.update(_with_n(key, median_interval(size[ok].cpu().numpy()), n_ok))
    return res


def _with_n(key: str, interval: tuple[float, float], n: int) -> dict[str, float]:
    return {f"{key}_ci_low": interval[0], f"{key}_ci_high": interval[1], f"{key}_n": n}


PREACTIVATION_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def preactivation_quantiles(model: nn.Module, x: torch.Tensor, batch_size: int = 500,
                            quantiles: tuple[float, ...] = PREACTIVATION_QUANTILES) -> list[dict[str, float]]:
    """Per ReLU (or JumpReLU) module of ``model``, in forward order, on inputs ``x`` (N, C, H, W) in [0, 1]:
    the share of its inputs that are positive and the ``quantiles`` of the positive ones.

    A jump k only changes units whose pre-activation lies in (0, k], so these quantiles are the scale a grid
    of jumps has to span (a model without BatchNorm has no unit scale to assume). One row per module:
    ``{"module", "n", "positive_share", "q0.5", ...}``."""
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, JumpReLU))]
    names = {id(m): n for n, m in model.named_modules()}
    pos: dict[int, list[np.ndarray]] = {id(m): [] for m in acts}
    count = {id(m): 0 for m in acts}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        v = inputs[0].detach().flatten()
        count[id(module)] += v.numel()
        pos[id(module)].append(v[v > 0].cpu().numpy())

    handles = [m.register_forward_hook(hook) for m in acts]
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    rows = []
    for m in acts:
        p = np.concatenate(pos[id(m)]) if pos[id(m)] else np.zeros(0, dtype=np.float32)
        q = np.quantile(p, quantiles) if p.size else np.full(len(quantiles), np.nan)
        rows.append({"module": names.get(id(m), type(m).__name__), "n": count[id(m)],
                     "positive_share": p.size / max(count[id(m)], 1),
                     **{f"q{t:g}": float(v) for t, v in zip(quantiles, q)}})
    return rows
