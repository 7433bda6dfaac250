"""LARS, the pre-training optimizer of the ACL release (layer-wise trust ratio on every tensor)."""

from __future__ import annotations

from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017) in the form the ACL release uses: per
    parameter tensor w with gradient g, local = eta ||w|| / (||g|| + wd ||w||) (1 when either norm is ~0),
    v <- momentum v + lr local (g + wd w), w <- w - v. Applied to every tensor (BN and biases included)."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mom, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                wn, gn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                local = torch.where((wn > 1e-15) & (gn > 1e-15), eta * wn / (gn + wd * wn), torch.ones_like(wn))
                upd = (g + wd * p) * (lr * local)
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                buf = st["momentum_buffer"]
                buf.mul_(mom).add_(upd)
                p.sub_(buf)
        return loss
