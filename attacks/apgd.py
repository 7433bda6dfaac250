"""Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020), untargeted (``APGD``: CE or DLR loss) and targeted on the DLR loss
(``APGDT``), L-inf and L2, and L1-APGD (Croce & Hein, "Mind the box: l1-APGD for sparse adversarial attacks on
image classifiers", ICML 2021) with its sparse step on the L1 ball intersected with the box, as standalone
fixed-epsilon attacks on the harness's contract. Both classes also run in the contract's targeted mode
(``set_target``): success then means "predicted as the target".

Our implementation of the methods as the papers define them; the authors' code (``pyautoattack.autopgd_base``,
which ``attack=autoattack`` runs) was read for the details the papers leave open. Every random start is
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
# L1-APGD (the values of the authors' code; the paper gives the rules, not all constants):
L1_EVERY = 4           # the step and the sparsity are reviewed every 4% of the iterations
L1_SPARSITY = 0.2      # the first steps move the top 20% of the coordinates by |gradient| ...
L1_SHRINK = 1.5        # ... later ones ||x_best - x||_0 / 1.5 of them; the step is divided by 1.5 at a review ...
L1_MIN_STEP = 10.0     # ... down to eps / 10; it starts at eps ...
L1_RESET = 0.95        # ... and returns to eps (and to the best point) when the best point's sparsity fell by 5%


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


def l1_review_every(n_iter: int) -> int:
    """Iterations between two reviews of L1-APGD's step and sparsity: 4% of ``n_iter`` rounded down, at
    least 1 (the authors' max(int(0.04 * n_iter), 1), kept in integers)."""
    return max(L1_EVERY * n_iter // 100, 1)


def sparse_direction(grad: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """L1-APGD's step direction (B, ...) for ``grad`` (B, ...): sign(grad) on the coordinates of largest
    |grad| (ties included), zero elsewhere, scaled to unit L1 norm. ``share`` (B,) in [0, 1] sets how many:
    d - min(floor((1 - share) d), d - 1) of the d coordinates, so at least one. The steepest L1 ascent moves a
    single coordinate, which the box often stops at once; a share of them keeps the step useful."""
    a = flat(grad).abs()
    d = a.shape[1]
    skip = ((1 - share) * d).long().clamp(0, d - 1)        # coordinates left out, by increasing |grad|
    threshold = a.sort(1).values.gather(1, skip[:, None])
    s = flat(grad).sign() * (a >= threshold)
    return (s / (s.abs().sum(1, keepdim=True) + 1e-10)).view_as(grad)


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
# targeted mode: ascend towards the target (the authors' targeted CE is minus the CE to the target)
TARGETED_LOSSES = {"ce": lambda logits, y, t: -F.cross_entropy(logits, t, reduction="none"), "dlr": targeted_dlr_loss}


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class APGD(Attack):
    """Auto-PGD: PGD with momentum and a step size that adapts itself, without a step-size parameter.

    Inputs x (B, C, H, W) in [0, 1], labels y (B,); returns (B, C, H, W) inside the eps ball and the box.
    L-inf and L2. Start: a random point of the ball (L-inf: a uniform draw in the cube scaled so its largest
    coordinate is eps; L2: a Gaussian direction at radius eps), clipped to the box. Step t:
    z = P(x_t + eta * dir(grad)), x_{t+1} = P(x_t + alpha (z - x_t) + (1 - alpha)(x_t - x_{t-1})), with
    dir = sign (L-inf) or grad / ||grad||_2 (L2), alpha = 0.75 (1 on the first step), eta = 2 eps at the
    start. At each checkpoint (``checkpoints``) an example's step is halved, and its iterate moved back to
    its best point so far (with that point's gradient), when fewer than ``rho`` of the steps since the last
    checkpoint increased its loss, or when its step was not halved at the last checkpoint and its best loss
    has not grown since.

    L1 (L1-APGD, "Mind the box"): the start is a Gaussian draw projected onto the L1 ball intersected with the
    box, and every step x_{t+1} = P(x_t + eta * ``sparse_direction``(grad, share)) uses the exact projection
    P onto that intersection (``core.norms.project``), without momentum. eta starts at eps; every
    ``l1_review_every`` iterations the share becomes ||x_best - x||_0 / (1.5 d) (it starts at 0.2), and the
    step returns to eps with the iterate moved back to its best point when that sparsity fell below 0.95 of
    its value at the last review, else it is divided by 1.5, never below eps / 10.

    An example stops as soon as an iterate fools the model; that iterate is its result. ``n_restarts`` runs
    start again from a new random point on the points not yet fooled; points never fooled return their
    highest-loss iterate. Loss ``ce`` (cross-entropy) or ``dlr`` (``dlr_loss``). Targeted mode (``target``
    (B,) from the template): the loss becomes minus the CE to the target or the targeted DLR
    (``targeted_dlr_loss``), an iterate fools the model when it is predicted as the target, and points
    already predicted as it, or labelled as it, are not attacked.

    Cost per restart and attacked example: at most ``n_iter`` + 1 forward and ``n_iter`` backward passes,
    plus one clean forward pass per call.
    """

    name = "apgd"
    family = AttackFamily.FIXED_EPS
    supported_norms: ClassVar[tuple[Norm, ...]] = (Norm.LINF, Norm.L2, Norm.L1)
    targetable: ClassVar[bool] = True

    def __init__(self, *, norm: str = "linf", n_iter: int = 100, n_restarts: int = 1, loss: str = "ce",
                 rho: float = 0.75) -> None:
        super().__init__(norm=norm)
        check_number("attack.n_iter", n_iter, low=1, integer=True)
        check_number("attack.n_restarts", n_restarts, low=1, integer=True)
        check_number("attack.rho", rho, low=0, high=1, hint="the share of loss-increasing steps below which "
                     "the step is halved; the paper's value is 0.75 (L1-APGD does not use it)")
        self.n_iter = int(n_iter)
        self.n_restarts = int(n_restarts)
        self.loss = self._check_loss(loss)
        self.rho = float(rho)

    def _check_loss(self, loss: str) -> str:
        return check_choice("attack.loss", loss, tuple(UNTARGETED_LOSSES))

    # -- what varies between APGD and APGD-T -------------------------------------------------------------
    def _runs(self, n_classes: int, targeted: bool) -> list[tuple[str, int]]:
        """(stream tag, target rank) of each run, in order; rank 0: no ranked target (untargeted, or the
        contract's target in targeted mode)."""
        return [(f"restart{r}", 0) for r in range(self.n_restarts)]

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        if target is None:
            return UNTARGETED_LOSSES[self.loss](logits, y)
        return TARGETED_LOSSES[self.loss](logits, y, target)

    # -- the method ---------------------------------------------------------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator, target: torch.Tensor | None = None) -> torch.Tensor:
        assert eps is not None
        generator = as_streams(generator, x.shape[0], x.device, self.name)
        out = x.clone()
        with torch.no_grad():
            clean = model(x)
        pred = clean.argmax(1)
        todo_mask = pred == y if target is None else (pred != target) & (target != y)
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        # the targets are ranked on the clean logits, so a target does not depend on earlier runs
        ranking = clean.argsort(dim=1, descending=True, stable=True)
        for tag, rank in self._runs(clean.shape[1], target is not None):
            todo = todo_mask.nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            aim = target[todo] if target is not None else ranking[todo, rank] if rank else None
            streams = generator.take(todo).fork(tag)
            x_r, fooled, loss_r = self._single_run(model, x[todo], y[todo], float(eps), streams, aim,
                                                   target is not None)
            keep = fooled | (loss_r > best_loss[todo])
            out[todo[keep]] = x_r[keep]
            best_loss[todo[keep]] = loss_r[keep]
            todo_mask[todo[fooled]] = False
        return out

    def _start(self, x: torch.Tensor, eps: float, rng: ExampleRandom) -> torch.Tensor:
        if self.norm is Norm.L1:
            return self._project(x + rng.normal(*x.shape[1:], dtype=x.dtype), x, eps)
        if self.norm is Norm.LINF:
            t = 2 * rng.uniform(*x.shape[1:], dtype=x.dtype) - 1
            scale = flat(t).abs().amax(1)
        else:
            t = rng.normal(*x.shape[1:], dtype=x.dtype)
            scale = l2(t)
        return (x + eps * t / _bc(scale + 1e-12, t)).clamp(0, 1)

    def _project(self, z: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
        """``z`` projected onto the eps ball around ``x`` intersected with the box (exact for L1)."""
        return project(z, x, eps, self.norm)

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
                    target: torch.Tensor | None, targeted: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One APGD run from a random start on (x, y) (K rows), ascending the loss towards ``target`` (K,)
        when given. ``targeted``: an iterate fools the model when predicted as ``target``, else when
        misclassified. Returns the result (K, C, H, W) (the first fooling iterate, else the highest-loss one),
        whether it fools the model (K,) and its loss (K,)."""
        def fools(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return logits.argmax(1) == target[rows] if targeted else logits.argmax(1) != y[rows]

        every = torch.arange(x.shape[0], device=x.device)
        x_cur = self._start(x, eps, rng)
        logits, loss, grad = self._evaluate(model, x_cur, y, target, need_grad=self.n_iter > 0)
        fooled = fools(logits, every)
        result = x_cur.clone()          # for fooled examples: their first fooling iterate
        x_best, loss_best, grad_best = x_cur.clone(), loss.clone(), grad.clone()
        x_prev = x_cur.clone()
        loss_cur = loss.clone()
        sparse = self.norm is Norm.L1
        step = torch.full((x.shape[0],), (1.0 if sparse else INITIAL_STEP) * eps, dtype=x.dtype, device=x.device)
        n_up = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)   # loss increases since the checkpoint
        best_at_check = loss_best.clone()
        halved_at_check = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        marks, last_mark = set(checkpoints(self.n_iter)), 0
        d = x[0].numel()
        share = torch.full((x.shape[0],), L1_SPARSITY, device=x.device)     # L1: share of coordinates a step moves
        sparsity_at_check = torch.full((x.shape[0],), float(d), device=x.device)
        for t in range(1, self.n_iter + 1):
            act = (~fooled).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            xa, xs = x_cur[act], x[act]
            a = 1.0 if t == 1 else MOMENTUM
            with torch.no_grad():
                if sparse:
                    x_new = self._project(xa + _bc(step[act], xa) * sparse_direction(grad[act], share[act]), xs, eps)
                else:
                    z = project(xa + _bc(step[act], xa) * normalize_grad(grad[act], self.norm), xs, eps, self.norm)
                    x_new = project(xa + a * (z - xa) + (1 - a) * (xa - x_prev[act]), xs, eps, self.norm)
            # the last iterate's gradient would never be used: a forward pass is enough
            logits, loss_new, g_new = self._evaluate(model, x_new, y[act], None if target is None else target[act],
                                                     need_grad=t < self.n_iter)
            x_prev[act] = xa
            x_cur[act] = x_new
            if g_new is not None:
                grad[act] = g_new
            mis = fools(logits, act)
            result[act[mis]] = x_new[mis]
            fooled[act[mis]] = True
            n_up[act] += (loss_new > loss_cur[act]).long()
            loss_cur[act] = loss_new
            up = loss_new > loss_best[act]
            better = act[up]
            x_best[better], loss_best[better] = x_new[up], loss_new[up]
            if g_new is not None:
                grad_best[better] = g_new[up]
            if sparse and t % l1_review_every(self.n_iter) == 0:
                sparsity = flat(x_best != x).sum(1).to(share.dtype)
                cut = (sparsity < L1_RESET * sparsity_at_check) & ~fooled    # the sparser best point: start over there
                share = sparsity / d / L1_SHRINK
                step = torch.where(cut, torch.full_like(step, eps), step / L1_SHRINK).clamp(eps / L1_MIN_STEP, eps)
                sparsity_at_check = sparsity
                x_cur[cut], grad[cut], loss_cur[cut] = x_best[cut], grad_best[cut], loss_best[cut]
            elif not sparse and t in marks:
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
    """APGD-T: APGD on the targeted DLR loss (``targeted_dlr_loss``), as in AutoAttack; L-inf, L2 and L1.

    Untargeted (AutoAttack's use): for each of the ``n_target_classes`` classes ranked 2nd, 3rd, ... by the
    clean logits (at most K - 1), in turn, ``n_restarts`` targeted APGD runs on the points still robust;
    success means misclassified, not classified as the target. In the contract's targeted mode the given
    target is the only class attacked (``n_restarts`` runs; ``n_target_classes`` is not used) and success
    means predicted as it. Same shapes and ranges as ``APGD``; cost at most ``n_target_classes * n_restarts``
    APGD runs per example (``n_restarts`` in targeted mode).
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

    def _runs(self, n_classes: int, targeted: bool) -> list[tuple[str, int]]:
        if targeted:
            return super()._runs(n_classes, targeted)
        ranks = range(1, min(self.n_target_classes, n_classes - 1) + 1)
        return [(f"target{k}/restart{r}", k) for k in ranks for r in range(self.n_restarts)]

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        assert target is not None
        return targeted_dlr_loss(logits, y, target)
