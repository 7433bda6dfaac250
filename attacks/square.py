"""Square attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020): score-based black box, L-inf and L2.

Our implementation of the method as its authors define it, with every random choice (start, square
positions, signs, orientation) drawn per example from the call's per-example streams, as the authors' own
code draws square positions image by image. So an example's result depends on (seed, its id) alone, not on
the batch it shares or the attacks that ran before. AutoAttack's copy (``pyautoattack.square``, which
``attack=autoattack`` runs) draws one square per batch; the test suite checks that the two agree in robust
accuracy on the same points.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core.attack_base import Attack, AttackFamily, margin_loss, reached
from robustbench_lab.core.errors import check_bool, check_choice, check_number
from robustbench_lab.core.norms import Norm, l2
from robustbench_lab.core.rng import ExampleRandom, as_streams

LOSSES = ("margin", "ce")
# the p schedule (written for 10,000 queries): p_init halves after each of these query counts
SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
RESAMPLES = 4   # L-inf: sign draws per query, the first that changes the square is used

log = logging.getLogger(__name__)


def _rectangles(a: int, b: int) -> torch.Tensor:
    """(a, b) nested centred rectangles of weight 1/(k+1)^2, unit L2 norm (the L2 update's half-square)."""
    out = torch.zeros(a, b)
    ca, cb = a // 2, b // 2
    for k in range(max(a // 2 + 1, b // 2 + 1)):
        out[max(ca - k, 0):min(ca - k + 2 * k + 1, a), max(cb - k, 0):min(cb - k + 2 * k + 1, b)] += 1.0 / (k + 1) ** 2
    return out / out.norm().clamp_min(1e-12) if out.numel() else out


def _eta(s: int) -> torch.Tensor:
    """(s, s) the L2 square update: a positive and a negative half of nested rectangles, unit L2 norm."""
    out = torch.zeros(s, s)
    out[:s // 2] = _rectangles(s // 2, s)
    out[s // 2:] = -_rectangles(s - s // 2, s)
    return out / out.norm().clamp_min(1e-12)


def _windows(vh: torch.Tensor, vw: torch.Tensor, s: int, c: int) -> tuple[torch.Tensor, ...]:
    """Index tensors selecting, per example k, the (c, s, s) square at rows vh[k].., cols vw[k]..."""
    k = vh.shape[0]
    ar = torch.arange(s, device=vh.device)
    rows, cols = vh[:, None] + ar, vw[:, None] + ar
    return (torch.arange(k, device=vh.device)[:, None, None, None], torch.arange(c, device=vh.device)[None, :, None, None],
            rows[:, None, :, None], cols[:, None, None, :])


def _mask(vh: torch.Tensor, vw: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
    """(K, 1, h, w) float: 1 inside each example's square."""
    r = torch.arange(h, device=vh.device)
    q = torch.arange(w, device=vh.device)
    in_r = (r[None] >= vh[:, None]) & (r[None] < vh[:, None] + s)
    in_c = (q[None] >= vw[:, None]) & (q[None] < vw[:, None] + s)
    return (in_r[:, :, None] & in_c[:, None, :]).unsqueeze(1).float()


def _oriented(eta: torch.Tensor, rng: ExampleRandom) -> torch.Tensor:
    """(K, 1, s, s): ``eta`` or its transpose, chosen per example."""
    flip = rng.uniform() < 0.5
    return torch.where(flip[:, None, None], eta.t(), eta).unsqueeze(1)


class Square(Attack):
    """Random search over square-shaped updates, using only the model's scores (no gradients).

    Inputs (B, C, H, W) in [0, 1]; returns (B, C, H, W) inside the eps ball and the box. L-inf: start from
    vertical stripes of +-eps, then each query sets one random square (side ~ sqrt(p * H * W)) to +-eps per
    channel, kept if the loss decreases. L2: start from a grid of +-eta squares scaled to norm eps, then each
    query moves the perturbation's mass between two random squares (a new +-eta pattern in the first, the
    second zeroed), keeping the total L2 norm at eps. ``p_init`` (paper: 0.05 L-inf and 0.1 L2 on ImageNet;
    AutoAttack uses 0.8 for both) sets the initial fraction of pixels changed; it halves on a fixed schedule.
    With ``rescale_schedule=True`` the schedule (written for 10000 queries) is compressed to ``n_queries``,
    which a small budget needs. Loss: ``margin`` (z_y - max_{j != y} z_j) or ``ce`` (minus cross-entropy);
    null: ``margin`` untargeted and ``ce`` targeted, the authors' choices.

    Targeted mode (``target`` (B,)), as in the authors' code (``--targeted``) and AutoAttack's copy: an
    example is done once the targeted margin max_{j != t} z_j - z_t is <= 0 (predicted as t), and the search
    minimizes the cross-entropy to the target (their script sets ``cross_entropy`` for targeted runs of
    both norms), or the targeted margin itself with ``loss=margin``. An example already predicted as its
    target, or labelled as it, is returned unchanged.

    Cost: ``n_queries`` is the budget per restart and example, one forward pass per query on the examples
    not yet fooled, plus one start and one final pass per restart and one clean pass; ``n_backward`` is 0.
    ``n_restarts`` re-runs the search from a new random start on the points still robust (each restart on its
    own streams). Points the attack does not fool are returned unchanged (as AutoAttack's Square does).
    The default of 1000 queries breaks an undefended Fashion-MNIST CNN at eps 0.1 in a few dozen queries per
    point; use 5000 (AutoAttack's value) for a final number. ``verbose=True`` logs progress at each
    schedule step.
    """

    name = "square"
    family = AttackFamily.FIXED_EPS
    supported_norms: ClassVar[tuple[Norm, ...]] = (Norm.LINF, Norm.L2)
    gradient_free: ClassVar[bool] = True   # score-based: the contract expects n_backward == 0
    targetable = True

    def __init__(self, *, norm: str = "linf", n_queries: int = 1000, p_init: float = 0.8, n_restarts: int = 1,
                 loss: str | None = None, rescale_schedule: bool = True, verbose: bool = False) -> None:
        super().__init__(norm=norm)
        check_number("attack.n_queries", n_queries, low=1, integer=True)
        check_number("attack.n_restarts", n_restarts, low=1, integer=True)
        check_number("attack.p_init", p_init, low=0, low_open=True, high=1)
        check_choice("attack.loss", loss, LOSSES + (None,), "null: margin untargeted, ce targeted (the authors')")
        check_bool("attack.rescale_schedule", rescale_schedule)
        check_bool("attack.verbose", verbose)
        self.n_queries = int(n_queries)
        self.p_init = float(p_init)
        self.n_restarts = int(n_restarts)
        self.loss = loss
        self.rescale_schedule = bool(rescale_schedule)
        self.verbose = bool(verbose)

    # -- pieces -------------------------------------------------------------------------------------------
    def _p(self, it: int) -> float:
        if self.rescale_schedule:
            it = int(it / self.n_queries * 10000)
        return self.p_init / 2 ** sum(it > t for t in SCHEDULE)

    def _margin_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(margin, loss), each (B,), at ``x``: the margin is > 0 while the goal does not hold (z_y -
        max_{j != y} z_j; targeted, max_{j != t} z_j - z_t); the search keeps the queries that lower the loss."""
        logits = model(x)
        if target is not None:
            margin = margin_loss(logits, target)
            if (self.loss or "ce") == "ce":
                return margin, F.cross_entropy(logits, target, reduction="none")
            return margin, margin
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        margin = z_y - logits.scatter(1, y[:, None], float("-inf")).amax(1)
        if self.loss == "ce":
            return margin, -F.cross_entropy(logits, y, reduction="none")
        return margin, margin

    # -- the method ---------------------------------------------------------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator, target: torch.Tensor | None = None) -> torch.Tensor:
        assert eps is not None
        generator = as_streams(generator, x.shape[0], x.device, self.name)
        adv = x.clone()
        with torch.no_grad():
            pred = model(x).argmax(1)
            robust = pred == y if target is None else (pred != target) & (target != y)
            for r in range(self.n_restarts):
                todo = robust.nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                streams = generator.take(todo).fork(f"restart{r}")
                t_r = None if target is None else target[todo]
                x_r = self._single_run(model, x[todo], y[todo], float(eps), streams, t_r)
                fooled = reached(model(x_r).argmax(1), y[todo], t_r)
                adv[todo[fooled]] = x_r[fooled]
                robust[todo[fooled]] = False
        return adv

    def _single_run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                    rng: ExampleRandom, target: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        n_features = c * h * w
        x_best = self._start(x, eps, rng)
        margin_min, loss_min = self._margin_loss(model, x_best, y, target)
        for i in range(self.n_queries):
            act = (margin_min > 0).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            sub = rng.take(act)
            xc, xb, yc = x[act], x_best[act], y[act]
            p = self._p(i)
            if self.norm is Norm.LINF:
                s = min(max(int(round(math.sqrt(p * n_features / c))), 1), h, w)
                x_new = self._linf_step(xc, xb, eps, s, sub)
            else:
                s = max(int(round(math.sqrt(p * n_features / c))), 3)
                s = min(s + 1 if s % 2 == 0 else s, h, w)
                x_new = self._l2_step(xc, xb, eps, s, sub)
            margin, loss = self._margin_loss(model, x_new, yc, None if target is None else target[act])
            improved = loss < loss_min[act]
            loss_min[act] = torch.where(improved, loss, loss_min[act])
            improved = improved | (margin <= 0)
            margin_min[act] = torch.where(improved, margin, margin_min[act])
            x_best[act] = torch.where(improved[:, None, None, None], x_new, xb)
            if self.verbose and (i == 0 or self._p(i + 1) != p):
                log.info("square %s eps=%g query %d: %d/%d fooled, mean loss %.3f", self.norm.value, eps, i + 1,
                         int((margin_min <= 0).sum()), b, float(loss_min.mean()))
        return x_best

    def _start(self, x: torch.Tensor, eps: float, rng: ExampleRandom) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.norm is Norm.LINF:   # vertical stripes of +-eps
            return (x + eps * rng.signs(c, 1, w, dtype=x.dtype)).clamp(0, 1)
        # L2: a grid of +-eta squares of side h // 5, centred, each with its own signs and orientation
        s = max(h // 5, 1)
        eta = _eta(s).to(x)
        delta = torch.zeros_like(x)
        start_h, start_w = max((h - 5 * s) // 2, 0), max((w - 5 * s) // 2, 0)
        for vh in range(start_h, h - s + 1, s):
            for vw in range(start_w, w - s + 1, s):
                delta[:, :, vh:vh + s, vw:vw + s] += _oriented(eta, rng) * rng.signs(c, 1, 1, dtype=x.dtype)
        return (x + delta / l2(delta).clamp_min(1e-12).view(-1, 1, 1, 1) * eps).clamp(0, 1)

    def _linf_step(self, xc: torch.Tensor, xb: torch.Tensor, eps: float, s: int, rng: ExampleRandom) -> torch.Tensor:
        """One random square per example set to x +- eps per channel. As in the authors' code, signs that would
        leave the square unchanged are redrawn (up to ``RESAMPLES`` draws, made for every example so that the
        draw count never depends on the batch), so no query is spent on the current point."""
        _, c, h, w = xc.shape
        vh, vw = rng.integers(0, h - s), rng.integers(0, w - s)
        win = _windows(vh, vw, s, c)
        x_w, best_w = xc[win], xb[win]                                                # (K, c, s, s)
        signs = rng.signs(RESAMPLES, c, 1, 1, dtype=xc.dtype)                         # (K, T, c, 1, 1)
        cand = (x_w[:, None] + eps * signs).clamp(0, 1)                               # (K, T, c, s, s)
        changes = (cand - best_w[:, None]).abs().flatten(2).amax(2) > 1e-7            # (K, T)
        first = torch.where(changes.any(1), changes.float().argmax(1), torch.full_like(vh, RESAMPLES - 1))
        x_new = xb.clone()
        x_new[win] = cand[torch.arange(cand.shape[0], device=xc.device), first]
        return x_new

    def _l2_step(self, xc: torch.Tensor, xb: torch.Tensor, eps: float, s: int, rng: ExampleRandom) -> torch.Tensor:
        _, c, h, w = xc.shape
        delta = xb - xc
        vh, vw = rng.integers(0, h - s), rng.integers(0, w - s)
        vh2, vw2 = rng.integers(0, h - s), rng.integers(0, w - s)
        win = _windows(vh, vw, s, c)
        m1, m2 = _mask(vh, vw, s, h, w), _mask(vh2, vw2, s, h, w)
        old = delta[win]                                                          # (K, c, s, s)
        norm_old = old.pow(2).sum((-2, -1), keepdim=True).sqrt()
        norm_image = l2(delta).view(-1, 1, 1, 1)
        norm_windows = (delta * torch.maximum(m1, m2)).pow(2).sum((-2, -1), keepdim=True).sqrt()
        new = _oriented(_eta(s).to(xc), rng) * rng.signs(c, 1, 1, dtype=xc.dtype) + old / (1e-12 + norm_old)
        budget = ((eps ** 2 - norm_image ** 2).clamp_min(0) / c + norm_windows ** 2).sqrt()
        new = new / (1e-12 + new.pow(2).sum((-2, -1), keepdim=True).sqrt()) * budget
        delta = delta * (1 - m2)
        delta[win] = new
        return (xc + delta / l2(delta).clamp_min(1e-12).view(-1, 1, 1, 1) * eps).clamp(0, 1)
