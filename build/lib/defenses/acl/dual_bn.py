"""Dual BatchNorm: every BatchNorm of the contrastive model doubled into a ``normal`` and a ``pgd`` set.

ACL's clean and adversarial views have different statistics; giving each its own BatchNorm set (all other
weights shared) keeps one from corrupting the other's running statistics (Jiang et al. 2020, after
Xie et al.'s auxiliary BN).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BRANCHES = ("normal", "pgd")


class DualBatchNorm(nn.Module):
    """Two BatchNorm sets of the same shape, ``normal`` and ``pgd``; ``branch`` selects the one applied.

    Built from an existing BatchNorm (both sets start as copies of it). Everything else in the network is
    shared, so a forward pass in one branch updates (in train mode) only that branch's running statistics.
    """

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.normal = copy.deepcopy(bn)
        self.pgd = copy.deepcopy(bn)
        self.branch = "normal"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pgd(x) if self.branch == "pgd" else self.normal(x)


def convert_dual_bn(module: nn.Module) -> int:
    """Replace every BatchNorm1d/2d below ``module`` (in place) by a ``DualBatchNorm``. Returns the count."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, DualBatchNorm):
            continue
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(module, name, DualBatchNorm(child))
            n += 1
        else:
            n += convert_dual_bn(child)
    return n


@contextlib.contextmanager
def bn_branch(model: nn.Module, branch: str) -> Iterator[nn.Module]:
    """Route every ``DualBatchNorm`` of ``model`` through ``branch`` ('normal' or 'pgd'); restore afterwards."""
    if branch not in BRANCHES:
        raise ValueError(f"unknown BN branch {branch!r}; allowed: {BRANCHES}")
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm)]
    before = [m.branch for m in duals]
    for m in duals:
        m.branch = branch
    try:
        yield model
    finally:
        for m, b in zip(duals, before):
            m.branch = b
