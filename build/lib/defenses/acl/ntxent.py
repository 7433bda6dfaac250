"""The NT-Xent (SimCLR) loss and the contrastive attack: L-inf PGD that maximizes it over the views."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from defenses.acl.contrastive_model import ContrastiveModel
from defenses.acl.dual_bn import bn_branch
from robustbench_lab.core.model import eval_frozen
from robustbench_lab.core.norms import Norm, project, random_in_ball


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (SimCLR) of two views: ``z1``, ``z2`` (N, D), positive pairs (z1[i], z2[i]).

    With s the cosine similarity over all 2N projections, anchor a with positive p(a):
    l_a = -log( exp(s(a, p(a)) / t) / sum_{k != a} exp(s(a, k) / t) ); returns the mean over all 2N anchors.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.t()) / temperature
    self_pair = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_pair, float("-inf"))   # the anchor is not its own negative
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def contrastive_pgd(model: ContrastiveModel, x1: torch.Tensor, x2: torch.Tensor, *, eps: float,
                    step_size: float, steps: int, views: str = "both", random_start: bool = True,
                    temperature: float = 0.5, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """L-inf PGD maximizing NT-Xent(model(x1'), model(x2')) over both views (``views='both'``: A2A, DS) or
    the second only (``'second'``: A2S), in eval mode on the pgd BN (the caller's modes and branches are
    restored). Views (B, C, H, W) in the model's bounds; returns the adversarial views, each within ``eps``
    of its clean view and inside the bounds (an unattacked view is returned unchanged)."""
    if views not in ("both", "second"):
        raise ValueError(f"views must be 'both' or 'second', got {views!r}")
    lower, upper = getattr(model, "bounds", (0.0, 1.0))
    n = x1.shape[0]
    clean = (x1.detach(), x2.detach())
    attacked = (views == "both", True)
    adv = []
    for x, a in zip(clean, attacked):
        if a and random_start:
            adv.append(project(random_in_ball(x, eps, Norm.LINF, generator), x, eps, Norm.LINF, lower, upper))
        else:
            adv.append(x.clone())
    with eval_frozen(model, warn_train=False), bn_branch(model, "pgd"):
        for _ in range(int(steps)):
            for i, a in enumerate(attacked):
                if a:
                    adv[i].requires_grad_(True)
            z = model(torch.cat(adv))
            loss = nt_xent(z[:n], z[n:], temperature)
            inputs = [adv[i] for i, a in enumerate(attacked) if a]
            grads = torch.autograd.grad(loss, inputs)
            with torch.no_grad():
                gi = iter(grads)
                for i, a in enumerate(attacked):
                    if a:
                        adv[i] = project(adv[i].detach() + step_size * next(gi).sign(), clean[i], eps, Norm.LINF,
                                         lower, upper)
    return adv[0].detach(), adv[1].detach()
