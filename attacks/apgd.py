"""Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020), untargeted (``APGD``: CE or DLR loss) and targeted on the DLR loss
(``APGDT``), L-inf and L2, as standalone fixed-epsilon attacks on the harness's contract.

Our implementation of the method as the paper defines it; the authors' code (``pyautoattack.autopgd_base``,
which ``attack=autoattack`` runs) was read for the details the paper leaves open. Every random start is
drawn from the call's per-example streams, so an example's result depends on (seed, its id) alone, not on
the batch it shares or on the attacks that ran before. ``docs/methods.md`` section 2.12 lists where we
depart from the authors' code and why.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core.attack_base import Attack, AttackFamily
from robustbench_lab.core.errors import check_choice, check_number
from robustbench_lab.core.norms import Norm, flat, l2, normalize_grad, project
from robustbench_lab.core.rng import ExampleRandom, as_streams

MOMENTUM = 0.75        # alpha: weight of the new projected step against the previous displacement
INITIAL_STEP = 2.0     # the step starts at 2 eps and is only ever halved


def checkpoints(n_iter: int) -> list[int]:
    """Iterations (1..n_iter) after which the step size is reviewed: w_j = ceil(p_j * n_iter) with
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) while p_j <= 1.

    The fractions are kept in hundredths as integers: in floats 0.22 + 0.19 exceeds 0.41, and the ceiling
    would move the checkpoint a whole iteration."""
    out: list[int] = []
    prev, p = 0, 22
    while p <= 100:
        w = -(-p * n_iter // 100)
        if w >= 1 and (not out or w > out[-1]):
            out.append(w)
        prev, p = p, p + max(p - prev - 3, 6)
    return out


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR loss (B,) of logits (B, K): -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3), with pi the
    classes sorted by decreasing logit. The ratio is invariant to shifting and scaling the logits. It needs a
    third class; with K = 2 the denominator is 1 (the plain margin)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    top = logits.sort(1, descending=True).values
    scale = top[:, 0] - top[:, 2] if logits.shape[1] >= 3 else torch.ones_like(z_y)
    return -(z_y - other) / (scale + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss (B,): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), t the target class. It needs four
    classes; with K = 3 the denominator is z_pi1 - z_pi3, with K = 2 it is 1 (the plain targeted margin)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    top = logits.sort(1, descending=True).values
    k = logits.shape[1]
    if k >= 4:
        scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3])
    elif k == 3:
        scale = top[:, 0] - top[:, 2]
    else:
        scale = torch.ones_like(z_y)
    return -(z_y - z_t) / (scale + 1e-12)


UNTARGETED_LOSSES = {"ce": lambda logits, y: F.cross_entropy(logits, y, reduction="none"), "dlr": dlr_loss}


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class APGD(Attack):
    """Auto-PGD: PGD with momentum and a step size that adapts itself, without a step-size parameter.

    Inputs x (B, C, H, W) in [0, 1], labels y (B,); returns (B, C, H, W) inside the eps ball and the box.
    Start: a random point of the ball (L-inf: a uniform draw in the cube scaled so its largest coordinate
    is eps; L2: a Gaussian direction at radius eps), clipped to the box. Step t:
    z = P(x_t + eta * dir(grad)), x_{t+1} = P(x_t + alpha (z - x_t) + (1 - alpha)(x_t - x_{t-1})), with
    dir = sign (L-inf) or grad / ||grad||_2 (L2), alpha = 0.75 (1 on the first step), eta = 2 eps at the
    start. At each checkpoint (``checkpoints``) an example's step is halved, and its iterate moved back to
    its best point so far (with that point's gradient), when fewer than ``rho`` of the steps since the last
    checkpoint increased its loss, or when its step was not halved at the last checkpoint and its best loss
    has not grown since. An example stops as soon as an iterate is misclassified; that iterate is its
    result. ``n_restarts`` runs start again from a new random point on the points still robust; points that
    stay robust return their highest-loss iterate. Loss ``ce`` (cross-entropy) or ``dlr`` (``dlr_loss``).

    Cost per restart and attacked example: at most ``n_iter`` + 1 forward and ``n_iter`` backward passes,
    plus one clean forward pass per call.
    """

    name = "apgd"
    family = AttackFamily.FIXED_EPS
    supported_norms: ClassVar[tuple[Norm, ...]] = (Norm.LINF, Norm.L2)

    def __init__(self, *, norm: str = "linf", n_iter: int = 100, n_restarts: int = 1, loss: str = "ce",
                 rho: float = 0.75) -> None:
        super().__init__(norm=norm)
        check_number("attack.n_iter", n_iter, low=1, integer=True)
        check_number("attack.n_restarts", n_restarts, low=1, integer=True)
        check_number("attack.rho", rho, low=0, high=1, hint="the share of loss-increasing steps below which "
                     "the step is halved; the paper's value is 0.75")
        self.n_iter = int(n_iter)
        self.n_restarts = int(n_restarts)
        self.loss = self._check_loss(loss)
        self.rho = float(rho)

    def _check_loss(self, loss: str) -> str:
        return check_choice("attack.loss", loss, tuple(UNTARGETED_LOSSES))

    # -- what varies between APGD and APGD-T -------------------------------------------------------------
    def _runs(self, n_classes: int) -> list[tuple[str, int]]:
        """(stream tag, target rank) of each run, in order; rank 0 means untargeted."""
        return [(f"restart{r}", 0) for r in range(self.n_restarts)]

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        return UNTARGETED_LOSSES[self.loss](logits, y)

    # -- the method ---------------------------------------------------------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator) -> torch.Tensor:
        assert eps is not None
        generator = as_streams(generator, x.shape[0], x.device, self.name)
        out = x.clone()
        with torch.no_grad():
            clean = model(x)
        robust = clean.argmax(1) == y
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        # the targets are ranked on the clean logits, so a target does not depend on earlier runs
        ranking = clean.argsort(dim=1, descending=True, stable=True)
        for tag, rank in self._runs(clean.shape[1]):
            todo = robust.nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            target = ranking[todo, rank] if rank else None
            streams = generator.take(todo).fork(tag)
            x_r, fooled, loss_r = self._single_run(model, x[todo], y[todo], float(eps), streams, target)
            keep = fooled | (loss_r > best_loss[todo])
            out[todo[keep]] = x_r[keep]
            best_loss[todo[keep]] = loss_r[keep]
            robust[todo[fooled]] = False
        return out

    def _start(self, x: torch.Tensor, eps: float, rng: ExampleRandom) -> torch.Tensor:
        if self.norm is Norm.LINF:
            t = 2 * rng.uniform(*x.shape[1:], dtype=x.dtype) - 1
            scale = flat(t).abs().amax(1)
        else:
            t = rng.normal(*x.shape[1:], dtype=x.dtype)
            scale = l2(t)
        return (x + eps * t / _bc(scale + 1e-12, t)).clamp(0, 1)

    def _evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Logits, per-example loss (B,) and, when ``need_grad``, its gradient at ``x`` (one backward pass)."""
        x = x.detach().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            logits = model(x)
            loss = self._loss(logits, y, target)
        grad = torch.autograd.grad(loss.sum(), x)[0].detach() if need_grad else None
        return logits.detach(), loss.detach(), grad

    def _single_run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, rng: ExampleRandom,
                    target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One APGD run from a random start on (x, y) (K rows). Returns the result (K, C, H, W) (the first
        misclassified iterate, else the highest-loss one), whether it is misclassified (K,) and its loss (K,)."""
        x_cur = self._start(x, eps, rng)
        logits, loss, grad = self._evaluate(model, x_cur, y, target, need_grad=self.n_iter > 0)
        fooled = logits.argmax(1) != y
        result = x_cur.clone()          # for fooled examples: their first misclassified iterate
        x_best, loss_best, grad_best = x_cur.clone(), loss.clone(), grad.clone()
        x_prev = x_cur.clone()
        loss_cur = loss.clone()
        step = torch.full((x.shape[0],), INITIAL_STEP * eps, dtype=x.dtype, device=x.device)
        n_up = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)   # loss increases since the checkpoint
        best_at_check = loss_best.clone()
        halved_at_check = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        marks, last_mark = set(checkpoints(self.n_iter)), 0
        for t in range(1, self.n_iter + 1):
            act = (~fooled).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            xa, xs = x_cur[act], x[act]
            a = 1.0 if t == 1 else MOMENTUM
            with torch.no_grad():
                z = project(xa + _bc(step[act], xa) * normalize_grad(grad[act], self.norm), xs, eps, self.norm)
                x_new = project(xa + a * (z - xa) + (1 - a) * (xa - x_prev[act]), xs, eps, self.norm)
            # the last iterate's gradient would never be used: a forward pass is enough
            logits, loss_new, g_new = self._evaluate(model, x_new, y[act], None if target is None else target[act],
                                                     need_grad=t < self.n_iter)
            x_prev[act] = xa
            x_cur[act] = x_new
            if g_new is not None:
                grad[act] = g_new
            mis = logits.argmax(1) != y[act]
            result[act[mis]] = x_new[mis]
            fooled[act[mis]] = True
            n_up[act] += (loss_new > loss_cur[act]).long()
            loss_cur[act] = loss_new
            up = loss_new > loss_best[act]
            better = act[up]
            x_best[better], loss_best[better] = x_new[up], loss_new[up]
            if g_new is not None:
                grad_best[better] = g_new[up]
            if t in marks:
                few_up = n_up.double() < self.rho * (t - last_mark)
                stalled = ~halved_at_check & (loss_best <= best_at_check)
                cut = (few_up | stalled) & ~fooled
                step = torch.where(cut, step / 2, step)
                x_cur[cut], grad[cut], loss_cur[cut] = x_best[cut], grad_best[cut], loss_best[cut]
                halved_at_check = cut
                best_at_check = loss_best.clone()
                n_up.zero_()
                last_mark = t
        result[~fooled] = x_best[~fooled]
        return result, fooled, torch.where(fooled, torch.full_like(loss_best, float("inf")), loss_best)


class APGDT(APGD):
    """APGD-T: APGD on the targeted DLR loss (``targeted_dlr_loss``), as in AutoAttack.

    For each of the ``n_target_classes`` classes ranked 2nd, 3rd, ... by the clean logits (at most K - 1),
    in turn, ``n_restarts`` targeted APGD runs on the points still robust. Success means misclassified (the
    untargeted robustness question AutoAttack answers with it), not classified as the target. Same shapes
    and ranges as ``APGD``; cost at most ``n_target_classes * n_restarts`` APGD runs per example.
    """

    name = "apgd_t"

    def __init__(self, *, norm: str = "linf", n_iter: int = 100, n_restarts: int = 1, n_target_classes: int = 9,
                 rho: float = 0.75) -> None:
        super().__init__(norm=norm, n_iter=n_iter, n_restarts=n_restarts, loss="dlr_targeted", rho=rho)
        check_number("attack.n_target_classes", n_target_classes, low=1, integer=True,
                     hint="runner-up classes to target in turn; AutoAttack uses 9")
        self.n_target_classes = int(n_target_classes)

    def _check_loss(self, loss: str) -> str:
        return check_choice("attack.loss", loss, ("dlr_targeted",), "APGD-T runs on the targeted DLR loss only")

    def _runs(self, n_classes: int) -> list[tuple[str, int]]:
        ranks = range(1, min(self.n_target_classes, n_classes - 1) + 1)
        return [(f"target{k}/restart{r}", k) for k in ranks for r in range(self.n_restarts)]

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        assert target is not None
        return targeted_dlr_loss(logits, y, target)
