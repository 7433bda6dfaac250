"""``JaxClassifier``: a torch ``nn.Module`` whose forward and backward (first and second order) run in
JAX, with the ``num_classes`` and ``bounds`` of ``Classifier``, so every attack in ``attacks/`` runs on it
unchanged.

Part of the JAX backend (``jax_backend``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from robustbench_lab.linearization.jax_jacobian import pad_rows
from robustbench_lab.linearization.jax_net import jax_forward
from robustbench_lab.linearization.jax_params import ResNetParams, params_from_torch


def _bucket(n: int) -> int:
    """Next power of two >= n: attacks shrink their active batch every step; padding to a few bucket sizes
    bounds the number of compilations (examples are independent, padded rows are zeros and are dropped)."""
    return 1 << max(0, (n - 1).bit_length())


_fwd = jax_forward     # already jitted


def _vjp_logits(params: ResNetParams, x: jax.Array, g: jax.Array) -> jax.Array:
    _, pull = jax.vjp(lambda z: jax_forward(params, z), x)
    return pull(g)[0]


_vjp1 = jax.jit(_vjp_logits)


@jax.jit
def _vjp2(params: ResNetParams, x: jax.Array, g: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Derivatives of <v, J(x)^T g> w.r.t. x (zero a.e. for a ReLU network) and w.r.t. g (= J(x) v)."""
    _, pull = jax.vjp(lambda z, c: _vjp_logits(params, z, c), x, g)
    return pull(v)


class _Runner:
    """Host-side glue: torch tensors -> padded float32 numpy -> jitted JAX -> torch on the caller's device."""

    def __init__(self, params: ResNetParams) -> None:
        self.params = params

    @staticmethod
    def _np(t: torch.Tensor, m: int) -> jax.Array:
        return jnp.asarray(pad_rows(t.detach().to("cpu", torch.float32).contiguous().numpy(), m))

    @staticmethod
    def _torch(a: jax.Array, n: int, like: torch.Tensor) -> torch.Tensor:
        # slice on the host: slicing the jax array would compile a slice op per distinct n
        return torch.from_numpy(np.array(np.asarray(a)[:n])).to(device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == 0:
            return x.new_zeros((0, self.params.num_classes))
        m = _bucket(n)
        return self._torch(_fwd(self.params, self._np(x, m)), n, x)

    def vjp(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == 0:
            return torch.zeros_like(x)
        m = _bucket(n)
        return self._torch(_vjp1(self.params, self._np(x, m), self._np(g, m)), n, x)

    def vjp2(self, x: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        if n == 0:
            return torch.zeros_like(x), torch.zeros_like(g)
        m = _bucket(n)
        gx, gg = _vjp2(self.params, self._np(x, m), self._np(g, m), self._np(v, m))
        return self._torch(gx, n, x), self._torch(gg, n, g)


class _JaxLogits(torch.autograd.Function):
    """logits = f(x) in JAX; backward: x_bar = J(x)^T logits_bar, itself differentiable once more."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, runner: _Runner) -> torch.Tensor:
        ctx.runner = runner
        ctx.save_for_backward(x)
        return runner.forward(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (x,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return _JaxVJP.apply(x, g, ctx.runner), None


class _JaxVJP(torch.autograd.Function):
    """x_bar = J(x)^T g as a function of (x, g), so that double backward (Hessian-vector products of a loss
    on the logits, the second-order trust-region attack) works: d/dx <v, J^T g> and d/dg = J v."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: torch.Tensor, runner: _Runner) -> torch.Tensor:
        ctx.runner = runner
        ctx.save_for_backward(x, g)
        return runner.vjp(x, g)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, g = ctx.saved_tensors
        gx, gg = ctx.runner.vjp2(x, g, v)
        return gx, gg, None


class JaxClassifier(nn.Module):
    """A classifier whose computation runs in JAX: ``forward(x)`` maps images (B, C, H, W) in ``bounds`` to
    logits (B, K) like ``robustbench_lab.core.model.Classifier`` (normalization inside), and autograd works
    through it (first and second order), so every attack of ``attacks/`` runs on it unchanged.

    Eval-mode semantics always (BatchNorm running statistics; ``train()`` changes nothing); no parameters, so
    nothing to freeze. Inputs are computed in float32 and the outputs returned in the input's dtype and on
    its device. On a GPU tensor every pass round-trips through host memory (torch -> numpy -> JAX's default
    device -> numpy -> torch): correct but slow; the class is for checking and for the CPU.

    Batches are zero-padded to the next power of two before the jitted JAX call (dropped afterwards), so
    an attack's shrinking active set compiles at most log2(B) + 1 shapes.
    """

    def __init__(self, params: ResNetParams, bounds: tuple[float, float] = (0.0, 1.0), name: str = "") -> None:
        super().__init__()
        self.params = params
        self._runner = _Runner(params)
        self.num_classes = int(params.num_classes)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.name = name
        self.eval()

    @classmethod
    def from_torch(cls, classifier: nn.Module) -> "JaxClassifier":
        """The JAX twin of a ``Classifier`` around a ``CifarResNet`` (same weights, bounds and name)."""
        return cls(params_from_torch(classifier), getattr(classifier, "bounds", (0.0, 1.0)),
                   getattr(classifier, "name", ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.params.spec.in_channels:
            raise ValueError(f"JaxClassifier expects images (B, {self.params.spec.in_channels}, H, W), got "
                             f"{tuple(x.shape)}")
        return _JaxLogits.apply(x, self._runner)

    def extra_repr(self) -> str:
        kinds = sorted({u.kind for st in self.params.spec.stages for u in st})
        return (f"{'+'.join(kinds)}, units per stage {[len(s) for s in self.params.spec.stages]}, "
                f"num_classes={self.num_classes}, bounds={self.bounds}")
