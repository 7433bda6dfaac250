"""Projected gradient descent (Madry et al. 2018), L-inf and L2, with random start and restarts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core.attack_base import Attack, AttackFamily, margin_loss
from robustbench_lab.core.errors import check_bool, check_choice, check_number
from robustbench_lab.core.norms import normalize_grad, project, random_in_ball
from robustbench_lab.core.rng import subset

LOSSES = ("ce", "margin")


class PGD(Attack):
    """Maximize the loss inside the eps ball intersected with the [0, 1] box.

    Each step: x <- Proj(x + step * dir(grad)), dir = sign (L-inf) or grad/||grad||_2 (L2). Step size
    ``step_size`` (absolute) or ``rel_stepsize * eps`` (default 2.5 / steps, Madry's choice). Every iterate
    is feasible, so any iterate that is misclassified is kept as that example's adversarial; otherwise the
    iterate of highest loss is kept. Restarts (each from a fresh random point) keep the per-example worst
    case. ``loss='margin'`` is the CW margin (CW-L-inf is PGD on it). Cost per step: one forward and one
    backward pass per example.
    """

    name = "pgd"
    family = AttackFamily.FIXED_EPS

    def __init__(self, *, norm: str = "linf", steps: int = 20, rel_stepsize: float | None = None,
                 step_size: float | None = None, random_start: bool = True, restarts: int = 1,
                 loss: str = "ce") -> None:
        super().__init__(norm=norm)
        check_number("attack.steps", steps, low=1, integer=True)
        check_number("attack.restarts", restarts, low=1, integer=True)
        check_choice("attack.loss", loss, LOSSES)
        check_number("attack.rel_stepsize", rel_stepsize, low=0, low_open=True, allow_none=True,
                     hint="the step as a multiple of eps; null: 2.5 / steps")
        check_number("attack.step_size", step_size, low=0, low_open=True, allow_none=True,
                     hint="absolute, in input space; null: rel_stepsize * eps")
        check_bool("attack.random_start", random_start)
        self.steps = int(steps)
        self.rel_stepsize = float(rel_stepsize) if rel_stepsize is not None else 2.5 / self.steps
        self.step_size = float(step_size) if step_size is not None else None
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        self.loss = loss

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        return margin_loss(logits, y)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator) -> torch.Tensor:
        assert eps is not None
        step = self.step_size if self.step_size is not None else self.rel_stepsize * eps
        best = x.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        bshape = (-1,) + (1,) * (x.dim() - 1)
        for r in range(self.restarts):
            todo = ~found
            if not todo.any():
                break
            idx = todo.nonzero().squeeze(1)
            xs, ys = x[idx], y[idx]
            xa = random_in_ball(xs, eps, self.norm, subset(generator, idx)).clamp(0, 1) if self.random_start else xs.clone()
            for t in range(self.steps + 1):
                xa.requires_grad_(True)
                logits = model(xa)
                per = self._loss(logits, ys)
                with torch.no_grad():
                    mis = logits.argmax(1) != ys
                    # Keep misclassified iterates first, then the highest loss.
                    better = (mis & ~found[idx]) | (~found[idx] & ~mis & (per > best_loss[idx]))
                    if better.any():
                        bi = idx[better]
                        best[bi] = xa.detach()[better]
                        best_loss[bi] = per.detach()[better]
                        found[bi] = found[bi] | mis[better]
                if t == self.steps:
                    break
                (g,) = torch.autograd.grad(per.sum(), xa)
                with torch.no_grad():
                    xa = project(xa.detach() + step * normalize_grad(g, self.norm), xs, eps, self.norm)
        return best
