"""FGSM (Goodfellow et al. 2015) and its L2 analogue (fast gradient method)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core.attack_base import Attack, AttackFamily
from robustbench_lab.core.errors import check_bool, check_number
from robustbench_lab.core.norms import normalize_grad, project, random_in_ball


class FGSM(Attack):
    """One gradient step of size eps: x + eps * sign(grad) (L-inf) or eps * grad/||grad||_2 (L2).

    ``random_start=True`` gives the single-step variant with a random start used by fast adversarial training
    (Wong et al. 2020): start uniformly in the ball, step ``step_scale * eps``.
    Targeted mode (``target`` (B,)): one step down the cross-entropy to the target (Kurakin et al. 2017;
    Foolbox and torchattacks alike); an example labelled as its target is returned unchanged.
    Inputs (B, C, H, W) in [0, 1]; one forward and one backward pass per example.
    """

    name = "fgsm"
    family = AttackFamily.FIXED_EPS
    targetable = True

    def __init__(self, *, norm: str = "linf", random_start: bool = False, step_scale: float = 1.0) -> None:
        super().__init__(norm=norm)
        check_bool("attack.random_start", random_start)
        check_number("attack.step_scale", step_scale, low=0, low_open=True, high=math.inf, high_open=True,
                     hint="the step as a multiple of eps")
        self.random_start = bool(random_start)
        self.step_scale = float(step_scale)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator, target: torch.Tensor | None = None) -> torch.Tensor:
        assert eps is not None
        x0 = x
        if self.random_start:
            x0 = random_in_ball(x, eps, self.norm, generator).clamp(0, 1)
        x0 = x0.clone().requires_grad_(True)
        if target is None:
            loss = F.cross_entropy(model(x0), y, reduction="sum")
        else:
            loss = -F.cross_entropy(model(x0), target, reduction="sum")
        (g,) = torch.autograd.grad(loss, x0)
        out = project(x0.detach() + self.step_scale * eps * normalize_grad(g, self.norm), x, eps, self.norm)
        if target is not None:
            out = torch.where((target == y).view(-1, *[1] * (x.dim() - 1)), x, out)
        return out
