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

    @classmethod
    def parse(cls, value: "str | Norm", key: str = "attack.norm") -> "Norm":
        if isinstance(value, Norm):
            return value
        aliases = {"linf": cls.LINF, "inf": cls.LINF, "l_inf": cls.LINF, "Linf": cls.LINF,
                   "l2": cls.L2, "2": cls.L2, "L2": cls.L2}
        if str(value) in aliases:
            return aliases[str(value)]
        if str(value).lower() in aliases:
            return aliases[str(value).lower()]
        raise ConfigError(key, value, [n.value for n in cls])

    @property
    def dual(self) -> float:
        """Exponent q of the dual norm (used by linearised-distance formulas)."""
        return 1.0 if self is Norm.LINF else 2.0

    @property
    def p(self) -> float:
        return float("inf") if self is Norm.LINF else 2.0


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def norm_of(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-example norm of a batch ``delta`` of shape (B, ...). Returns shape (B,)."""
    d = flat(delta)
    if norm is Norm.LINF:
        return d.abs().amax(dim=1)
    return d.norm(p=2, dim=1)


def l2(delta: torch.Tensor) -> torch.Tensor:
    return norm_of(delta, Norm.L2)


def linf(delta: torch.Tensor) -> torch.Tensor:
    return norm_of(delta, Norm.LINF)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float, norm: Norm,
            lower: float = 0.0, upper: float = 1.0) -> torch.Tensor:
    """Project ``x_adv`` onto {x' : ||x' - x|| <= eps} and then into the [lower, upper] box.

    For L-inf the two projections commute, so the result lies in the intersection exactly. For L2,
    clipping to the box after the ball projection can only shrink every coordinate of the perturbation
    towards 0 (x is inside the box), so the norm stays <= eps and the result is feasible.
    ``eps`` is a float or a per-example tensor of shape (B,).
    """
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.dim() == 0:
        eps_t = eps_t.expand(x.shape[0])
    delta = x_adv - x
    if norm is Norm.LINF:
        e = _bcast(eps_t, delta)
        delta = torch.maximum(torch.minimum(delta, e), -e)
    else:
        n = l2(delta)
        factor = torch.where(n > eps_t, eps_t / n.clamp_min(1e-12), torch.ones_like(n))
        delta = delta * _bcast(factor, delta)
    return (x + delta).clamp(lower, upper)


def normalize_grad(g: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Steepest-ascent direction of unit ``norm`` for gradient ``g``: sign(g) for L-inf, g/||g||_2 for L2."""
    if norm is Norm.LINF:
        return g.sign()
    n = l2(g).clamp_min(1e-12)
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
    # Uniform in the L2 ball: Gaussian direction, radius ~ eps * U^(1/d).
    g = (generator.normal(*x.shape[1:], dtype=x.dtype) if per_example
         else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
    g = g / _bcast(l2(g).clamp_min(1e-12), g)
    d = flat(x).shape[1]
    u = (generator.uniform(dtype=x.dtype) if per_example
         else torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype))
    return x + g * _bcast(u ** (1.0 / d) * eps_t, x)
