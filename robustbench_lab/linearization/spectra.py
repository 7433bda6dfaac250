"""Singular values of Jacobian operators: explicit, exact low-rank reduction, and Lanczos.

Three ways (docs/methods.md section 6):

* ``svd_explicit``: the dense Jacobian from batched VJPs, then a singular-values-only SVD (LAPACK gesdd
  without vectors). Exact, every value; O(n^3) and n^2 memory, fine up to ~16k dims.
* ``svd_lowrank``: for a unit with an identity shortcut and boundary "pre", J = lambda*I + A B, where B
  (r x n) is the Jacobian from the unit input to the residual branch's first ReLU output restricted to its
  active units, and A (n x r) the Jacobian from there to the branch output. With W = [A, B^T] = Q R (thin
  QR, Q n x m, m = 2r), J is block diagonal in [Q, Q_perp]: J Q_perp = lambda Q_perp because B Q_perp = 0,
  and Q_perp^T A = 0. Its singular values are those of the m x m matrix Q^T J Q = lambda*I + R1 R2^T
  (R = [R1, R2], so Q itself is never formed) plus |lambda| repeated n - m times. Exact; r VJPs + r JVPs.
  A bottleneck (r <= n/4) has at least half its singular values exactly |lambda|.
* ``svd_lanczos``: the top or bottom k by ARPACK (scipy ``svds``) on a LinearOperator of jvp / vjp.

Every result is a ``Spectrum`` (values descending, method, seconds, complete, n, extra).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn

from robustbench_lab.core.errors import ConfigError
from robustbench_lab.linearization.operators import JacobianOperator, TorchJacobian, as_torch_dtype, dense_jacobian
from robustbench_lab.linearization.units import BOUNDARIES, ModuleFunction, check_boundary, has_identity_shortcut, scaled, unit_function

METHODS = ("auto", "explicit", "lowrank", "lanczos")
WHICH = ("LM", "SM", "both")


@dataclasses.dataclass
class Spectrum:
    """Singular values of one Jacobian.

    ``values``: descending (for a partial spectrum, the computed ones: top-k, bottom-k, or both, top first);
    ``complete``: every one of the ``n = min(n_in, n_out)`` values is in ``values``; ``method``: the method
    that produced them (after ``auto`` resolution); ``seconds``: wall time including the products;
    ``extra``: method details (k, which, rank r of the reduction, requested method, ...).
    """

    values: np.ndarray
    method: str
    seconds: float
    complete: bool
    n: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self, with_values: bool = False) -> dict[str, Any]:
        d = {"method": self.method, "seconds": self.seconds, "complete": self.complete, "n": self.n,
             **{k: v for k, v in self.extra.items() if np.isscalar(v) or isinstance(v, (str, type(None)))}}
        if with_values:
            d["values"] = self.values.tolist()
        return d


def _desc(v: Any) -> np.ndarray:
    return np.sort(np.asarray(v, dtype=np.float64).ravel())[::-1].copy()


def _np_dtype(dtype: Any) -> type:
    return np.float64 if as_torch_dtype(dtype) == torch.float64 else np.float32


def svdvals(M: np.ndarray) -> np.ndarray:
    """Singular values (descending) of a dense matrix: LAPACK gesdd without vectors, in M's precision.

    Runs through torch (MKL LAPACK in the standard wheels, markedly faster than OpenBLAS' gesdd on CPU).
    """
    if M.size == 0:
        return np.zeros(0)
    t = torch.from_numpy(np.ascontiguousarray(M))
    return torch.linalg.svdvals(t).double().numpy()


# ----------------------------------------------------------------------------------------------- explicit
def svd_explicit(op: JacobianOperator, dtype: Any = None, batch_size: int | None = None) -> Spectrum:
    """Every singular value of ``op`` from its dense Jacobian (batched VJPs) and a values-only SVD.

    ``dtype``: precision of the SVD (default: the Jacobian's own, float32 for a float32 operator;
    ``"float64"`` for reference values).
    """
    t0 = time.perf_counter()
    J = dense_jacobian(op, batch_size=batch_size)
    t1 = time.perf_counter()
    if dtype is not None:
        J = J.astype(_np_dtype(dtype), copy=False)
    values = _desc(svdvals(J))
    t2 = time.perf_counter()
    return Spectrum(values, "explicit", t2 - t0, True, min(int(op.n_in), int(op.n_out)),
                    {"n_in": int(op.n_in), "n_out": int(op.n_out), "dtype": str(J.dtype),
                     "seconds_products": t1 - t0, "seconds_svd": t2 - t1})


# ----------------------------------------------------------------------------------------------- lanczos
def _check_k(k: int, n: int) -> int:
    if not isinstance(k, (int, np.integer)) or not (1 <= k < n):
        raise ConfigError("linearize.k", k, f"an integer with 1 <= k < {n} (min(n_in, n_out))",
                          "for the whole spectrum use method explicit (or lowrank)")
    return int(k)


def _linear_operator(op: JacobianOperator) -> Any:
    from scipy.sparse.linalg import LinearOperator

    n_in, n_out = int(op.n_in), int(op.n_out)
    f64 = (lambda a: np.asarray(a, dtype=np.float64))   # ARPACK iterates in float64 whatever the products' dtype

    return LinearOperator(
        (n_out, n_in), dtype=np.float64,
        matvec=lambda v: f64(op.jvp(np.asarray(v).reshape(1, -1))).ravel(),
        rmatvec=lambda u: f64(op.vjp(np.asarray(u).reshape(1, -1))).ravel(),
        matmat=lambda V: f64(op.jvp(np.asarray(V).T)).T,
        rmatmat=lambda U: f64(op.vjp(np.asarray(U).T)).T,
    )


def svd_lanczos(op: JacobianOperator, k: int, which: str = "LM", *, tol: float = 0.0, maxiter: int | None = None,
                seed: int = 0, solver: str = "arpack", vectors: bool = False, ncv: int | None = None) -> Spectrum:
    """The ``k`` largest (``which="LM"``) or smallest (``"SM"``) singular values of ``op`` by Lanczos
    (scipy ``svds``, ARPACK on J^T J, Rayleigh-Ritz refined), matrix-free; ``"both"`` runs both.

    ``vectors=True`` also returns the right singular vectors (k, n_in) in ``extra["vh"]`` (rows in the
    order of ``values``). The bottom end converges slowly when the small values cluster (no shift-invert
    is possible matrix-free); ``maxiter`` caps it (ARPACK raises if it does not converge).
    """
    from scipy.sparse.linalg import svds

    if which not in WHICH:
        raise ConfigError("linearize.which", which, WHICH)
    n = min(int(op.n_in), int(op.n_out))
    k = _check_k(k, n)
    t0 = time.perf_counter()
    if which == "both":
        top = svd_lanczos(op, k, "LM", tol=tol, maxiter=maxiter, seed=seed, solver=solver, vectors=vectors, ncv=ncv)
        bot = svd_lanczos(op, k, "SM", tol=tol, maxiter=maxiter, seed=seed, solver=solver, vectors=vectors, ncv=ncv)
        extra = {"k": k, "which": "both", "top": top.values, "bottom": bot.values}
        if vectors:
            extra["vh"] = np.concatenate([top.extra["vh"], bot.extra["vh"]])
        vals = np.concatenate([top.values, bot.values])
        return Spectrum(vals, "lanczos", time.perf_counter() - t0, False, n, extra)
    lin = _linear_operator(op)
    v0 = np.random.default_rng(seed).standard_normal(n)
    if ncv is None and which == "SM" and solver == "arpack":
        ncv = min(n, max(2 * k + 1, 40))
    n0 = (getattr(op, "n_jvp", 0), getattr(op, "n_vjp", 0))
    if vectors:
        _, s, vh = svds(lin, k=k, which=which, tol=tol, maxiter=maxiter, v0=v0, solver=solver, ncv=ncv,
                        return_singular_vectors="vh")
    else:
        s = svds(lin, k=k, which=which, tol=tol, maxiter=maxiter, v0=v0, solver=solver, ncv=ncv,
                 return_singular_vectors=False)
    order = np.argsort(s)[::-1]
    extra: dict[str, Any] = {"k": k, "which": which, "solver": solver, "ncv": ncv,
                             "n_jvp": getattr(op, "n_jvp", 0) - n0[0], "n_vjp": getattr(op, "n_vjp", 0) - n0[1]}
    if vectors:
        extra["vh"] = np.asarray(vh)[order]
    return Spectrum(np.asarray(s, dtype=np.float64)[order], "lanczos", time.perf_counter() - t0, k == n, n, extra)


# ----------------------------------------------------------------------------------------------- low rank
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


def _act_derivative(act: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    """Diagonal of the (elementwise) activation's Jacobian at ``pre``: 0/1 for a ReLU, also right for a
    retrofitted JumpReLU (its derivative is 1 above the jump and 0 below)."""
    with torch.no_grad():
        _, d = torch.func.jvp(act, (pre,), (torch.ones_like(pre),))
    return d


def svd_lowrank(block: nn.Module, x0: torch.Tensor, skip_scale: float | None = None, weight_scale: float = 1.0, *,
                boundary: str = "pre", batch_size: int = 256, dtype: Any = torch.float32,
                precision: str = "auto", max_bytes: int = 2 << 30, direct_ratio: float = 0.8) -> Spectrum:
    """Every singular value of the unit's Jacobian at its input ``x0`` (C, H, W) by the exact reduction.

    Only for boundary "pre" and an identity shortcut (J = lambda*I + dF); ConfigError otherwise.
    ``skip_scale``: lambda (None: the block's current one, so it nests inside ``scaled``); ``weight_scale``
    multiplies the branch's conv weights (both restored afterwards). Products in ``dtype``; the QR and the
    small SVD in float64 (``precision="auto"``: when W = [A, B^T] fits in ``max_bytes``, else float32).
    When m = 2r > ``direct_ratio`` * n the reduction saves nothing (basic blocks, about half their mid
    units active): the n x n Jacobian is then formed by n VJPs and decomposed directly (``extra["path"]``
    "direct", in the products' dtype; the same exact matrix, as svd_explicit).
    """
    t0 = time.perf_counter()
    check_boundary(boundary)
    if boundary != "pre":
        raise ConfigError("linearize.boundary", boundary, ["pre"],
                          "the exact low-rank reduction needs J = lambda*I + dF (boundary 'post' multiplies by the "
                          "ReLU mask D); use method explicit or lanczos")
    if not has_identity_shortcut(block):
        raise ConfigError("linearize.method", "lowrank", ["auto", "explicit", "lanczos"],
                          f"the exact low-rank reduction needs an identity shortcut; this {type(block).__name__} "
                          "is a downsampling unit (its shortcut changes the shape, J = lambda*S + dF with S != I)")
    if precision not in ("auto", "float32", "float64"):
        raise ConfigError("linearize.lowrank_precision", precision, ["auto", "float32", "float64"])
    tdtype = as_torch_dtype(dtype)
    x0 = torch.as_tensor(x0).detach()
    if x0.dim() == 4 and x0.shape[0] == 1:
        x0 = x0[0]
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
    return Spectrum(_desc(values), "lowrank", time.perf_counter() - t0, True, n, extra)


# ------------------------------------------------------------------------------------------------ dispatch
def _is_operator(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("jvp", "vjp", "n_in", "n_out"))


def singular_values(target: Any, x0: torch.Tensor | None = None, *, method: str = "auto", boundary: str = "pre",
                    k: int = 20, which: str = "LM", explicit_max: int = 16384, skip_scale: float | None = None,
                    weight_scale: float = 1.0, batch_size: int = 256, dtype: Any = torch.float32,
                    svd_dtype: Any = None) -> Spectrum:
    """Singular values of a Jacobian, by ``method``; the method actually used is recorded.

    ``target``: a Jacobian operator (any backend; methods explicit / lanczos / auto), or a residual block
    with its input ``x0`` (C, H, W) (all methods; the unit function at ``boundary``, with ``skip_scale`` /
    ``weight_scale`` applied for the call).

    ``auto``: the exact low-rank reduction when it applies (block, boundary "pre", identity shortcut) and
    its subspace is smaller (m = 2r < 0.8 n) and affordable (m <= explicit_max); else the explicit SVD when
    max(n_in, n_out) <= ``explicit_max``; else Lanczos (``k`` values, ``which`` end: LM, SM or both).
    ``extra["requested"]`` keeps the requested method.
    """
    if method not in METHODS:
        raise ConfigError("linearize.method", method, METHODS)
    check_boundary(boundary)
    is_op = _is_operator(target)
    if not is_op and not isinstance(target, nn.Module):
        raise ConfigError("linearize.target", type(target).__name__, ["a Jacobian operator", "a residual block"])
    if not is_op and x0 is None:
        raise ConfigError("linearize.x0", None, "the unit's input (C, H, W) when a block is given")
    if is_op and method == "lowrank":
        raise ConfigError("linearize.method", method, ["auto", "explicit", "lanczos"],
                          "the low-rank reduction needs the block and its input: singular_values(block, x0, ...)")
    if is_op and (skip_scale is not None or weight_scale != 1.0):
        raise ConfigError("linearize.skip_scale", skip_scale, "None with an operator",
                          "scales apply to a block: singular_values(block, x0, skip_scale=...)")

    chosen = method
    if not is_op:
        lowrank_ok = boundary == "pre" and has_identity_shortcut(target)
        n = int(x0.numel())
        if method == "auto" and lowrank_ok:
            with scaled(target, skip_scale=skip_scale, weight_scale=weight_scale):
                r, _ = reduction_rank(target, x0)
            if 2 * r < 0.8 * n and 2 * r <= explicit_max:
                chosen = "lowrank"
        if chosen == "lowrank":
            sp = svd_lowrank(target, x0, skip_scale=skip_scale, weight_scale=weight_scale, batch_size=batch_size,
                             dtype=dtype)
            sp.extra["requested"] = method
            return sp
    with scaled(target, skip_scale=skip_scale, weight_scale=weight_scale) if not is_op else _nullctx():
        op = target if is_op else TorchJacobian(unit_function(target, boundary), x0, batch_size=batch_size,
                                                  dtype=dtype)
        if chosen == "auto":
            chosen = "explicit" if max(int(op.n_in), int(op.n_out)) <= explicit_max else "lanczos"
        if chosen == "explicit":
            sp = svd_explicit(op, dtype=svd_dtype)
        else:
            sp = svd_lanczos(op, k, which)
    sp.extra["requested"] = method
    if not is_op:
        sp.extra["boundary"] = boundary
    return sp


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ------------------------------------------------------------------------------------------------ summaries
def count_near(values: np.ndarray, target: float = 1.0, tol: float = 1e-3) -> int:
    """How many ``values`` lie within ``tol`` (absolute) of ``target``."""
    v = np.asarray(values, dtype=np.float64)
    return int(np.sum(np.abs(v - target) <= tol))


def count_equal_one(values: np.ndarray, tol: float = 1e-3) -> int:
    """How many singular values equal 1 up to ``tol`` (absolute)."""
    return count_near(values, 1.0, tol)


def fraction_equal_one(values: np.ndarray, tol: float = 1e-3, n: int | None = None) -> float:
    """Share of singular values within ``tol`` of 1, out of ``n`` (default: len(values); pass the
    operator's n for a partial spectrum to get a lower bound)."""
    total = len(np.asarray(values).ravel()) if n is None else int(n)
    return count_equal_one(values, tol) / total if total else math.nan


__all__ = ["Spectrum", "svd_explicit", "svd_lanczos", "svd_lowrank", "singular_values", "count_near",
           "count_equal_one", "fraction_equal_one", "svdvals", "reduction_rank", "METHODS", "WHICH", "BOUNDARIES"]
