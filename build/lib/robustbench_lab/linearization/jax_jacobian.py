"""``JaxJacobian``: the Jacobian operator of ``operators.JacobianOperator`` by vmapped, jitted
``jax.jvp`` / ``jax.vjp`` (numpy in and out), for JAX functions and for the torch unit/stage functions of
``units`` (translated by ``jax_net.from_torch_function`` and checked against torch at the point).

Part of the JAX backend (``jax_backend``). float64 operators run inside a local ``jax.enable_x64``; the
global JAX setting is untouched.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import torch

from robustbench_lab.core.errors import ConfigError
from robustbench_lab.linearization.jax_net import UnitChain, from_torch_function, is_torch_function
from robustbench_lab.linearization.operators import np_dtype


@contextlib.contextmanager
def x64(enabled: bool = True) -> Iterator[None]:
    """``jax.enable_x64`` (float64 JAX arrays) for a block of code when ``enabled``, restoring the previous
    setting: float64 products for one operator without changing the process-wide JAX default."""
    with jax.enable_x64(True) if enabled else contextlib.nullcontext():
        yield


def pad_rows(a: np.ndarray, m: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``m`` rows, so that a jitted call sees one of a few shapes."""
    if a.shape[0] == m:
        return a
    return np.concatenate([a, np.zeros((m - a.shape[0],) + a.shape[1:], a.dtype)])


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _single(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    return fn(x[None])[0]


@jax.jit
def _apply_single(fn: Any, x0: jax.Array) -> jax.Array:
    return _single(fn, x0)


@jax.jit
def _jvp_many(fn: Any, x0: jax.Array, V: jax.Array) -> jax.Array:
    """J V for tangents V (b, *in_shape): one forward at x0 (unbatched), b tangents through vmap."""
    f = functools.partial(_single, fn)
    return jax.vmap(lambda v: jax.jvp(f, (x0,), (v,))[1])(V)


@jax.jit
def _vjp_many(fn: Any, x0: jax.Array, U: jax.Array) -> jax.Array:
    """U J for cotangents U (b, *out_shape): one forward at x0, the pullback vmapped over U."""
    _, pull = jax.vjp(functools.partial(_single, fn), x0)
    return jax.vmap(lambda u: pull(u)[0])(U)


@functools.partial(jax.jit, static_argnames=("size", "forward"))
def _jac_block(fn: Any, x0: jax.Array, start: jax.Array, size: int, forward: bool) -> jax.Array:
    """``size`` consecutive columns (forward, as rows) or rows (reverse) of J from ``start``: a chunk of
    ``jax.jacfwd`` / ``jax.jacrev``. Indices past the end give zero rows (one_hot of an out-of-range index)."""
    f = functools.partial(_single, fn)
    idx = start + jnp.arange(size)
    if forward:
        basis = jax.nn.one_hot(idx, x0.size, dtype=x0.dtype).reshape((size,) + x0.shape)
        return jax.vmap(lambda v: jax.jvp(f, (x0,), (v,))[1])(basis).reshape(size, -1)
    y, pull = jax.vjp(f, x0)
    basis = jax.nn.one_hot(idx, y.size, dtype=y.dtype).reshape((size,) + y.shape)
    return jax.vmap(lambda u: pull(u)[0])(basis).reshape(size, -1)


class JaxJacobian:
    """The Jacobian of a batched function ``fn`` (B, *in_shape) -> (B, *out_shape) at one example ``x0``,
    through vmapped, jitted ``jax.jvp`` / ``jax.vjp`` (the protocol of ``operators.JacobianOperator``).

    ``fn``: a JAX function (e.g. ``jax_unit_function(...)``, ``jax_stage_function(...)``, or any traceable
    callable), or a torch unit/stage function of ``units`` (a ``ModuleFunction``, a block, a Sequential of
    blocks), which is translated with ``from_torch_function`` and checked against torch at ``x0`` (outputs
    equal within 1e-4 relative to their scale, else ValueError). ``fn`` must treat examples independently
    (eval-mode BatchNorm). ``x0``: one example (C, H, W) (numpy, jax or torch; a leading 1 is accepted).

    ``dtype``: float32 (default) or float64 (computed inside a local ``jax.enable_x64``; the weights are
    cast). Products are computed ``batch_size`` vectors at a time; a batch of b <= batch_size vectors is one
    call (compiled once per b), longer inputs are split into chunks of batch_size (the last one zero-padded,
    so one more compilation at most). Jitted products are shared by all operators of the same architecture,
    input shape and dtype: the first unit of a kind compiles, the others reuse it.

    numpy protocol: ``jvp(V (b, n_in)) -> (b, n_out)``, ``vjp(U (b, n_out)) -> (b, n_in)``, ``dense() ->
    (n_out, n_in)``; vectors are per-example arrays flattened in C order.
    """

    def __init__(self, fn: Any, x0: Any, batch_size: int = 256, dtype: Any = None, *, check: bool = True) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("linearize.batch_size", batch_size, "an integer >= 1")
        self.np_dtype = np_dtype(dtype)
        self.x64 = self.np_dtype == np.float64
        self.batch_size = int(batch_size)
        torch_fn = fn if is_torch_function(fn) else None
        if isinstance(x0, torch.Tensor):
            x0 = x0.detach().cpu().numpy()
        x0 = np.asarray(x0, dtype=self.np_dtype)
        if x0.ndim == 4 and x0.shape[0] == 1:   # (1, C, H, W): one example
            x0 = x0[0]
        if torch_fn is not None:
            fn = from_torch_function(torch_fn)
        elif not _is_pytree_callable(fn):
            # a plain JAX callable: a Partial makes it a jit argument (its identity is the cache key)
            fn = jax.tree_util.Partial(fn)
        with x64(self.x64):
            jdt = jnp.float64 if self.x64 else jnp.float32
            self.fn = _cast_floats(fn, jdt)
            self.x0 = jnp.asarray(x0, dtype=jdt)
            try:
                y0 = _apply_single(self.fn, self.x0)
            except Exception as e:  # a torch function that is not one of ours, or a shape error
                raise TypeError(f"JaxJacobian: fn is not a JAX-traceable batched function of inputs shaped "
                                f"(B, {', '.join(map(str, x0.shape))}): {e}") from e
            self.y0 = np.asarray(y0)
        if torch_fn is not None and check:
            self._check_against(torch_fn, x0)
        self.in_shape: tuple[int, ...] = tuple(int(d) for d in x0.shape)
        self.out_shape: tuple[int, ...] = tuple(int(d) for d in self.y0.shape)
        self.n_in = int(math.prod(self.in_shape))
        self.n_out = int(math.prod(self.out_shape))
        self.n_jvp = 0
        self.n_vjp = 0

    def _check_against(self, torch_fn: Any, x0: np.ndarray) -> None:
        with torch.no_grad():
            ref = torch_fn(torch.from_numpy(x0.astype(np.float32))[None])[0].double().numpy()
        scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
        err = float(np.abs(self.y0.astype(np.float64) - ref).max(initial=0.0))
        if ref.shape != self.y0.shape or err > 1e-4 * scale:
            raise ValueError(f"the JAX translation of {torch_fn!r} does not reproduce it at x0 (max abs difference "
                             f"{err:.3g}, output scale {scale:.3g}); refusing to compute its Jacobian")

    def __repr__(self) -> str:
        return (f"JaxJacobian({self.n_out} x {self.n_in}, in {self.in_shape}, out {self.out_shape}, "
                f"{np.dtype(self.np_dtype).name}, {self.fn!r})")

    def _rows(self, A: Any, n: int) -> np.ndarray:
        A = np.asarray(A)
        if A.ndim == 1:
            A = A[None]
        if A.ndim != 2 or A.shape[1] != n:
            raise ValueError(f"expected an array (b, {n}), got shape {A.shape}")
        return np.ascontiguousarray(A, dtype=self.np_dtype)

    def _batched(self, prod: Callable[..., jax.Array], A: np.ndarray, shape: tuple[int, ...], n_res: int) -> np.ndarray:
        b = A.shape[0]
        out = np.empty((b, n_res), dtype=self.np_dtype)
        if b == 0:
            return out
        chunk = b if b <= self.batch_size else self.batch_size
        with x64(self.x64):
            for i in range(0, b, chunk):
                blk = A[i:i + chunk]
                m = blk.shape[0]
                blk = pad_rows(blk, chunk)     # the tail, to the compiled chunk size
                r = prod(self.fn, self.x0, jnp.asarray(blk.reshape((chunk,) + shape)))
                out[i:i + m] = np.asarray(r).reshape(chunk, n_res)[:m]
        return out

    def jvp(self, V: np.ndarray) -> np.ndarray:
        """V (b, n_in) -> J V^T as (b, n_out) (numpy, the operator's dtype)."""
        V = self._rows(V, self.n_in)
        self.n_jvp += V.shape[0]
        return self._batched(_jvp_many, V, self.in_shape, self.n_out)

    def vjp(self, U: np.ndarray) -> np.ndarray:
        """U (b, n_out) -> U J as (b, n_in) (numpy, the operator's dtype)."""
        U = self._rows(U, self.n_out)
        self.n_vjp += U.shape[0]
        return self._batched(_vjp_many, U, self.out_shape, self.n_in)

    def dense(self) -> np.ndarray:
        """The Jacobian (n_out, n_in): chunked ``jax.jacfwd`` (columns; when n_in <= n_out) or ``jax.jacrev``
        (rows), ``batch_size`` basis vectors per chunk made on the device. Memory: n_out * n_in values."""
        forward = self.n_in <= self.n_out
        n = self.n_in if forward else self.n_out
        size = min(self.batch_size, n)
        J = np.empty((self.n_out, self.n_in), dtype=self.np_dtype)
        with x64(self.x64):
            for i in range(0, n, size):
                blk = np.asarray(_jac_block(self.fn, self.x0, jnp.asarray(i, jnp.int32), size, forward))
                m = min(size, n - i)
                if forward:
                    J[:, i:i + m] = blk[:m].T
                else:
                    J[i:i + m] = blk[:m]
        if forward:
            self.n_jvp += n
        else:
            self.n_vjp += n
        return J


def _is_pytree_callable(fn: Any) -> bool:
    return isinstance(fn, (UnitChain, jax.tree_util.Partial))
