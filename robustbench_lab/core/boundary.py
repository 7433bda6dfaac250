"""The decision boundary on a segment: where a minimization attack's last step crossed it.

A step-based minimization attack (trust region, DeepFool) overshoots on purpose so that its last step
crosses the boundary; the overshoot then inflates the returned norm. ``bisect_boundary`` searches the
segment between the last iterate still classified as the label and the first one that is not, with forward
passes only, and returns the adversarial end of the final bracket.
"""

from __future__ import annotations

import torch
from torch import nn

from robustbench_lab.core.attack_base import margin_loss
from robustbench_lab.core.norms import flat

# A probe counts as adversarial only with a margin above this fraction of its largest |logit|: the template
# re-verifies the returned tensor in another batch, and batch-size-dependent kernels move logits by ~1e-7 of
# their size (measured 3e-6 on logits ~10 between batch 1 and larger batches), so a point that the search
# saw a hair past the boundary must stay past it there.
MARGIN_TOL = 1e-5


def clearly_adversarial(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) bool: some class beats the label ``y`` (N,) in ``logits`` (N, K) by more than the tolerance."""
    return margin_loss(logits, y) > MARGIN_TOL * logits.abs().amax(1).clamp_min(1.0)


def bisect_boundary(model: nn.Module, lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor, steps: int,
                    m_lo: torch.Tensor | None = None, m_hi: torch.Tensor | None = None) -> torch.Tensor:
    """The point nearest the boundary found on each segment from ``lo`` to ``hi``.

    ``lo``, ``hi``: (N, C, H, W) in the box; ``lo`` classified as ``y`` (N,), ``hi`` not. ``steps`` forward
    passes on the N points, no gradients. Returns (N, C, H, W): points of the segments (so in the box) that
    are not classified as ``y``, each the adversarial end of its final bracket (``hi`` itself if no probe
    was adversarial). The bracket halves at every probe; with the margins max_{j != y} z_j - z_y at the two
    ends (``m_lo`` < 0 <= ``m_hi``, (N,)) the first probe is where that margin, taken as linear along the
    segment, changes sign (exact on a linear model; the halvings then refine the smaller side).
    """
    a_lo = torch.zeros(lo.shape[0], dtype=lo.dtype, device=lo.device)
    a_hi = torch.ones_like(a_lo)
    best = hi.clone()
    # probes stay between the two ends coordinate-wise, so rounding cannot leave the box
    low, high = torch.minimum(lo, hi), torch.maximum(lo, hi)
    span = hi - lo
    for k in range(steps):
        if k == 0 and m_lo is not None and m_hi is not None:
            a = (m_lo / (m_lo - m_hi)).to(lo.dtype).nan_to_num(0.5).clamp(1e-3, 1 - 1e-3)
        else:
            a = (a_lo + a_hi) / 2
        probe = torch.minimum(torch.maximum(lo + a.view(-1, *[1] * (lo.dim() - 1)) * span, low), high)
        with torch.no_grad():
            adv = clearly_adversarial(model(probe), y)
        best = torch.where(adv.view(-1, *[1] * (lo.dim() - 1)), probe, best)
        a_hi = torch.where(adv, a, a_hi)
        a_lo = torch.where(adv, a_lo, a)
    return best


def nearer(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    """Per example, whichever of ``a`` and ``b`` (N, ...) is nearer to ``x`` in the p-norm (``a`` on ties):
    a bisected point on a segment that turns away from ``x`` may lie farther than the crossing iterate."""
    na, nb = flat(a - x).norm(p=p, dim=1), flat(b - x).norm(p=p, dim=1)
    return torch.where((na <= nb).view(-1, *[1] * (x.dim() - 1)), a, b)


class Crossings:
    """The brackets of the examples a step-based attack has fooled, gathered while it runs, and their
    bisection once it ends (one batch of ``steps`` forward passes over all of them)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.parts: list[tuple[torch.Tensor, ...]] = []

    def add(self, rows: torch.Tensor, y: torch.Tensor, x_prev: torch.Tensor, z_prev: torch.Tensor,
            x_new: torch.Tensor, z_new: torch.Tensor) -> torch.Tensor:
        """Record the examples whose new iterates ``x_new`` (N, C, H, W), with logits ``z_new`` (N, K), are
        not classified as ``y`` (N,) while ``x_prev`` (logits ``z_prev``) were; ``rows`` (N,) are their
        rows in the attack's output. Returns that mask (N,)."""
        adv = z_new.argmax(1) != y
        if adv.any() and self.steps:
            self.parts.append((rows[adv], x_prev[adv], x_new[adv], margin_loss(z_prev[adv], y[adv]),
                               margin_loss(z_new[adv], y[adv])))
        return adv

    def finish(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, p: float) -> None:
        """Write into ``x_adv`` (B, C, H, W), for every recorded example, the bisected boundary point or its
        crossing iterate, whichever is nearer to its clean input in ``x`` (labels ``y`` (B,))."""
        if not self.parts:
            return
        rows, lo, hi, m_lo, m_hi = (torch.cat(part) for part in zip(*self.parts))
        found = bisect_boundary(model, lo, hi, y[rows], self.steps, m_lo, m_hi)
        x_adv[rows] = nearer(x[rows], found, hi, p)
