"""Jacobian operators: a function's Jacobian at one point, seen only through batched products.

The protocol is framework-neutral (numpy in, numpy out) so that the spectra code runs unchanged on the
PyTorch operator here and on the JAX backend. Vectors are flattened per example, C-order of the
per-example shape: ``jvp`` maps V (b, n_in) to rows (J V^T)^T (b, n_out), ``vjp`` maps U (b, n_out) to
U J (b, n_in). A dense Jacobian (n_out, n_in) is assembled from batched VJPs, one row per output, and its
singular values come from ``svdvals``. The precision names (``DTYPES``) are shared by both backends.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch

from robustbench_lab.core.errors import ConfigError
from robustbench_lab.linearization.options import DTYPES as DTYPE_NAMES

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float64)))
_ALIASES = {"float": "float32", "double": "float64"}     # torch's spellings of the same two types


@runtime_checkable
class JacobianOperator(Protocol):
    """The Jacobian J (n_out x n_in) of a function at one point, through batched products.

    ``in_shape`` / ``out_shape``: per-example shapes, e.g. (16, 28, 28); ``n_in`` / ``n_out`` their sizes.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    n_in: int
    n_out: int

    def jvp(self, V: np.ndarray) -> np.ndarray:
        """V (b, n_in) -> J V^T as (b, n_out)."""
        ...

    def vjp(self, U: np.ndarray) -> np.ndarray:
        """U (b, n_out) -> U J as (b, n_in)."""
        ...


def as_torch_dtype(dtype: Any, key: str = "linearize.dtype") -> torch.dtype:
    """torch.float32 / torch.float64 from a torch dtype, a numpy dtype or its name."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    try:
        name = str(np.dtype(dtype)) if not isinstance(dtype, (str, torch.dtype)) else str(dtype).replace("torch.", "")
    except TypeError:
        name = ""
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(key, dtype, list(DTYPES))
    return DTYPES[name]


def np_dtype(dtype: Any, key: str = "linearize.dtype") -> type:
    """np.float32 / np.float64 for ``dtype`` as ``as_torch_dtype`` reads it; None means float32."""
    if dtype is None:
        return np.float32
    return np.float64 if as_torch_dtype(dtype, key) == torch.float64 else np.float32


def descending(v: Any) -> np.ndarray:
    """``v`` flattened to float64 and sorted, largest first (a new array)."""
    return np.sort(np.asarray(v, dtype=np.float64).ravel())[::-1].copy()


def svdvals(M: np.ndarray) -> np.ndarray:
    """Singular values (descending) of a dense matrix: LAPACK gesdd without vectors, in M's precision.

    Runs through torch (MKL LAPACK in the standard wheels, markedly faster than OpenBLAS' gesdd on CPU).
    """
    if M.size == 0:
        return np.zeros(0)
    t = torch.from_numpy(np.ascontiguousarray(M))
    return torch.linalg.svdvals(t).double().numpy()


class TorchJacobian:
    """The Jacobian of a batched torch function ``fn`` (B, *in_shape) -> (B, *out_shape) at ``x0``.

    ``x0``: one example (C, H, W) (a leading batch dimension of 1 is accepted). Products run in ``dtype``
    (float32 default; float64 for reference values: a ``ModuleFunction`` such as ``unit_function(...)``
    is then evaluated on a float64 copy of its modules) on ``x0``'s device (or ``device``), ``batch_size``
    vectors at a time: the VJPs reuse one recorded forward pass at ``x0`` (vmap over the pullback), the
    JVPs are one forward-mode pass per batch.

    ``fn`` must treat examples independently (BatchNorm in eval mode), so that the Jacobian of one example
    is well defined. Parameters are constants: only input derivatives are computed.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, batch_size: int = 256,
                 dtype: Any = torch.float32, device: torch.device | str | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("linearize.batch_size", batch_size, "an integer >= 1")
        self.dtype = as_torch_dtype(dtype)
        self.np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        x0 = torch.as_tensor(x0).detach()
        if x0.dim() == 4 and x0.shape[0] == 1:   # (1, C, H, W): one example
            x0 = x0[0]
        self.device = torch.device(device) if device is not None else x0.device
        cast = getattr(fn, "cast", None)
        if callable(cast):
            p_dtype = fn.param_dtype() if hasattr(fn, "param_dtype") else None
            p_device = fn.param_device() if hasattr(fn, "param_device") else None
            if (p_dtype is not None and p_dtype != self.dtype) or (p_device is not None and p_device != self.device):
                fn = cast(self.dtype, self.device)
        self.fn = fn
        self.x0 = x0.to(device=self.device, dtype=self.dtype).contiguous()
        self.batch_size = int(batch_size)
        with torch.no_grad():
            y0 = fn(self.x0[None])
        self.y0 = y0[0].detach()
        self.in_shape: tuple[int, ...] = tuple(self.x0.shape)
        self.out_shape: tuple[int, ...] = tuple(self.y0.shape)
        self.n_in = int(math.prod(self.in_shape))
        self.n_out = int(math.prod(self.out_shape))
        self._pullback: Callable[..., Any] | None = None
        self._xrep: torch.Tensor | None = None
        self.n_jvp = 0     # products computed (vectors), for cost accounting
        self.n_vjp = 0

    def __repr__(self) -> str:
        return (f"TorchJacobian({self.n_out} x {self.n_in}, in {self.in_shape}, out {self.out_shape}, "
                f"{str(self.dtype).replace('torch.', '')}, {self.device})")

    # ------------------------------------------------------------------------------------ torch products
    def _pull(self) -> Callable[..., Any]:
        if self._pullback is None:
            with torch.no_grad():      # functorch still differentiates w.r.t. x0; no graph for the weights
                _, self._pullback = torch.func.vjp(self.fn, self.x0[None])
        return self._pullback

    def vjp_t(self, U: torch.Tensor) -> torch.Tensor:
        """U (b, n_out) -> U J (b, n_in), torch tensors on the operator's device and dtype."""
        U = U.to(device=self.device, dtype=self.dtype).reshape(-1, self.n_out)
        pull = self._pull()
        batched = torch.func.vmap(lambda u: pull(u.view(1, *self.out_shape))[0])
        out = []
        with torch.no_grad():
            for i in range(0, U.shape[0], self.batch_size):
                out.append(batched(U[i:i + self.batch_size]).reshape(-1, self.n_in))
        self.n_vjp += U.shape[0]
        return torch.cat(out) if out else U.new_zeros((0, self.n_in))

    def _x0_copies(self, b: int) -> torch.Tensor:
        # real copies (forward AD rejects an expanded primal), made once per operator
        if self._xrep is None or self._xrep.shape[0] < b:
            self._xrep = self.x0[None].repeat(max(b, min(self.batch_size, 1 << 30)), *([1] * self.x0.dim()))
        return self._xrep[:b]

    def jvp_t(self, V: torch.Tensor) -> torch.Tensor:
        """V (b, n_in) -> (J V^T)^T (b, n_out), torch tensors on the operator's device and dtype."""
        V = V.to(device=self.device, dtype=self.dtype).reshape(-1, self.n_in)
        out = []
        with torch.no_grad():
            for i in range(0, V.shape[0], self.batch_size):
                v = V[i:i + self.batch_size].reshape(-1, *self.in_shape)
                # examples are independent, so one forward-mode pass at b copies of x0 gives b products
                x = self._x0_copies(v.shape[0])
                _, t = torch.func.jvp(self.fn, (x,), (v,))
                out.append(t.reshape(-1, self.n_out))
        self.n_jvp += V.shape[0]
        return torch.cat(out) if out else V.new_zeros((0, self.n_out))

    # ------------------------------------------------------------------------------------ numpy protocol
    def _from_np(self, A: np.ndarray, n: int) -> torch.Tensor:
        A = np.asarray(A)
        if A.ndim == 1:
            A = A[None]
        if A.ndim != 2 or A.shape[1] != n:
            raise ValueError(f"expected an array (b, {n}), got shape {A.shape}")
        return torch.from_numpy(np.ascontiguousarray(A, dtype=self.np_dtype))

    def jvp(self, V: np.ndarray) -> np.ndarray:
        """V (b, n_in) -> J V^T as (b, n_out) (numpy, the operator's dtype)."""
        return self.jvp_t(self._from_np(V, self.n_in)).cpu().numpy()

    def vjp(self, U: np.ndarray) -> np.ndarray:
        """U (b, n_out) -> U J as (b, n_in) (numpy, the operator's dtype)."""
        return self.vjp_t(self._from_np(U, self.n_out)).cpu().numpy()

    def dense_t(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``rows`` (default all) of J as a tensor (len(rows), n_in), by batched VJPs with one-hot
        cotangents made on the device (no host round trip per batch)."""
        idx = torch.arange(self.n_out, device=self.device) if rows is None else rows.to(self.device)
        J = torch.empty((idx.numel(), self.n_in), dtype=self.dtype, device=self.device)
        for i in range(0, idx.numel(), self.batch_size):
            sl = idx[i:i + self.batch_size]
            U = torch.zeros((sl.numel(), self.n_out), dtype=self.dtype, device=self.device)
            U[torch.arange(sl.numel(), device=self.device), sl] = 1
            J[i:i + sl.numel()] = self.vjp_t(U)
        return J

    def columns_t(self, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Columns ``cols`` (default all) of J as a tensor (n_out, len(cols)), by batched JVPs."""
        idx = torch.arange(self.n_in, device=self.device) if cols is None else cols.to(self.device)
        J = torch.empty((self.n_out, idx.numel()), dtype=self.dtype, device=self.device)
        for i in range(0, idx.numel(), self.batch_size):
            sl = idx[i:i + self.batch_size]
            V = torch.zeros((sl.numel(), self.n_in), dtype=self.dtype, device=self.device)
            V[torch.arange(sl.numel(), device=self.device), sl] = 1
            J[:, i:i + sl.numel()] = self.jvp_t(V).T
        return J


def dense_jacobian(op: JacobianOperator, batch_size: int | None = None) -> np.ndarray:
    """The dense Jacobian (n_out, n_in) of ``op``, row blocks by batched VJPs with one-hot cotangents.

    Memory: n_out * n_in values (12,544^2 float32 = 630 MB). dtype: the operator's output dtype.
    """
    if isinstance(op, TorchJacobian) and batch_size is None:
        return op.dense_t().cpu().numpy()
    bs = int(batch_size or getattr(op, "batch_size", 256))
    n_out, n_in = int(op.n_out), int(op.n_in)
    J: np.ndarray | None = None
    for i in range(0, n_out, bs):
        b = min(bs, n_out - i)
        U = np.zeros((b, n_out), dtype=getattr(op, "np_dtype", np.float32))
        U[np.arange(b), i + np.arange(b)] = 1
        rows = np.asarray(op.vjp(U))
        if J is None:
            J = np.empty((n_out, n_in), dtype=rows.dtype)
        J[i:i + b] = rows
    return J if J is not None else np.zeros((0, n_in), dtype=np.float32)
