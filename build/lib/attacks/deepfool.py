"""DeepFool (Moosavi-Dezfooli, Fawzi, Frossard, "DeepFool: a simple and accurate method to fool deep neural
networks", CVPR 2016), L2 and L-inf. Written from the paper; Foolbox's ``deepfool.py`` served as a reference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robustbench_lab.core.attack_base import Attack, AttackFamily
from robustbench_lab.core.errors import check_number
from robustbench_lab.core.norms import Norm, flat

MIN_STEP = 1e-4   # added to every step length, as in the paper's code, so a step never stalls on the boundary


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-example values (B,) broadcast against a batch shaped like ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class DeepFool(Attack):
    """Iterative linearization toward the closest decision boundary (a minimization attack).

    Inputs ``x`` (B, C, H, W) in [0, 1], labels ``y`` (B,). Returns the final iterate of every example
    (adversarial or not: success is recomputed by the harness); examples misclassified on arrival are
    returned unchanged.

    Candidates: the ``candidates - 1`` classes other than y with the highest clean logits (for a correctly
    classified example, the top ``candidates`` classes minus the first). Each step, for every example still
    classified as y: f_k = z_k - z_y and w_k = grad f_k for each candidate k (one backward pass per
    candidate), the linearized distance d_k = |f_k| / ||w_k||_q (q = 2 for L2, q = 1, the dual norm, for
    L-inf), k* = argmin d_k, and the step r = (d_k* + 1e-4) * u with u = w / ||w||_2 (L2) or sign(w)
    (L-inf). Steps accumulate: x' = clip(x + (1 + overshoot) * sum r, 0, 1). Stops per example once the
    prediction changes, after ``steps`` iterations at most.

    Cost per step: one forward and ``candidates - 1`` backward passes per example still classified as y,
    plus one forward pass on the clean batch.
    """

    name = "deepfool"
    family = AttackFamily.MINIMIZATION
    supported_norms = (Norm.L2, Norm.LINF)

    def __init__(self, *, norm: str = "l2", steps: int = 50, candidates: int = 10,
                 overshoot: float = 0.02) -> None:
        super().__init__(norm=norm)
        check_number("attack.steps", steps, low=1, integer=True)
        check_number("attack.candidates", candidates, low=2, integer=True,
                     hint="the label and at least one other class")
        check_number("attack.overshoot", overshoot, low=0, high=math.inf, high_open=True)
        self.steps = int(steps)
        self.candidates = int(candidates)
        self.overshoot = float(overshoot)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator) -> torch.Tensor:
        x_adv = x.clone()
        with torch.no_grad():
            logits = model(x)
        k = logits.shape[1]
        if k < 2:
            raise ValueError(f"{self.name}: the model has {k} output(s); at least 2 classes are needed")
        idx = (logits.argmax(1) == y).nonzero().squeeze(1)
        if idx.numel() == 0:
            return x_adv
        c = min(self.candidates, k) - 1
        order = logits[idx].argsort(1, descending=True)
        cand = order[order != y[idx, None]].view(idx.numel(), k - 1)[:, :c]   # (n, c) other classes
        x0, ys = x[idx], y[idx]
        r_tot = torch.zeros_like(x0)
        xa = x0.clone()
        active = torch.arange(idx.numel(), device=x.device)   # rows of x0 still classified as y
        q = self.norm.dual
        for _ in range(self.steps):
            xg = xa[active].clone().requires_grad_(True)
            out = model(xg)
            still = out.detach().argmax(1) == ys[active]
            # Rows fooled by the previous step are done. They stay in this step's batch (their backward
            # passes are spent and counted) but get no update.
            active = active[still]
            if active.numel() == 0:
                break
            sub = out[still]
            z_y = sub.gather(1, ys[active, None]).squeeze(1)
            best_d = torch.full((active.numel(),), float("inf"), dtype=x.dtype, device=x.device)
            best_w = torch.zeros_like(x0[active])
            for j in range(c):
                f = sub.gather(1, cand[active, j, None]).squeeze(1) - z_y          # < 0 while y wins
                (w,) = torch.autograd.grad(f.sum(), xg, retain_graph=j < c - 1)
                with torch.no_grad():
                    w = w[still]
                    d = f.detach().abs() / flat(w).norm(p=q, dim=1).clamp_min(1e-12)
                    closer = d < best_d
                    best_d = torch.where(closer, d, best_d)
                    best_w = torch.where(_bc(closer, w), w, best_w)
            with torch.no_grad():
                if self.norm is Norm.LINF:
                    u = best_w.sign()
                else:
                    u = best_w / _bc(flat(best_w).norm(dim=1).clamp_min(1e-12), best_w)
                r_tot[active] += _bc(best_d + MIN_STEP, u) * u
                xa[active] = (x0[active] + (1 + self.overshoot) * r_tot[active]).clamp(0, 1)
        x_adv[idx] = xa
        return x_adv
