"""The JumpReLU activation: JumpReLU_k(x) = x if x > k else 0, with a BPDA backward for adaptive attacks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attacks.adaptive import SURROGATES
from robustbench_lab.core.errors import check_choice, check_number


class _JumpBPDA(torch.autograd.Function):
    """Forward: the exact JumpReLU. Backward: the derivative of a smooth surrogate (BPDA, Athalye et al.)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, jump: float, surrogate: str, tau: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.jump, ctx.surrogate, ctx.tau = jump, surrogate, tau
        return torch.where(x > jump, x, torch.zeros_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        if ctx.surrogate == "relu":
            d = (x > 0).to(grad.dtype)                                   # d/dx relu(x)
        else:
            s = torch.sigmoid((x - ctx.jump) / ctx.tau)
            d = s + x * s * (1 - s) / ctx.tau                            # d/dx [x * sigmoid((x - k) / tau)]
        return grad * d, None, None, None


class JumpReLU(nn.Module):
    """JumpReLU_k(x) = x if x > k else 0, elementwise; any input shape. k = 0 is exactly ReLU.

    ``bpda``: None (default) differentiates the real function (derivative 1[x > k]); ``'relu'`` keeps the
    forward and back-propagates 1[x > 0]; ``'sigmoid'`` back-propagates the derivative of
    x * sigmoid((x - k) / tau). Unlike the official code (jump active in eval mode only), the jump is
    applied in both modes: the harness evaluates and attacks in eval mode anyway, and a module that behaves
    the same in both modes is less surprising.
    """

    BPDA_SURROGATES = SURROGATES   # marks the module as BPDA-capable (attacks.adaptive.BPDA looks for it)

    def __init__(self, jump: float = 0.0, bpda: str | None = None, tau: float = 0.1) -> None:
        super().__init__()
        self.jump = check_jump(jump, "jump")
        self.bpda = check_choice("attack.surrogate", bpda, (None,) + SURROGATES)
        self.tau = float(check_number("attack.tau", tau, low=0, low_open=True, high=math.inf, high_open=True,
                                      hint="the temperature of the sigmoid surrogate"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bpda is None:
            return torch.where(x > self.jump, x, torch.zeros_like(x))
        return _JumpBPDA.apply(x, self.jump, self.bpda, self.tau)

    def extra_repr(self) -> str:
        return f"jump={self.jump:g}" + (f", bpda={self.bpda!r}, tau={self.tau:g}" if self.bpda else "")


def check_jump(jump: Any, key: str) -> float:
    """``jump`` as a float if it is a finite number >= 0, else a ConfigError naming ``defense.<key>``."""
    return float(check_number(f"defense.{key}", jump, low=0, high=math.inf, high_open=True,
                              hint="the jump is in pre-activation units"))
