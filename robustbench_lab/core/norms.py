"""Norms, per-example norm computation and projection onto norm balls intersected with the [0, 1] box.

All quantities live in input space ([0, 1] pixels); the model applies its own normalization.
"""

from __future__ import annotations

from enum import Enum

import torch

from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.rng import ExampleRandom


class Norm(str, Enum):
    """Threat-model norm. Converted once from config strings at the boundary."""

    LINF = "linf"
    L2 = "l2"
    L1 = "l1"

    @classmethod
    def parse(cls, value: "str | Norm", key: str = "attack.norm") -> "Norm":
        if isinstance(value, Norm):
            return value
        aliases = {"linf": cls.LINF, "inf": cls.LINF, "l_inf": cls.LINF, "Linf": cls.LINF,
                   "l2": cls.L2, "2": cls.L2, "L2": cls.L2, "l1": cls.L1, "1": cls.L1, "L1": cls.L1}
        if str(value) in aliases:
            return aliases[str(value)]
        if str(value).lower() in aliases:
            return aliases[str(value).lower()]
        raise ConfigError(key, value, [n.value for n in cls])

    @property
    def dual(self) -> float:
        """Exponent q of the dual norm (used by linearised-distance formulas)."""
        return {Norm.LINF: 1.0, Norm.L2: 2.0, Norm.L1: float("inf")}[self]

    @property
    def p(self) -> float:
        return {Norm.LINF: float("inf"), Norm.L2: 2.0, Norm.L1: 1.0}[self]


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def norm_of(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-example norm of a batch ``delta`` of shape (B, ...). Returns shape (B,)."""
    d = flat(delta)
    if norm is Norm.LINF:
        return d.abs().amax(dim=1)
    if norm is Norm.L1:
        return d.abs().sum(dim=1)
    return d.norm(p=2, dim=1)


def l1(delta: torch.Tensor) -> torch.Tensor:
    return norm_of(delta, Norm.L1)


def l2(delta: torch.Tensor) -> torch.Tensor:
    return norm_of(delta, Norm.L2)


def linf(delta: torch.Tensor) -> torch.Tensor:
    return norm_of(delta, Norm.LINF)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float, norm: Norm,
            lower: float = 0.0, upper: float = 1.0, *, exact: bool = False) -> torch.Tensor:
    """Project ``x_adv`` onto {x' : ||x' - x|| <= eps} and then into the [lower, upper] box.

    For L-inf the two projections commute, so the result lies in the intersection exactly. For L2,
    clipping to the box after the ball projection can only shrink every coordinate of the perturbation
    towards 0 (x is inside the box), so the norm stays <= eps and the result is feasible, but it is not the
    closest feasible point where the box binds: ``exact=True`` gives the Euclidean projection onto the
    intersection (``project_l2_box``). For L1 the result is always that exact projection (``project_l1_box``):
    clipping after the ball projection would waste the budget on saturated pixels.
    ``eps`` is a float or a per-example tensor of shape (B,).
    """
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.dim() == 0:
        eps_t = eps_t.expand(x.shape[0])
    delta = x_adv - x
    if norm is Norm.L1 or (exact and norm is Norm.L2):
        if x.numel() == 0:
            return x_adv.clone()
        d = (project_l1_box if norm is Norm.L1 else project_l2_box)(delta, eps_t, lower - x, upper - x)
        # a feasible point comes back bit for bit (x + (x_adv - x) can differ from x_adv in the last bit)
        inside = (norm_of(delta, norm) <= eps_t) & flat((x_adv >= lower) & (x_adv <= upper)).all(1)
        out = (x + d).clamp(lower, upper)
        # x + d rounds in the working dtype, so its norm can land a few ulps above eps (an L1 norm sums
        # hundreds of terms): shrink those rows' perturbations by the excess, until the norm is at most eps
        # both as computed in the working dtype and exactly (float64). A shrunk perturbation stays in the box.
        for _ in range(4):
            n = torch.maximum(norm_of(out - x, norm).double(), norm_of(out.double() - x.double(), norm))
            over = n > eps_t.double()
            if not bool(over.any()):
                break
            f = torch.where(over, eps_t.double() / n.clamp_min(1e-30) * (1 - 16 * torch.finfo(x.dtype).eps),
                            torch.ones_like(n)).to(x.dtype)
            out = torch.where(_bcast(over, x), (x + (out - x) * _bcast(f, x)).clamp(lower, upper), out)
        return torch.where(_bcast(inside, x), x_adv, out)
    return (x + project_ball(delta, eps_t, norm)).clamp(lower, upper)


def project_ball(delta: torch.Tensor, eps: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Euclidean projection of each row of ``delta`` (B, ...) onto the ``norm`` ball of radius ``eps`` (B,),
    ignoring the box (L1: Duchi et al.'s sort-based projection, ``project_l1_box`` with an unbounded box)."""
    if norm is Norm.LINF:
        e = _bcast(eps, delta)
        return torch.maximum(torch.minimum(delta, e), -e)
    if norm is Norm.L1:
        inf = torch.full_like(delta, float("inf"))
        return project_l1_box(delta, eps, -inf, inf)
    n = l2(delta)
    factor = torch.where(n > eps, eps / n.clamp_min(1e-12), torch.ones_like(n))
    return delta * _bcast(factor, delta)


def _box_side(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows of ``v`` (B, ...) flattened in float64, their magnitudes a = |v| and c >= 0, how far each
    coordinate may move on v's side of 0 within [lo, hi] (lo <= 0 <= hi)."""
    shape = v.shape
    v, lo, hi = flat(v).double(), flat(lo.expand(shape)).double(), flat(hi.expand(shape)).double()
    return v, v.abs(), torch.where(v >= 0, hi, -lo).clamp_min(0)


def project_l1_box(v: torch.Tensor, eps: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean projection of each row of ``v`` (B, ...) onto {d : ||d||_1 <= eps, lo <= d <= hi}.

    ``eps`` (B,) >= 0; ``lo`` <= 0 <= ``hi`` shaped like ``v`` (the box minus the clean point). The KKT
    conditions give d = clip(soft_threshold(v, lam), lo, hi) for the smallest lam >= 0 with ||d||_1 <= eps.
    With a = |v| and c the bound on v's side, ||d(lam)||_1 = sum_i min(max(a_i - lam, 0), c_i) is piecewise
    linear in lam with slope -(number of coordinates with max(a_i - c_i, 0) < lam < a_i): sorting those 2n
    breakpoints and summing slopes gives the norm at every breakpoint, and lam is found exactly by linear
    interpolation on the segment where it crosses eps. O(n log n) per row; computed in float64.
    """
    shape, dtype = v.shape, v.dtype
    v, a, c = _box_side(v, lo, hi)
    e = eps.to(torch.float64).reshape(-1)
    f0 = torch.minimum(a, c).sum(1)                       # ||clip(v, lo, hi)||_1: the norm at lam = 0
    start = (a - c).clamp_min(0)                          # from here on coordinate i shrinks with lam ...
    t = torch.cat([start, a], 1)                          # ... until it reaches 0 at lam = a_i
    s = torch.cat([-torch.ones_like(a), torch.ones_like(a)], 1)
    t, order = t.sort(1)
    slope = s.gather(1, order).cumsum(1)                  # d||d||_1 / d lam just right of each breakpoint
    drop = slope[:, :-1] * (t[:, 1:] - t[:, :-1])
    f = torch.cat([f0[:, None], f0[:, None] + drop.cumsum(1)], 1)   # the norm at each breakpoint
    k = (f > e[:, None]).sum(1).clamp(1, t.shape[1] - 1)  # f is non-increasing: the first breakpoint <= eps
    t0, f_0, sl = (z.gather(1, (k - 1)[:, None]).squeeze(1) for z in (t, f, slope))
    lam = t0 + (f_0 - e) / (-sl).clamp_min(1)
    lam = torch.where(f0 <= e, torch.zeros_like(lam), lam.clamp_min(0))
    lam = torch.where(e > 0, lam, a.amax(1))              # eps = 0: exactly 0, whatever the sums rounded to
    d = torch.minimum((a - lam[:, None]).clamp_min(0), c) * v.sign()
    return d.to(dtype).reshape(shape)


def project_l2_box(v: torch.Tensor, eps: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean projection of each row of ``v`` (B, ...) onto {d : ||d||_2 <= eps, lo <= d <= hi}.

    Shapes and ranges as ``project_l1_box``. The KKT conditions give d = clip(t v, lo, hi) with t in (0, 1]
    (t = 1 / (1 + mu), mu the ball's multiplier), the largest t with ||d||_2 <= eps. Coordinate i is clipped
    once t >= b_i = c_i / a_i, so between sorted breakpoints ||d(t)||_2^2 = t^2 S + C, with S the sum of
    a_i^2 not yet clipped and C the sum of c_i^2 clipped: the segment where it crosses eps^2 is found by
    sorting, and t = sqrt((eps^2 - C) / S) exactly. O(n log n) per row; computed in float64.
    """
    shape, dtype = v.shape, v.dtype
    v, a, c = _box_side(v, lo, hi)
    e2 = eps.to(torch.float64).reshape(-1) ** 2
    h1 = torch.minimum(a, c).pow(2).sum(1)                # ||clip(v, lo, hi)||_2^2: t = 1
    b = torch.where(a > 0, c / a.clamp_min(1e-300), torch.full_like(a, float("inf"))).clamp(max=1)
    b, order = b.sort(1)
    a2, c2 = a.gather(1, order) ** 2, c.gather(1, order) ** 2
    s_from = a2.flip(1).cumsum(1).flip(1)                 # S when t is just below breakpoint k
    c_before = c2.cumsum(1) - c2                          # C when t is just below breakpoint k
    h = b ** 2 * s_from + c_before                        # ||d||^2 at each breakpoint, non-decreasing
    k = (h < e2[:, None]).sum(1).clamp(max=a.shape[1] - 1)
    s_k, c_k = s_from.gather(1, k[:, None]).squeeze(1), c_before.gather(1, k[:, None]).squeeze(1)
    t = ((e2 - c_k).clamp_min(0) / s_k.clamp_min(1e-300)).sqrt()
    t = torch.where(h1 <= e2, torch.ones_like(t), t.clamp(0, 1))
    d = torch.minimum(t[:, None] * a, c) * v.sign()
    return d.to(dtype).reshape(shape)


def normalize_grad(g: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Ascent direction of unit ``norm`` for gradient ``g`` (B, ...): sign(g) for L-inf, g/||g||_2 for L2,
    g/||g||_1 for L1 (the gradient rescaled, as Foolbox's L1 gradient attacks step: the steepest L1 ascent
    direction would move a single pixel)."""
    if norm is Norm.LINF:
        return g.sign()
    n = norm_of(g, norm).clamp_min(1e-12)
    return g / _bcast(n, g)


def random_in_ball(x: torch.Tensor, eps: torch.Tensor | float, norm: Norm,
                   generator: torch.Generator | None) -> torch.Tensor:
    """A uniform random point of the eps ball around x (before box clipping). Uses only ``generator``; with
    per-example streams (``core.rng.ExampleRandom``, one row per row of ``x``) each row's point depends on
    its own stream alone."""
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.dim() == 0:
        eps_t = eps_t.expand(x.shape[0])
    per_example = isinstance(generator, ExampleRandom)
    if per_example and len(generator) != x.shape[0]:
        raise ValueError(f"random_in_ball: streams for {len(generator)} examples, inputs {tuple(x.shape)}")
    if norm is Norm.LINF:
        u = (generator.uniform(*x.shape[1:], dtype=x.dtype) if per_example
             else torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype))
        return x + (2 * u - 1) * _bcast(eps_t, x)
    if norm is Norm.L1:
        # Uniform in the L1 ball: d + 1 standard exponentials E, |coordinates| = E_1..d / sum(E), random signs
        # (the first d coordinates of a uniform point of the (d+1)-simplex fill the positive orthant's part).
        shape = (x.shape[0], flat(x).shape[1] + 1)
        u = (generator.uniform(shape[1], dtype=torch.float64) if per_example
             else torch.rand(shape, generator=generator, device=x.device, dtype=torch.float64))
        e = -torch.log1p(-u)
        s = (generator.signs(*x.shape[1:], dtype=x.dtype) if per_example
             else torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1)
        r = (e[:, :-1] / e.sum(1, keepdim=True)).to(x.dtype).reshape(x.shape)
        return x + s * r * _bcast(eps_t, x)
    # Uniform in the L2 ball: Gaussian direction, radius ~ eps * U^(1/d).
    g = (generator.normal(*x.shape[1:], dtype=x.dtype) if per_example
         else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
    g = g / _bcast(l2(g).clamp_min(1e-12), g)
    d = flat(x).shape[1]
    u = (generator.uniform(dtype=x.dtype) if per_example
         else torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype))
    return x + g * _bcast(u ** (1.0 / d) * eps_t, x)
