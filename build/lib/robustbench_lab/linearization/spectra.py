"""Singular values of Jacobian operators: the one spectrum type and the one method dispatcher.

Three ways (docs/methods.md section 6):

* ``svd_explicit``: the dense Jacobian from batched VJPs, then a singular-values-only SVD (LAPACK gesdd
  without vectors). Exact, every value; O(n^3) and n^2 memory, fine up to ~16k dims.
* ``svd_lowrank``: the exact reduction J = lambda*I + A B of a unit with an identity shortcut at boundary
  "pre" (``lowrank``): every value from an m x m problem, m = 2r, r the active units of the branch's first
  ReLU. Exact; r VJPs + r JVPs.
* ``svd_lanczos``: the top or bottom k by ARPACK (scipy ``svds``) on a LinearOperator of jvp / vjp.

``singular_values`` chooses among them (``auto``) and is what the analyses call. Every result is a
``Spectrum``: *complete* (every value) or *partial* (the known top and bottom ends of a Lanczos run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Any, Iterator

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, svds
from torch import nn

from robustbench_lab.core.errors import ConfigError, check_choice
from robustbench_lab.linearization.lowrank import reduced_values, reduction_rank
from robustbench_lab.linearization.operators import (JacobianOperator, TorchJacobian, dense_jacobian, descending,
                                                     np_dtype, svdvals)
from robustbench_lab.linearization.options import METHODS, WHICH
from robustbench_lab.linearization.units import check_boundary, has_identity_shortcut, scaled, unit_function

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Spectrum:
    """Singular values of one Jacobian (n_out x n_in); ``n = min(n_in, n_out)`` values in all.

    ``values``: descending. A complete spectrum (``complete``) holds all n; a partial one (Lanczos) the
    ``n_top`` largest followed by the smallest it found (``top`` and ``bottom``, each descending; an end
    that was not asked for or did not converge is empty, ``note`` says which). ``method``: the method that
    produced the values (after ``auto`` resolution); ``seconds``: wall time including the products;
    ``n_zero``: values known to be exactly 0 (rows of inactive outputs at boundary post, a lower bound on
    their count); ``extra``: method details (k, which, rank r of the reduction, requested method, ...).
    """

    values: np.ndarray
    method: str
    seconds: float
    complete: bool
    n: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    n_in: int = 0
    n_out: int = 0
    n_top: int | None = None     # None: every value counts as the top end (complete, or a top-k run)
    n_zero: int = 0
    note: str = ""

    @property
    def top(self) -> np.ndarray:
        return self.values if self.n_top is None else self.values[:self.n_top]

    @property
    def bottom(self) -> np.ndarray:
        return self.values[:0] if self.n_top is None else self.values[self.n_top:]

    def to_dict(self, with_values: bool = False) -> dict[str, Any]:
        d = {"method": self.method, "seconds": self.seconds, "complete": self.complete, "n": self.n,
             **{k: v for k, v in self.extra.items() if np.isscalar(v) or isinstance(v, (str, type(None)))}}
        if with_values:
            d["values"] = self.values.tolist()
        return d


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
        J = J.astype(np_dtype(dtype), copy=False)
    values = descending(svdvals(J))
    t2 = time.perf_counter()
    n_in, n_out = int(op.n_in), int(op.n_out)
    return Spectrum(values, "explicit", t2 - t0, True, min(n_in, n_out),
                    {"n_in": n_in, "n_out": n_out, "dtype": str(J.dtype), "seconds_products": t1 - t0,
                     "seconds_svd": t2 - t1}, n_in=n_in, n_out=n_out)


# ----------------------------------------------------------------------------------------------- lanczos
def _check_k(k: int, n: int) -> int:
    if not isinstance(k, (int, np.integer)) or not (1 <= k < n):
        raise ConfigError("linearize.k", k, f"an integer with 1 <= k < {n} (min(n_in, n_out))",
                          "for the whole spectrum use method explicit (or lowrank)")
    return int(k)


def _linear_operator(op: JacobianOperator) -> LinearOperator:
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
    check_choice("linearize.which", which, WHICH)
    n_in, n_out = int(op.n_in), int(op.n_out)
    n = min(n_in, n_out)
    k = _check_k(k, n)
    t0 = time.perf_counter()
    if which == "both":
        top = svd_lanczos(op, k, "LM", tol=tol, maxiter=maxiter, seed=seed, solver=solver, vectors=vectors, ncv=ncv)
        bot = svd_lanczos(op, k, "SM", tol=tol, maxiter=maxiter, seed=seed, solver=solver, vectors=vectors, ncv=ncv)
        extra = {"k": k, "which": "both", "top": top.values, "bottom": bot.values}
        if vectors:
            extra["vh"] = np.concatenate([top.extra["vh"], bot.extra["vh"]])
        vals = np.concatenate([top.values, bot.values])
        return Spectrum(vals, "lanczos", time.perf_counter() - t0, False, n, extra, n_in=n_in, n_out=n_out, n_top=k)
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
    complete = k == n
    return Spectrum(np.asarray(s, dtype=np.float64)[order], "lanczos", time.perf_counter() - t0, complete, n, extra,
                    n_in=n_in, n_out=n_out, n_top=None if complete or which == "LM" else 0)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Lanczos multiplies one vector at a time: too little work to share, and on a busy 2-core machine the
    thread hand-offs made a top-6 Lanczos of a 12544-dim unit ~10x slower at 2 threads than at 1 (measured).
    Dense Jacobians and SVDs keep the run's threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _lanczos_end(op: JacobianOperator, k: int, which: str, maxiter: int | None) -> tuple[np.ndarray, str]:
    """One end of the spectrum by Lanczos; empty (with a note) when ARPACK does not converge in ``maxiter``."""
    try:
        with one_thread():
            return descending(svd_lanczos(op, k, which=which, maxiter=maxiter).values), ""
    except ArpackNoConvergence:
        log.warning("Lanczos (%s, k=%d) did not converge within maxiter=%s; that end is left unknown", which, k,
                    maxiter)
        return np.zeros(0), f"{which} not converged"


def _lanczos_ends(op: JacobianOperator, k: int, which: str, maxiter: int | None, n_zero: int) -> Spectrum:
    """The requested ends (``which`` LM, SM or both) as one partial spectrum; with at least k known zeros
    (``n_zero``) the bottom end is those zeros, without Lanczos (which would stall on that multiple value)."""
    t0 = time.perf_counter()
    n_in, n_out = int(op.n_in), int(op.n_out)
    notes = []
    top = bottom = np.zeros(0)
    if which in ("LM", "both"):
        top, note = _lanczos_end(op, k, "LM", maxiter)
        top = top[:k]
        notes.append(note)
    if which in ("SM", "both"):
        if n_zero >= k:
            bottom = np.zeros(k)
            notes.append("bottom: exact zeros (inactive ReLU rows)")
        else:
            bottom, note = _lanczos_end(op, k, "SM", maxiter)
            bottom = bottom[-k:]
            notes.append(note)
    return Spectrum(np.concatenate([top, bottom]), "lanczos", time.perf_counter() - t0, False, min(n_in, n_out),
                    {"k": k, "which": which}, n_in=n_in, n_out=n_out, n_top=top.size,
                    note="; ".join(x for x in notes if x))


# ----------------------------------------------------------------------------------------------- low rank
def svd_lowrank(block: nn.Module, x0: torch.Tensor, skip_scale: float | None = None, weight_scale: float = 1.0, *,
                boundary: str = "pre", batch_size: int = 256, dtype: Any = torch.float32,
                precision: str = "auto", max_bytes: int = 2 << 30, direct_ratio: float = 0.8) -> Spectrum:
    """Every singular value of the unit's Jacobian at its input ``x0`` (C, H, W) by the exact reduction
    (``lowrank``).

    Only for boundary "pre" and an identity shortcut (J = lambda*I + dF); ConfigError otherwise.
    ``skip_scale``: lambda (None: the block's current one, so it nests inside ``scaled``); ``weight_scale``
    multiplies the branch's conv weights (both restored afterwards). Products in ``dtype``; the QR and the
    small SVD in float64 (``precision="auto"``: when W = [A, B^T] fits in ``max_bytes``, else float32).
    When m = 2r > ``direct_ratio`` * n the reduction saves nothing (basic blocks, about half their mid
    units active): the n x n Jacobian is then formed by n VJPs and decomposed directly (``extra["path"]``
    "direct", in the products' dtype; the same exact matrix, as svd_explicit).
    """
    t0 = time.perf_counter()
    values, extra = reduced_values(block, x0, skip_scale, weight_scale, boundary=boundary, batch_size=batch_size,
                                   dtype=dtype, precision=precision, max_bytes=max_bytes, direct_ratio=direct_ratio)
    n = int(values.size)
    return Spectrum(values, "lowrank", time.perf_counter() - t0, True, n, extra, n_in=n, n_out=n)


# ------------------------------------------------------------------------------------------------ dispatch
def _is_operator(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("jvp", "vjp", "n_in", "n_out"))


def _zero_rows(op: Any) -> int:
    """Outputs that are exactly 0 at the linearization point. For a ReLU output (boundary post) their rows
    of J are 0 (the ReLU's derivative at 0 is 0 in torch and jax), so rank(J) <= n_out - zeros: at least
    zeros - (n_out - n) of its n = min(n_in, n_out) singular values are 0."""
    y = getattr(op, "y0", None)
    if y is None:
        return 0
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return int(np.sum(y == 0))


def singular_values(target: Any, x0: torch.Tensor | None = None, *, method: str = "auto", boundary: str = "pre",
                    k: int = 20, which: str = "LM", explicit_max: int = 16384, skip_scale: float | None = None,
                    weight_scale: float = 1.0, batch_size: int = 256, dtype: Any = torch.float32,
                    svd_dtype: Any = None, block: nn.Module | None = None, maxiter: int | None = None) -> Spectrum:
    """Singular values of a Jacobian, by ``method``; the method actually used is recorded.

    ``target``: a Jacobian operator (any backend), or a residual block with its input ``x0`` (C, H, W)
    (the unit function at ``boundary`` through ``TorchJacobian``, with ``skip_scale`` / ``weight_scale``
    applied for the call). An operator of a unit may come with that unit's ``block`` and ``x0`` (its current
    scales: callers wrap it in ``units.scaled``), which makes the low-rank reduction available.

    ``auto``: the exact low-rank reduction when it applies (a block, boundary "pre", identity shortcut) and
    its subspace is smaller (m = 2r < 0.8 n) and affordable (m <= explicit_max); else the explicit SVD when
    max(n_in, n_out) <= ``explicit_max``; else Lanczos: ``k`` values at the ``which`` end(s) (LM, SM or both;
    an end that does not converge within ``maxiter`` ARPACK restarts is left empty, with a note). Lanczos
    with 2k close to n computes the whole spectrum explicitly instead (cheaper, and the ends would overlap).
    At boundary post, outputs that are 0 give known zero singular values (``n_zero``); with at least k of
    them the bottom end is those zeros. ``extra["requested"]`` keeps the requested method.
    """
    check_choice("linearize.method", method, METHODS)
    check_boundary(boundary)
    check_choice("linearize.which", which, WHICH)
    is_op = _is_operator(target)
    if not is_op and not isinstance(target, nn.Module):
        raise ConfigError("linearize.target", type(target).__name__, ["a Jacobian operator", "a residual block"])
    if not is_op and x0 is None:
        raise ConfigError("linearize.x0", None, "the unit's input (C, H, W) when a block is given")
    if is_op and (skip_scale is not None or weight_scale != 1.0):
        raise ConfigError("linearize.skip_scale", skip_scale, "None with an operator",
                          "scales apply to a block: singular_values(block, x0, skip_scale=...)")
    blk = block if is_op else target
    if method == "lowrank" and (blk is None or x0 is None):
        raise ConfigError("linearize.method", method, ["auto", "explicit", "lanczos"],
                          "the low-rank reduction needs the block and its input: singular_values(block, x0, ...)")
    with scaled(blk, skip_scale=skip_scale, weight_scale=weight_scale) if not is_op else contextlib.nullcontext():
        op = target if is_op else TorchJacobian(unit_function(blk, boundary), x0, batch_size=batch_size, dtype=dtype)
        n_in, n_out = int(op.n_in), int(op.n_out)
        n = min(n_in, n_out)
        n_zero = max(0, _zero_rows(op) - (n_out - n)) if boundary == "post" else 0
        chosen = method
        if method == "auto":
            chosen = "explicit" if max(n_in, n_out) <= explicit_max else "lanczos"
            if blk is not None and x0 is not None and boundary == "pre" and has_identity_shortcut(blk):
                r, _ = reduction_rank(blk, x0)
                if 2 * r < 0.8 * n and 2 * r <= explicit_max:
                    chosen = "lowrank"
        if chosen == "lanczos" and 2 * k >= n - 1:
            chosen = "explicit"
        if chosen == "explicit":
            sp = svd_explicit(op, dtype=svd_dtype)
        elif chosen == "lowrank":   # the block as it is now (scaled above, or by the caller)
            sp = svd_lowrank(blk, x0, skip_scale=None, weight_scale=1.0, boundary=boundary, batch_size=batch_size,
                             dtype=dtype)
            sp.extra["weight_scale"] = float(weight_scale)   # applied by the scaled() above, not inside the call
        else:
            sp = _lanczos_ends(op, k, which, maxiter, n_zero)
    sp.n_zero = n_zero
    sp.extra["requested"] = method
    sp.extra["boundary"] = boundary
    return sp


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
