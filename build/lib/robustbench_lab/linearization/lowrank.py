"""The exact low-rank reduction of a residual unit's Jacobian (docs/methods.md section 6).

For a unit with an identity shortcut and boundary "pre", J = lambda*I + A B, where B (r x n) is the
Jacobian from the unit input to the residual branch's first ReLU output restricted to its active units,
and A (n x r) the Jacobian from there to the branch output. With W = [A, B^T] = Q R (thin QR, Q n x m,
m = 2r), J is block diagonal in [Q, Q_perp]: J Q_perp = lambda Q_perp because B Q_perp = 0, and
Q_perp^T A = 0. Its singular values are those of the m x m matrix Q^T J Q = lambda*I + R1 R2^T (R = [R1, R2],
so Q itself is never formed) plus |lambda| repeated n - m times. Exact; r VJPs + r JVPs. A bottleneck
(r <= n/4) has at least half its singular values exactly |lambda|.

``spectra.svd_lowrank`` wraps ``reduced_values`` into a ``Spectrum``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn

from robustbench_lab.core.errors import ConfigError, check_choice
from robustbench_lab.linearization.operators import TorchJacobian, as_torch_dtype, descending, svdvals
from robustbench_lab.linearization.units import (ModuleFunction, check_boundary, has_identity_shortcut, scaled,
                                                 unit_function)

PRECISIONS = ("auto", "float32", "float64")


def _branch_parts(block: nn.Module) -> tuple[ModuleFunction, nn.Module, ModuleFunction]:
    """(head, act, tail) with residual(x) = tail(act(head(x))): head = bn1 o conv1 (affine), act = the first
    ReLU (the branch's narrowest point in a bottleneck), tail = the rest of the branch."""
    head = ModuleFunction([block], lambda m, x: m[0].bn1(m[0].conv1(x)), "conv1-bn1")
    if hasattr(block, "conv3"):      # Bottleneck
        tail = ModuleFunction([block], lambda m, h: m[0].bn3(m[0].conv3(m[0].relu2(m[0].bn2(m[0].conv2(h))))),
                              "conv2-bn2-relu2-conv3-bn3")
    else:                            # BasicBlock
        tail = ModuleFunction([block], lambda m, h: m[0].bn2(m[0].conv2(h)), "conv2-bn2")
    return head, block.relu1, tail


def _act_derivative(act: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    """Diagonal of the (elementwise) activation's Jacobian at ``pre``: 0/1 for a ReLU, also right for a
    retrofitted JumpReLU (its derivative is 1 above the jump and 0 below)."""
    with torch.no_grad():
        _, d = torch.func.jvp(act, (pre,), (torch.ones_like(pre),))
    return d


def _one_example(x0: torch.Tensor) -> torch.Tensor:
    x0 = torch.as_tensor(x0).detach()
    return x0[0] if x0.dim() == 4 and x0.shape[0] == 1 else x0


def reduction_rank(block: nn.Module, x0: torch.Tensor) -> tuple[int, int]:
    """(r, n): active units of the branch's first ReLU at ``x0`` (C, H, W) and the unit's dimension; the
    low-rank reduction works on an m = min(n, 2r) dimensional subspace."""
    head, act, _ = _branch_parts(block)
    p = next(block.parameters())
    x0 = torch.as_tensor(x0).detach()
    x0 = x0[0] if x0.dim() == 4 else x0
    with torch.no_grad():
        pre = head(x0[None].to(device=p.device, dtype=p.dtype))
    d = _act_derivative(act, pre)
    return int((d != 0).sum()), int(x0.numel())


def check_applies(block: nn.Module, boundary: str) -> None:
    """ConfigError unless the reduction applies: boundary "pre" and an identity shortcut."""
    check_boundary(boundary)
    if boundary != "pre":
        raise ConfigError("linearize.boundary", boundary, ["pre"],
                          "the exact low-rank reduction needs J = lambda*I + dF (boundary 'post' multiplies by the "
                          "ReLU mask D); use method explicit or lanczos")
    if not has_identity_shortcut(block):
        raise ConfigError("linearize.method", "lowrank", ["auto", "explicit", "lanczos"],
                          f"the exact low-rank reduction needs an identity shortcut; this {type(block).__name__} "
                          "is a downsampling unit (its shortcut changes the shape, J = lambda*S + dF with S != I)")


def reduced_values(block: nn.Module, x0: torch.Tensor, skip_scale: float | None = None, weight_scale: float = 1.0, *,
                   boundary: str = "pre", batch_size: int = 256, dtype: Any = torch.float32,
                   precision: str = "auto", max_bytes: int = 2 << 30,
                   direct_ratio: float = 0.8) -> tuple[np.ndarray, dict[str, Any]]:
    """Every singular value (descending, float64) of the unit's Jacobian at ``x0`` (C, H, W), and the
    details of the computation (r, m, path, precision, timings); see ``spectra.svd_lowrank``."""
    t0 = time.perf_counter()
    check_applies(block, boundary)
    check_choice("linearize.lowrank_precision", precision, PRECISIONS)
    tdtype = as_torch_dtype(dtype)
    x0 = _one_example(x0)
    with scaled(block, skip_scale=skip_scale, weight_scale=weight_scale):
        lam = float(block.skip_scale)
        head, act, tail = _branch_parts(block)
        hop = TorchJacobian(head, x0, batch_size=batch_size, dtype=tdtype)
        pre = hop.y0[None]                       # (1, planes, H, W): the first ReLU's input
        dact = _act_derivative(act, pre)
        with torch.no_grad():
            h0 = act(pre)[0]
            # the decomposition must reproduce the block's own branch (guards against a changed block layout)
            p = next(block.parameters())
            ref = block.residual(x0[None].to(device=p.device, dtype=p.dtype))[0]
        top = TorchJacobian(tail, h0, batch_size=batch_size, dtype=tdtype)
        got = top.y0.to(device=ref.device, dtype=ref.dtype)
        if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-6):
            raise RuntimeError(f"{type(block).__name__}: tail(act(head(x))) differs from residual(x)")
        active = torch.nonzero(dact.reshape(-1) != 0).reshape(-1)
        n, r = hop.n_in, int(active.numel())
        m = min(n, 2 * r)
        direct = m > direct_ratio * n
        extra: dict[str, Any] = {"skip_scale": lam, "weight_scale": float(weight_scale), "r": r, "m": m,
                                 "active_fraction": r / max(1, int(pre.numel())), "block": type(block).__name__,
                                 "boundary": "pre"}
        if direct:
            # the subspace is (nearly) the whole space: n VJPs of the unit are cheaper than r VJPs + r JVPs
            # followed by an n x r x n product or a QR of n x 2r, and the result is the same exact matrix
            J = TorchJacobian(unit_function(block, "pre"), x0, batch_size=batch_size, dtype=tdtype).dense_t()
        else:
            # rows of B: d act/d pre (diagonal) times the head's rows, only at active units (the others are 0)
            B = hop.dense_t(active) * dact.reshape(-1)[active][:, None]      # (r, n)
            A = top.columns_t(active)                                        # (n, r)
    t1 = time.perf_counter()
    extra["seconds_products"] = t1 - t0
    if direct:
        if precision == "float64":
            J = J.double()
        extra.update(path="direct", m=n, precision=str(J.dtype).replace("torch.", ""))
        small = svdvals(J.cpu().numpy())
        del J
        m = n
    elif r == 0:
        small = np.zeros(0)
        extra.update(path="identity", precision="n/a")
    else:
        if precision == "auto":
            la = np.float64 if n * m * 8 <= max_bytes else np.float32
        else:
            la = np.float64 if precision == "float64" else np.float32
        extra.update(path="reduced", precision=np.dtype(la).name)
        W = np.empty((n, 2 * r), dtype=la, order="F")   # Fortran order: LAPACK works in place
        W[:, :r] = A.cpu().numpy()
        W[:, r:] = B.cpu().numpy().T
        del A, B
        # W = Q R  =>  Q^T A = R[:, :r] and B Q = R[:, r:]^T, so Q^T J Q = lambda*I + R1 R2^T without Q
        (_, _), R = scipy.linalg.qr(W, mode="raw", overwrite_a=True, check_finite=False)
        del W
        P = R[:, :r] @ R[:, r:].T
        P[np.diag_indices(P.shape[0])] += lam
        small = svdvals(P)
    values = np.concatenate([small, np.full(n - m, abs(lam))])
    extra["n_exact_lambda"] = int(n - m)
    extra["seconds_linalg"] = time.perf_counter() - t1
    return descending(values), extra
