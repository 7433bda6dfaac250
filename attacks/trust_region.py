"""Trust-region (TR) attack (Yao, Gholami, Xu, Keutzer, Mahoney, CVPR 2019, arXiv 1812.06371).

A minimization attack: it looks for the smallest perturbation that changes the prediction, taking steps
of at most a trust radius along a local model of a class margin toward one target class chosen once on the
clean input. Written from the paper and the authors' code (amirgholami/TRAttack, ``attack_methods.py``);
differences from that code are listed in the class docstring.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from robustbench_lab.core.attack_base import Attack, AttackFamily
from robustbench_lab.core.boundary import Crossings
from robustbench_lab.core.errors import ConfigError, check_bool, check_choice, check_number
from robustbench_lab.core.norms import Norm, flat

# Per-norm trust radii in input space ([0, 1] pixels); see ``TrustRegion`` for how they were chosen.
DEFAULT_RADIUS = {Norm.L2: 0.05, Norm.LINF: 0.001}
DEFAULT_RADIUS_MIN = {Norm.L2: 0.001, Norm.LINF: 0.0001}
DEFAULT_RADIUS_MAX = {Norm.L2: 0.1, Norm.LINF: 0.01}

GROW, SHRINK, RHO_GOOD, RHO_BAD = 1.2, 1.2, 0.9, 0.5   # the authors' radius rule
MIN_STEP = 1e-4                                         # added to every step length, as in the authors' code
TARGETS = ("best", "worst")
RATIOS = ("model", "official")


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-example scalars (B,) broadcast against a batch shaped like ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (flat(a) * flat(b)).sum(1)


class TrustRegion(Attack):
    """Trust-region attack, first order (L2 or L-inf) or second order (L2).

    Inputs ``x`` (B, C, H, W) in [0, 1], labels ``y`` (B,). Returns (B, C, H, W) in [0, 1]: for an example
    the attack fooled, the boundary point found by the bisection below (or its first adversarial iterate
    with ``bisection_steps=0``); for one it did not, its last iterate; examples misclassified on arrival
    unchanged.

    Target: once, on the clean input, the ``n_classes`` runner-up classes (ranks 2 .. n_classes + 1 by
    logit) are ranked by their linearized distance (z_y - z_i) / ||grad z_i - grad z_y||_q (q = 2 for L2,
    q = 1, the dual norm, for L-inf); ``target='best'`` attacks the closest, ``'worst'`` the farthest.

    First order (``order=1``, objective ``"logit margin z_t - z_y"``): with g = grad(z_t - z_y), the
    linearized distance to the boundary is r = (z_y - z_t) / ||g||_q, the direction g / ||g||_2 (L2) or
    sign(g) (L-inf), the step length s = min(r, radius) and x <- clip(x + (1 + overshoot) (s + 1e-4) dir).

    Second order (``order=2``, L2 only, objective ``"softmax margin p_y - p_t"``): the logits of a ReLU
    network are piecewise linear, so their input Hessian is zero almost everywhere; the smooth softmax
    margin phi = p_y - p_t has a useful one. The quadratic model m(d) = phi + g.d + d.Hd / 2 is minimized
    in the ball ||d||_2 <= radius by Steihaug's truncated conjugate gradient (``cg_steps`` Hessian-vector
    products, each a double backward pass), stopping early at the first point of the CG path where the model
    predicts the boundary, m(d) = 0. With H = 0 this is exactly the first-order L2 step. The same overshoot
    and box clip are applied to the step length ||d||.

    Radius (``adaptive=True``, the authors' rule): after a step of length s the radius becomes s, then
    grows x1.2 if rho > 0.9, shrinks /1.2 if rho < 0.5, and is clipped to [radius_min, radius_max]; no step
    is rejected. ``ratio='model'`` (default) takes rho = actual / predicted decrease of the objective for
    the step actually taken (after the box clip); this is the textbook trust-region ratio and is unit-free.
    ``ratio='official'`` (first order only) is the authors' code: rho = (z_y(x) - z_y(x_new)) / s, which has
    units (logits per input unit) and so depends on the input scale; here s is measured in [0, 1] pixels.
    With ``adaptive=False`` the radius stays fixed.

    Radius units: all radii are in [0, 1] input space. The authors' values are in normalized units
    (std ~ 0.2-0.25 on CIFAR-10/ImageNet, so one normalized unit is ~0.2-0.25 pixel units): bounds
    [5e-4, 5e-2] (L2) and [1e-4, 1e-2] (L-inf), initial radius 1e-3 (CIFAR script), over 2000-5000
    iterations. The literal conversion (x0.25) caps steps at 0.0125 (L2) and 0.0025 (L-inf) pixels; with
    100 iterations the L2 cap cannot reach typical Fashion-MNIST perturbations (L2 ~ 1-2). ``null`` radii
    take per-norm defaults: L-inf [1e-4, 1e-2], start 1e-3 (the authors' numbers read directly in pixel
    units); L2 [1e-3, 0.1], start 0.05 (8x the converted cap). Measured on 500 Fashion-MNIST test points and
    a small CNN, against the literal conversion run for 2000 iterations: the same 100% success, norms larger
    by 0.5% (L2) and 0.9% (L-inf) on average, at 1/6 (L2) and 1/2 (L-inf) of the forward passes. The radius
    only caps steps whose linear prediction is farther; near the boundary the step is the prediction r.
    Starting L2 at 0.01 instead left 1% of points unbroken after 100 iterations (rho stays in [0.5, 0.9],
    so the radius never grows).

    Boundary (``bisection_steps``, default 10; 0 turns it off): the overshoot only guarantees that the last
    step crosses the boundary. After an example's first adversarial iterate, ``bisection_steps`` forward
    passes (batched over all such examples, at the end) search the segment from its last non-adversarial
    iterate to it (``core.boundary.bisect_boundary``) and the adversarial end of the final bracket is
    returned, or the crossing iterate itself where that is nearer to x (a segment may turn away from x).

    Iterations: 1000 by default, an upper bound per example (examples leave the loop once misclassified;
    the authors' function defaults to 100, their scripts run 2000-5000). Why not 100: on the default
    ResNet-20, 21 of the 915 clean-correct points among the 1000 evaluation points stayed unbroken after
    100 L2 iterations. Their margin toward the target bends away: after 30 iterations the ratio's median
    is 0.63 for steps of 1e-3, 0.49 for 3e-3 and 0.18 for 1e-2, so the rule rightly keeps the radius near
    its lower bound (there on 56% of their steps), and reaching their minimal adversarials (L2 0.22-0.78
    against a median of 0.21) took 117-922 iterations. A larger radius_min would only override what the
    ratio measured; the budget is what was short. L-inf broke every point within 100 iterations.

    Cost: one clean forward pass serves the check, the target selection (c backward passes) and the first
    first-order step, whose gradient is the chosen target's from the selection. Each iteration then costs
    one forward pass at the new point (with its graph: it gives the radius ratio, the "still correct?" check
    and, through one backward pass, the next step's gradient) and one backward pass, plus the Hessian-vector
    products of order 2; no point is passed forward twice. Rows that stop (misclassified on arrival, or
    fooled by a step) share the backward pass of the batch they arrived in once; the bisection adds
    ``bisection_steps`` forward passes per fooled example. Per-class gradients run as a loop of backward
    passes: one batched call (``autograd.grad(..., is_grads_batched=True)``) was slower on CPU.

    Differences from the authors' code, on purpose: the box is the valid [0, 1] pixel box (their code clamps
    to the batch's min/max in normalized space); the example's own label is used for z_y (theirs uses the
    top logit, the same thing for the correctly classified examples that are attacked); target selection
    differentiates c margins z_i - z_y (c backward passes) rather than c + 1 logits and its gradient serves
    the first step; the classification check reuses each step's forward pass; the bisection is ours.
    """

    name = "trust_region"
    family = AttackFamily.MINIMIZATION
    OBJECTIVES: ClassVar[dict[int, str]] = {1: "logit margin z_t - z_y", 2: "softmax margin p_y - p_t"}

    def __init__(self, *, norm: str = "linf", order: int = 1, iterations: int = 1000, adaptive: bool = True,
                 radius: float | None = None, radius_min: float | None = None, radius_max: float | None = None,
                 n_classes: int = 9, target: str = "best", overshoot: float = 0.02, ratio: str = "model",
                 cg_steps: int = 5, bisection_steps: int = 10) -> None:
        super().__init__(norm=norm)
        check_choice("attack.order", order, [1, 2])
        check_choice("attack.ratio", ratio, RATIOS)
        if order == 2:
            check_choice("attack.norm", self.norm.value, ["l2"],
                         "the second-order trust-region attack (attack.order=2) is L2 only")
            check_choice("attack.ratio", ratio, ["model"], "the official ratio is defined for order=1 only")
        check_number("attack.iterations", iterations, low=1, integer=True)
        check_number("attack.n_classes", n_classes, low=1, integer=True)
        check_choice("attack.target", target, TARGETS)
        check_number("attack.overshoot", overshoot, low=0)
        check_number("attack.cg_steps", cg_steps, low=1, integer=True)
        check_number("attack.bisection_steps", bisection_steps, low=0, integer=True, hint="0 turns the bisection off")
        check_bool("attack.adaptive", adaptive)
        for key, v in (("attack.radius", radius), ("attack.radius_min", radius_min),
                       ("attack.radius_max", radius_max)):
            check_number(key, v, low=0, low_open=True, high=math.inf, high_open=True, allow_none=True,
                         hint="input space, [0, 1] pixels; null takes the per-norm default")
        self.order = int(order)
        self.objective = self.OBJECTIVES[self.order]
        self.iterations = int(iterations)
        self.adaptive = bool(adaptive)
        self.radius = float(radius) if radius is not None else DEFAULT_RADIUS[self.norm]
        self.radius_min = float(radius_min) if radius_min is not None else DEFAULT_RADIUS_MIN[self.norm]
        self.radius_max = float(radius_max) if radius_max is not None else DEFAULT_RADIUS_MAX[self.norm]
        if self.radius_min > self.radius_max:
            raise ConfigError("attack.radius_min", self.radius_min, f"a number <= attack.radius_max "
                              f"({self.radius_max})")
        self.n_classes = int(n_classes)
        self.target = target
        self.overshoot = float(overshoot)
        self.ratio = ratio
        self.cg_steps = int(cg_steps)
        self.bisection_steps = int(bisection_steps)

    # ------------------------------------------------------------------------------------------ the method
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator) -> torch.Tensor:
        x_adv = x.clone()
        # One clean forward pass serves the check, the target selection and the first step.
        xg = x.clone().requires_grad_(True)
        z = model(xg)
        rows = (z.detach().argmax(1) == y).nonzero().squeeze(1)   # rows of the graph that are attacked
        if rows.numel() == 0:
            return x_adv
        t, g = self._select_targets(xg, z, y)
        idx, t, ya, xa = rows, t[rows], y[rows], x[rows]          # idx: rows of x
        g = g[rows]
        za = z.detach()[rows]
        radius = torch.full((idx.numel(),), self.radius, dtype=x.dtype, device=x.device)
        crossings = Crossings(self.bisection_steps)
        for it in range(self.iterations):
            last = it == self.iterations - 1
            if self.order == 1:
                f = za.gather(1, t[:, None]).squeeze(1) - za.gather(1, ya[:, None]).squeeze(1)
                x_new, s = self._step_first(xa, f, g, radius)
                predicted = _dot(g, x_new - xa)                   # increase of z_t - z_y by the linear model
            else:
                x_new, s, predicted = self._step_second(model, xg, z, rows, ya, t, radius)
            if last and not (self.adaptive or self.bisection_steps):
                x_adv[idx] = x_new                                # nothing left to learn from its logits
                break
            # The accepted point's logits are the next step's: its forward pass keeps the graph.
            with torch.set_grad_enabled(not last):
                xg = x_new.clone().requires_grad_(not last)
                z = model(xg)
            zn = z.detach()
            if self.adaptive:
                radius = self._update_radius(s, self._rho(za, zn, ya, t, s, predicted))
            x_adv[idx] = x_new
            keep = ~crossings.add(idx, ya, xa, za, x_new, zn)
            if last or not keep.any():
                break
            rows = keep.nonzero().squeeze(1)
            idx, t, ya, xa, za, radius = idx[keep], t[keep], ya[keep], x_new[keep], zn[keep], radius[keep]
            if self.order == 1:
                margin = z[rows].gather(1, t[:, None]) - z[rows].gather(1, ya[:, None])
                (g_all,) = torch.autograd.grad(margin.sum(), xg)
                g = g_all[rows]
        crossings.finish(model, x, y, x_adv, self.norm.p)
        return x_adv

    def _select_targets(self, xg: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of the clean pass ``z`` = model(``xg``) (B, K): the target class (B,), best (closest) or
        worst of the runner-up classes by linearized distance, and the gradient of z_t - z_y at the clean
        input (B, C, H, W), which is the first first-order step's gradient."""
        k = z.shape[1]
        c = min(self.n_classes, k - 1)
        if c < 1:
            raise ValueError(f"{self.name}: the model has {k} output(s); at least 2 classes are needed")
        order = z.detach().argsort(1, descending=True)
        # Runner-up classes: the top c classes other than the label (for correct examples, ranks 2..c+1).
        order = order[order != y[:, None]].view(z.shape[0], k - 1)[:, :c]
        z_y = z.gather(1, y[:, None]).squeeze(1)
        pick_dist = torch.empty(z.shape[0], dtype=xg.dtype, device=xg.device)
        pick, pick_g = order[:, 0].clone(), torch.zeros_like(xg)
        # One backward pass per candidate: measured on CPU (ResNet-20, 9 classes), one batched call
        # (autograd.grad with is_grads_batched) took 1.1x (100 rows) to 2.2x (459 rows) the loop's time.
        for j in range(c):
            cand = order[:, j]
            diff = z.gather(1, cand[:, None]).squeeze(1) - z_y
            (gj,) = torch.autograd.grad(diff.sum(), xg, retain_graph=j < c - 1 or self.order == 2)
            with torch.no_grad():
                dist = (-diff.detach()).clamp_min(0) / flat(gj).norm(p=self.norm.dual, dim=1).clamp_min(1e-12)
                better = torch.ones_like(dist, dtype=torch.bool) if j == 0 else \
                    (dist < pick_dist if self.target == "best" else dist > pick_dist)
                pick_dist = torch.where(better, dist, pick_dist)
                pick = torch.where(better, cand, pick)
                pick_g = torch.where(_bc(better, gj), gj, pick_g)
        return pick, pick_g

    def _rho(self, za: torch.Tensor, zn: torch.Tensor, y: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
             predicted: torch.Tensor) -> torch.Tensor:
        """The radius rule's ratio for a step of length ``s`` from logits ``za`` to ``zn`` (N, K)."""
        zy, zy_new = za.gather(1, y[:, None]).squeeze(1), zn.gather(1, y[:, None]).squeeze(1)
        if self.ratio == "official":
            return (zy - zy_new) / s.clamp_min(1e-12)
        zt, zt_new = za.gather(1, t[:, None]).squeeze(1), zn.gather(1, t[:, None]).squeeze(1)
        if self.order == 1:                                       # actual / predicted increase of z_t - z_y
            return ((zt_new - zy_new) - (zt - zy)) / predicted.clamp_min(1e-12)
        p, p_new = za.double().softmax(1), zn.double().softmax(1)   # decrease of phi = p_y - p_t
        phi = p.gather(1, y[:, None]).squeeze(1) - p.gather(1, t[:, None]).squeeze(1)
        phi_new = p_new.gather(1, y[:, None]).squeeze(1) - p_new.gather(1, t[:, None]).squeeze(1)
        return ((phi - phi_new) / predicted.clamp_min(1e-300)).to(s.dtype)

    def _update_radius(self, radius_used: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        r = torch.where(rho > RHO_GOOD, radius_used * GROW, radius_used)
        r = torch.where(rho < RHO_BAD, radius_used / SHRINK, r)
        return r.clamp(self.radius_min, self.radius_max)

    def _take(self, x: torch.Tensor, length: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """x + (1 + overshoot)(length + 1e-4) direction, clipped to the [0, 1] box."""
        scale = (1 + self.overshoot) * (length + MIN_STEP)
        return (x + _bc(scale, x) * direction).clamp(0, 1)

    def _step_first(self, x: torch.Tensor, f: torch.Tensor, g: torch.Tensor,
                    radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One first-order step from ``x`` (N, C, H, W) with margin f = z_t - z_y (N,) and its gradient ``g``.
        Returns (new iterates, step lengths s (N,))."""
        with torch.no_grad():
            gq = flat(g).norm(p=self.norm.dual, dim=1)
            r = (-f).clamp_min(0) / gq.clamp_min(1e-12)           # linearized distance to the z_t = z_y boundary
            if self.norm is Norm.LINF:
                direction = g.sign()
            else:
                direction = g / _bc(flat(g).norm(dim=1).clamp_min(1e-12), g)
            s = torch.minimum(r, radius)
            return self._take(x, s, direction), s

    def _step_second(self, model: nn.Module, xg: torch.Tensor, z: torch.Tensor, rows: torch.Tensor,
                     y: torch.Tensor, t: torch.Tensor,
                     radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One second-order (Steihaug-CG) step on phi = p_y - p_t from the points ``xg[rows]``, whose logits
        ``z`` = model(``xg``) keep their graph (rows outside ``rows`` are not attacked). Returns (new iterates
        (N, C, H, W), step lengths (N,), decrease of the quadratic model for the step taken (N,))."""
        # double precision softmax: p_y rounds to 1 in float32 once the logit gap exceeds ~17
        p = z[rows].double().softmax(1)
        phi = (p.gather(1, y[:, None]) - p.gather(1, t[:, None])).squeeze(1)
        (g,) = torch.autograd.grad(phi.sum(), xg, create_graph=True)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            # Examples are independent (eval mode), so one backward of sum_i g_i.v_i gives every H_i v_i.
            v_all = torch.zeros_like(g)
            v_all[rows] = v.to(g.dtype)
            (hv,) = torch.autograd.grad((g * v_all).sum(), xg, retain_graph=True)
            if hasattr(model, "count_hvp"):   # the template's counting proxy: one product per row of the pass
                model.count_hvp(xg.shape[0])
            return hv[rows].detach().double()

        # The CG arithmetic runs in float64: near a confident prediction g and Hv are ~1e-10 and their
        # products would underflow in float32.
        x = xg.detach()[rows]
        gd = g.detach()[rows].double()
        d = self._steihaug(hvp, gd, phi.detach(), radius.double(), torch.ones_like(y, dtype=torch.bool))
        with torch.no_grad():
            length = flat(d).norm(dim=1)
            direction = (d / _bc(length.clamp_min(1e-300), d)).to(x.dtype)
            length = length.to(x.dtype)
            x_new = self._take(x, length, direction)
        if not self.adaptive:
            return x_new, length, torch.zeros_like(length, dtype=torch.float64)
        delta = (x_new - x).double()
        predicted = -(_dot(gd, delta) + 0.5 * _dot(delta, hvp(delta)))   # model decrease for the step taken
        return x_new, length, predicted

    def _steihaug(self, hvp, g: torch.Tensor, phi: torch.Tensor, radius: torch.Tensor,
                  active: torch.Tensor) -> torch.Tensor:
        """Steihaug truncated CG for min g.d + d.Hd/2 in ||d||_2 <= radius, batched per example.

        Stops per example at the trust-region boundary, at negative curvature (then goes to the boundary),
        after ``cg_steps`` Hessian-vector products, or at the first point of the CG path where the model
        phi + g.d + d.Hd/2 reaches 0 (the predicted decision boundary): a minimal step, not a full model
        minimization. Returns d with the shape of g.
        """
        d = torch.zeros_like(g)
        r = g.clone()                        # model gradient at d: g + H d
        p = -g
        q = torch.zeros_like(phi)            # model change g.d + d.Hd/2 at d
        rr = _dot(r, r)
        done = ~active | (rr == 0)
        for _ in range(self.cg_steps):
            if done.all():
                break
            hp = hvp(p)
            kappa = _dot(p, hp)
            rp = _dot(r, p)
            # step to the boundary along p: largest tau with ||d + tau p|| = radius
            dp, pp, dd = _dot(d, p), _dot(p, p).clamp_min(1e-300), _dot(d, d)
            tau_b = (-dp + (dp * dp + pp * (radius * radius - dd)).clamp_min(0).sqrt()) / pp
            pos = kappa > 0
            alpha = torch.where(pos, rr / kappa.where(pos, torch.ones_like(kappa)), tau_b)
            tau_end = torch.minimum(alpha, tau_b)
            hit_boundary = ~pos | (alpha >= tau_b)
            # first zero of phi + q + tau rp + tau^2 kappa/2 on [0, tau_end] (stable root form)
            c = phi + q
            disc = rp * rp - 2 * kappa * c
            has_root = (disc >= 0) & (c > 0) & (rp < 0)
            tau_0 = 2 * c / (-rp + disc.clamp_min(0).sqrt()).clamp_min(1e-300)
            cross = has_root & (tau_0 <= tau_end)
            tau = torch.where(cross, tau_0, tau_end)
            tau = torch.where(done, torch.zeros_like(tau), tau)
            d = d + _bc(tau, d) * p
            q = q + tau * rp + 0.5 * tau * tau * kappa
            r_new = r + _bc(tau, r) * hp
            rr_new = _dot(r_new, r_new)
            done = done | cross | hit_boundary | (rr_new.sqrt() <= 1e-6 * _dot(g, g).sqrt())
            beta = rr_new / rr.clamp_min(1e-300)
            p = torch.where(_bc(done, p), p, -r_new + _bc(beta, p) * p)
            r, rr = r_new, rr_new
        return d
