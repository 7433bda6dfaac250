"""Projected gradient descent (Madry et al. 2018), L-inf and L2, with random start and restarts; untargeted
or targeted."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core.attack_base import Attack, AttackFamily, margin_loss, reached
from robustbench_lab.core.errors import check_bool, check_choice, check_number
from robustbench_lab.core.norms import normalize_grad, project, random_in_ball
from robustbench_lab.core.rng import subset

LOSSES = ("ce", "margin")
# Fooled rows leave the batch (their kept point cannot change any more). Looking costs a host
# synchronisation, so PGD looks every COMPACT_EVERY steps and compacts once COMPACT_SHARE of the rows it
# steps are done. On the default model (ResNet-20, 500 points, eps 0.1, 20 steps, one thread, seed 0) the
# backward passes per example fell from 20 to 2.65 (looking every step: 2.21, every 4: 4.06) and the time
# to 0.13x the plain loop's (median of 3 interleaved runs on a shared 2-core machine).
COMPACT_EVERY = 2
COMPACT_SHARE = 0.25
# Batches of 1-3 rows take other CPU kernels than larger ones (logits and gradients differ in the last
# bits), so a compacted batch keeps at least this many rows and per-example results stay bit-identical.
MIN_ROWS = 8


class PGD(Attack):
    """Maximize the loss inside the eps ball intersected with the [0, 1] box.

    Each step: x <- Proj(x + step * dir(grad)), dir = sign (L-inf) or grad/||grad||_2 (L2). Step size
    ``step_size`` (absolute) or ``rel_stepsize * eps`` (default 2.5 / steps, Madry's choice). Every iterate
    is feasible, so the first iterate that reaches the goal (misclassified; targeted: predicted as the
    target) is kept as that example's adversarial; otherwise the iterate of highest loss is kept. Restarts
    (each from a fresh random point) keep the per-example worst case. ``loss='margin'`` is the CW margin
    (CW-L-inf is PGD on it).

    Targeted mode (``target`` (B,)): the loss is minus the cross-entropy to the target (descending it, as
    Foolbox and torchattacks do) or the targeted margin z_t - max_{j != t} z_j; an example labelled as its
    target is returned unchanged.

    Cost: one forward and one backward pass per step for every example not yet kept; an example stops
    being stepped (within a few steps of its kept point: see ``COMPACT_EVERY``) once its kept point is
    final, which does not change any result.
    """

    name = "pgd"
    family = AttackFamily.FIXED_EPS
    targetable = True

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

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) the loss PGD ascends, from ``logits`` (B, K): towards misclassifying ``y``, or, targeted,
        towards ``target`` (minus the cross-entropy to it, or the margin z_t - max_{j != t} z_j)."""
        if target is None:
            return F.cross_entropy(logits, y, reduction="none") if self.loss == "ce" else margin_loss(logits, y)
        if self.loss == "ce":
            return -F.cross_entropy(logits, target, reduction="none")
        return -margin_loss(logits, target)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator, target: torch.Tensor | None = None) -> torch.Tensor:
        assert eps is not None
        step = self.step_size if self.step_size is not None else self.rel_stepsize * eps
        best = x.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        # kept point final; targeted, an example labelled as its target has nothing to reach
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) if target is None else target == y
        bshape = (-1,) + (1,) * (x.dim() - 1)
        for r in range(self.restarts):
            todo = ~found
            if not todo.any():   # one synchronisation per restart
                break
            rows = todo.nonzero().squeeze(1)
            xs, ys = x[rows], y[rows]
            ts = None if target is None else target[rows]
            xa = random_in_ball(xs, eps, self.norm, subset(generator, rows)).clamp(0, 1) if self.random_start else xs.clone()
            for t in range(self.steps + 1):
                xa.requires_grad_(True)
                logits = model(xa)
                per = self._loss(logits, ys, ts)
                with torch.no_grad():
                    # Keep the first iterate that reaches the goal, else the highest loss; rows whose kept
                    # point is final are left as they are (no boolean indexing: no synchronisation).
                    hit = reached(logits.argmax(1), ys, ts)
                    done = found[rows]
                    better = ~done & (hit | (per > best_loss[rows]))
                    best[rows] = torch.where(better.view(bshape), xa.detach(), best[rows])
                    best_loss[rows] = torch.where(better, per.detach(), best_loss[rows])
                    found[rows] = done | hit
                if t == self.steps:
                    break
                (g,) = torch.autograd.grad(per.sum(), xa)
                with torch.no_grad():
                    xa = project(xa.detach() + step * normalize_grad(g, self.norm), xs, eps, self.norm)
                if (t + 1) % COMPACT_EVERY == 0:
                    keep = _still_needed(found[rows])
                    if keep is None:
                        break
                    if keep.numel() < rows.numel():
                        xa, xs, ys, rows = xa[keep], xs[keep], ys[keep], rows[keep]
                        ts = None if ts is None else ts[keep]
        return best


def _still_needed(done: torch.Tensor) -> torch.Tensor | None:
    """Which of the rows a PGD restart steps to keep stepping, given ``done`` (R,) bool (their kept point
    is final): None when all are done; every row while fewer than ``COMPACT_SHARE`` are; else the rows not
    done, padded with done ones up to ``MIN_ROWS``, in their order. One host synchronisation."""
    n_left = int((~done).sum())
    n = done.numel()
    if n_left == 0:
        return None
    if n - n_left < COMPACT_SHARE * n:
        return torch.arange(n, device=done.device)
    order = torch.sort(done.to(torch.uint8), stable=True).indices   # rows not done first, each group in order
    return order[:max(n_left, min(MIN_ROWS, n))].sort().values
