"""Decoupled Direction and Norm attack (Rony, Hafemann, Oliveira, Ben Ayed, Sabourin, Granger, "Decoupling
Direction and Norm for Efficient Gradient-Based L2 Adversarial Attacks and Defenses", CVPR 2019), L2.
Written from the paper; the authors' code (jeromerony/fast_adversarial, and adv_lib) and Foolbox's
``ddn.py`` served as references for the defaults and the update order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attacks.fmn import cosine
from robustbench_lab.core.attack_base import Attack, AttackFamily, attacked_rows, reached
from robustbench_lab.core.errors import check_number
from robustbench_lab.core.norms import Norm, l2
from robustbench_lab.core.rng import subset


class DDN(Attack):
    """DDN: gradient steps on the cross-entropy, each rescaled onto a sphere whose radius follows success.

    Inputs ``x`` (B, C, H, W) in [0, 1], labels ``y`` (B,). Returns, per example, the adversarial iterate of
    smallest L2 norm; examples misclassified on arrival, and examples never fooled, come back unchanged.

    Method, per example, from delta = 0 and epsilon = ``init_epsilon``, for i = 0 .. steps - 1 with the step
    size alpha cosine-annealed from ``alpha_init`` to ``alpha_final`` (the authors' SGD with
    ``CosineAnnealingLR``): evaluate the cross-entropy at x + delta and its gradient g (a random normal
    direction where g is exactly 0); keep x + delta if it is misclassified and smaller than the best so far;
    delta <- delta + alpha g / ||g||_2; epsilon <- epsilon (1 - gamma) if x + delta was adversarial before
    the step, else epsilon (1 + gamma), capped by the norm of the farthest point of the box; then delta is
    rescaled to norm epsilon exactly (onto the sphere, not into the ball: the norm is the attack's own
    variable), optionally quantized to ``levels`` grey levels, and clipped into the box.

    ``levels``: the authors' code rounds every iterate to 256 levels (8-bit images) by default; Foolbox's
    port does not, and neither does this one by default (null): the harness measures norms in continuous
    pixel space, and rounding adds up to 1/510 per pixel to a perturbation (about 6% of the minimal L2
    norm on the tests' 64-pixel linear model). ``levels=256`` reproduces the authors.

    Targeted mode (``target`` (B,)), as the authors define it: the steps descend the cross-entropy to the
    target (their loss ``multiplier * CE`` with multiplier +1), and an iterate is adversarial, for the best
    point and for the radius' shrink or growth, when it is predicted as t. Examples already predicted as
    their target, or labelled as it, are not attacked.

    Cost: one forward and one backward pass per attacked example per step (DDN keeps shrinking the norm
    after it has found an adversarial, so no example stops early), plus one forward pass on the clean batch.
    """

    name = "ddn"
    family = AttackFamily.MINIMIZATION
    supported_norms = (Norm.L2,)
    targetable = True

    def __init__(self, *, norm: str = "l2", steps: int = 100, init_epsilon: float = 1.0, gamma: float = 0.05,
                 alpha_init: float = 1.0, alpha_final: float = 0.01, levels: int | None = None) -> None:
        super().__init__(norm=norm)
        check_number("attack.steps", steps, low=1, integer=True)
        check_number("attack.init_epsilon", init_epsilon, low=0, low_open=True, high=math.inf, high_open=True,
                     hint="the L2 radius of the first step, in [0, 1] pixel space")
        check_number("attack.gamma", gamma, low=0, low_open=True, high=1, high_open=True)
        check_number("attack.alpha_init", alpha_init, low=0, low_open=True, high=math.inf, high_open=True)
        check_number("attack.alpha_final", alpha_final, low=0, low_open=True, high=alpha_init)
        check_number("attack.levels", levels, low=2, integer=True, allow_none=True,
                     hint="grey levels per channel to round iterates to (256 for 8-bit images), or null")
        self.steps = int(steps)
        self.init_epsilon = float(init_epsilon)
        self.gamma = float(gamma)
        self.alpha_init = float(alpha_init)
        self.alpha_final = float(alpha_final)
        self.levels = None if levels is None else int(levels)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator, target: torch.Tensor | None = None) -> torch.Tensor:
        best = x.clone()
        idx, x0, y0, t0 = attacked_rows(model, x, y, target)
        if idx.numel() == 0:
            return best
        streams = subset(generator, idx)   # the template hands every attack per-example streams
        n = idx.numel()
        shape = (n, *([1] * (x.dim() - 1)))
        xa = x0.clone()
        worst = l2(torch.maximum(x0, 1 - x0))
        best_norm = worst.clone()
        best_x = x0.clone()
        radius = torch.full_like(worst, self.init_epsilon)
        for i in range(self.steps):
            alpha = cosine(self.alpha_init, self.alpha_final, i, self.steps)
            xa.requires_grad_(True)
            logits = model(xa)
            if t0 is None:
                loss = F.cross_entropy(logits, y0, reduction="sum")
            else:
                loss = -F.cross_entropy(logits, t0, reduction="sum")   # ascending it descends the CE to t
            (g,) = torch.autograd.grad(loss, xa)
            with torch.no_grad():
                xa = xa.detach()
                delta = xa - x0
                size = l2(delta)
                adv = reached(logits.argmax(1), y0, t0)
                better = adv & (size < best_norm)
                best_norm = torch.where(better, size, best_norm)
                best_x[better] = xa[better]
                g_norm = l2(g)
                flat_g = g_norm == 0
                # one draw per step whatever the batch holds, so an example's stream does not depend on it
                g[flat_g] = streams.take(flat_g).normal(*x.shape[1:], dtype=x.dtype)
                delta = delta + alpha * g / l2(g).clamp_min(1e-12).view(shape)
                radius = torch.minimum(radius * torch.where(adv, 1 - self.gamma, 1 + self.gamma), worst)
                delta = delta * (radius / l2(delta).clamp_min(1e-12)).view(shape)
                xa = x0 + delta
                if self.levels is not None:
                    xa = (xa * (self.levels - 1)).round() / (self.levels - 1)
                xa = xa.clamp(0, 1)
        best[idx] = best_x
        return best
