"""What the tuning measures at each jump, on validation points: the shattered-gradient symptom and the
strength of an attack (through the core's one robust-count loop and one input-gradient measurement)."""

from __future__ import annotations

import torch
from torch import nn

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
    "not fooled at any size"), the success rate among clean-correct points, and for minimization attacks
    the median minimal perturbation norm over clean-correct points (+inf for points never fooled, so the
    median is honest when the attack fails often).
    """
    out = attack_points(model, attack, x, y, eps, generator, batch_size)
    ok = out.clean_correct
    n_ok = int(ok.sum())
    res = {"subset_clean_accuracy": float(ok.float().mean()),
           "robust_accuracy": float(out.robust.float().mean()),
           "attack_success_rate": float(out.success[ok].float().mean()) if n_ok else float("nan")}
    if attack.family == AttackFamily.MINIMIZATION:
        size = out.linf if attack.norm is Norm.LINF else out.l2
        size = torch.where(out.fooled, size, torch.full_like(size, float("inf")))
        res[f"median_min_{attack.norm.value}"] = float(size[ok].median()) if n_ok else float("nan")
    return res
