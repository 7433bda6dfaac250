"""The forward pass of a translated ResNet in JAX (NCHW, torch's conv padding, eval-mode BatchNorm), its
hidden states, and its units and stages as batched JAX functions (``UnitChain``), also translated from the
torch unit/stage functions of ``units``.

Part of the JAX backend (``jax_backend``). Convolutions and matmuls run at ``Precision.HIGHEST``, so no
TF32/bf16 passes on accelerators.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from torch import nn

from robustbench_lab.core.errors import ConfigError
from robustbench_lab.linearization.jax_params import ConvSpec, ResNetParams, UnitSpec, unit_from_torch
from robustbench_lab.linearization.options import BOUNDARIES

HIGHEST = jax.lax.Precision.HIGHEST
_DN = ("NCHW", "OIHW", "NCHW")    # torch's layouts: activations NCHW, conv weights (out, in, kh, kw)


def _conv(p: Mapping[str, Any], spec: ConvSpec, x: jax.Array, scale: Any = None) -> jax.Array:
    w = p["w"] if scale is None else p["w"] * scale
    # Explicit symmetric padding and window origin at -padding: exactly torch's output size
    # floor((H + 2p - k) / s) + 1 and sampling grid, also for odd sizes with stride 2.
    y = jax.lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=spec.stride,
                                     padding=[(spec.padding[0],) * 2, (spec.padding[1],) * 2],
                                     dimension_numbers=_DN, precision=HIGHEST)
    if "b" in p:
        y = y + p["b"].astype(x.dtype)[None, :, None, None]
    return y


def _bn(p: Mapping[str, Any], x: jax.Array) -> jax.Array:
    # Eval mode: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, as alpha * x + beta
    # (the form of torch's CPU kernel).
    alpha = p["weight"] * jax.lax.rsqrt(p["var"] + p["eps"])
    beta = p["bias"] - p["mean"] * alpha
    return x * alpha.astype(x.dtype)[None, :, None, None] + beta.astype(x.dtype)[None, :, None, None]


def _relu(x: jax.Array) -> jax.Array:
    # jax.nn.relu has derivative 0 at 0, as torch's relu (jnp.maximum would split ties 1/2).
    return jax.nn.relu(x)


def _shortcut(a: Mapping[str, Any], spec: UnitSpec, x: jax.Array) -> jax.Array:
    if spec.shortcut == "identity":
        return x
    if spec.shortcut == "A":
        h = x[:, :, ::spec.stride, ::spec.stride]
        return jnp.pad(h, ((0, 0), spec.pad, (0, 0), (0, 0)))
    assert spec.proj is not None
    return _bn(a["proj"]["bn"], _conv(a["proj"]["conv"], spec.proj, x))


def _residual(a: Mapping[str, Any], spec: UnitSpec, x: jax.Array, weight_scale: Any = None) -> jax.Array:
    h = x
    last = len(spec.convs) - 1
    for i, (layer, cs) in enumerate(zip(a["res"], spec.convs)):
        h = _bn(layer["bn"], _conv(layer["conv"], cs, h, weight_scale))
        if i < last:
            h = _relu(h)
    return h


def _unit(a: Mapping[str, Any], spec: UnitSpec, x: jax.Array, boundary: str = "post", skip_scale: Any = None,
          weight_scale: Any = None) -> jax.Array:
    lam = a["skip_scale"] if skip_scale is None else skip_scale
    pre = jnp.asarray(lam, x.dtype) * _shortcut(a, spec, x) + _residual(a, spec, x, weight_scale)
    return pre if boundary == "pre" else _relu(pre)


def _normalize(params: ResNetParams, x: jax.Array) -> jax.Array:
    a = params.arrays
    return (x - a["mean"].astype(x.dtype)) / a["std"].astype(x.dtype)


def _stem(params: ResNetParams, xn: jax.Array) -> jax.Array:
    a = params.arrays["stem"]
    return _relu(_bn(a["bn"], _conv(a["conv"], params.spec.stem, xn)))


def _head(params: ResNetParams, h: jax.Array) -> jax.Array:
    fc = params.arrays["fc"]
    pooled = jnp.mean(h, axis=(2, 3))           # AdaptiveAvgPool2d(1) + flatten
    return jnp.dot(pooled, fc["w"].astype(h.dtype).T, precision=HIGHEST) + fc["b"].astype(h.dtype)


def _check_x(params: ResNetParams, x: jax.Array) -> None:
    if x.ndim != 4 or x.shape[1] != params.spec.in_channels:
        raise ValueError(f"expected images (B, {params.spec.in_channels}, H, W), got shape {tuple(x.shape)}")


@jax.jit
def _hidden_states(params: ResNetParams, x: jax.Array) -> dict[str, jax.Array]:
    x = jnp.asarray(x)
    _check_x(params, x)
    h = _stem(params, _normalize(params, x))
    out = {"stem": h}
    for s, stage in enumerate(params.spec.stages):
        for u, spec in enumerate(stage):
            h = _unit(params.arrays["stages"][s][u], spec, h)
            out[f"s{s + 1}u{u + 1}"] = h
    return out


def jax_hidden_states(params: ResNetParams, x: jax.Array) -> dict[str, jax.Array]:
    """States for images ``x`` (B, C, H, W) in [0, 1]: ``"stem"`` then ``"s{s}u{u}"`` (1-based) for every unit,
    after its post-addition ReLU, in forward order (the names of ``units.hidden_states``). Jitted."""
    out = _hidden_states(params, x)
    return {k: out[k] for k in ["stem"] + params.spec.unit_names()}   # jit returns dicts key-sorted


@jax.jit
def jax_forward(params: ResNetParams, x: jax.Array) -> jax.Array:
    """Logits (B, K) for images ``x`` (B, C, H, W) in [0, 1] (normalization applied here, as ``Classifier``).
    Jitted: compiled once per architecture and input shape."""
    x = jnp.asarray(x)
    _check_x(params, x)
    h = _stem(params, _normalize(params, x))
    for s, stage in enumerate(params.spec.stages):
        for u, spec in enumerate(stage):
            h = _unit(params.arrays["stages"][s][u], spec, h)
    return _head(params, h)


# ------------------------------------------------------------------------------------------ unit functions
@jax.tree_util.register_pytree_node_class
class UnitChain:
    """Residual units applied in order to a batch (B, C, H, W): every unit but the last ends with its ReLU,
    the last with ``boundary`` ("pre": lambda * S(x) + F(x); "post": relu of it). One unit is a unit
    function, all units of a stage a stage function.

    A pytree: the arrays, skip scales and weight scales are leaves (changing lambda or the weight scale does
    not recompile a jitted product); structure and boundary are static.
    """

    def __init__(self, units: Sequence[Mapping[str, Any]], specs: Sequence[UnitSpec], boundary: str,
                 weight_scale: Any = 1.0) -> None:
        if boundary not in BOUNDARIES:
            raise ConfigError("linearize.boundary", boundary, BOUNDARIES,
                              "pre: before the post-addition ReLU; post: after it")
        if len(units) != len(specs) or not units:
            raise ValueError("a unit chain needs one spec per unit and at least one unit")
        self.units = [dict(u) for u in units]
        self.specs = tuple(specs)
        self.boundary = boundary
        self.weight_scale = weight_scale

    def __call__(self, x: jax.Array) -> jax.Array:
        last = len(self.units) - 1
        for i, (a, spec) in enumerate(zip(self.units, self.specs)):
            ws = self.weight_scale if i == last else None
            x = _unit(a, spec, x, self.boundary if i == last else "post", None, ws)
        return x

    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return (self.units, self.weight_scale), (self.specs, self.boundary)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: Sequence[Any]) -> "UnitChain":
        obj = cls.__new__(cls)
        obj.units, obj.weight_scale = children
        obj.specs, obj.boundary = aux
        return obj

    def __repr__(self) -> str:
        kinds = "+".join(sorted({s.kind for s in self.specs}))
        return f"UnitChain({len(self.specs)} {kinds} unit(s), boundary {self.boundary})"


_NAME = re.compile(r"^s(\d+)u(\d+)$")


def _resolve(params: ResNetParams, stage: int | str, index: int | None) -> tuple[int, int]:
    names = params.spec.unit_names()
    if isinstance(stage, str):
        m = _NAME.match(stage)
        if index is not None or m is None or stage not in names:
            raise ConfigError("linearize.unit", stage, names, "a unit name (1-based) with no index")
        return int(m.group(1)) - 1, int(m.group(2)) - 1
    if index is None or not (0 <= stage < len(params.spec.stages)) or \
            not (0 <= index < len(params.spec.stages[stage])):
        raise ConfigError("linearize.unit", (stage, index), names,
                          "0-based (stage, index) as in units.UnitRef, or a name such as 's1u1'")
    return int(stage), int(index)


def jax_unit_function(params: ResNetParams, stage: int | str, index: int | None = None, boundary: str = "pre",
                      skip_scale: float | None = None, weight_scale: float = 1.0) -> UnitChain:
    """Residual unit as a batched JAX function of its input (B, C, H, W) -> (B, C', H', W').

    The unit: ``stage``, ``index`` 0-based (the fields of ``units.UnitRef``), or ``stage`` a name such as
    ``"s3u2"`` (1-based) and no index. ``boundary="pre"``: lambda * S(x) + F(x) without the post-addition
    ReLU; ``"post"``: relu of it. ``skip_scale``: lambda (None: the unit's own, 1 for a trained network);
    ``weight_scale``: multiplies every conv weight of the residual branch F (BatchNorm and the shortcut
    untouched), as ``units.scaled`` does on the torch side.
    """
    s, u = _resolve(params, stage, index)
    a, spec = params.unit(s, u)
    a = dict(a)
    if skip_scale is not None:
        a["skip_scale"] = jnp.asarray(np.float32(skip_scale))
    return UnitChain([a], [spec], boundary, jnp.asarray(np.float32(weight_scale)))


def jax_stage_function(params: ResNetParams, stage: int, boundary: str = "pre") -> UnitChain:
    """All units of ``stage`` (0-based, as ``units.stage_function``) composed, as a batched JAX function of
    the stage's input; ``boundary`` applies to the last unit only."""
    if not (isinstance(stage, int) and 0 <= stage < len(params.spec.stages)):
        raise ConfigError("linearize.stage", stage, list(range(len(params.spec.stages))), "0-based stage index")
    return UnitChain(params.arrays["stages"][stage], params.spec.stages[stage], boundary)


def jax_unit_input(params: ResNetParams, x: jax.Array, stage: int | str, index: int | None = None) -> jax.Array:
    """The input (B, C, H, W) of a unit (as ``jax_unit_function`` names it) for images ``x`` in [0, 1]."""
    s, u = _resolve(params, stage, index)
    names = params.spec.unit_names()
    pos = names.index(f"s{s + 1}u{u + 1}")
    if pos == 0:
        return jax_hidden_states(params, x)["stem"]
    return jax_hidden_states(params, x)[names[pos - 1]]


def _boundary_of(fn: Any) -> str | None:
    b = getattr(fn, "boundary", None)
    return b if b in BOUNDARIES else None


def from_torch_function(fn: Any) -> UnitChain:
    """The JAX translation of a torch unit or stage function: a ``units.ModuleFunction`` (from
    ``unit_function`` / ``stage_function``: blocks in ``fn.modules``, boundary in its description), a single
    ``BasicBlock`` / ``Bottleneck`` (the module's forward: boundary post) or an ``nn.Sequential`` of them.
    Weights and skip scales are copied as they are now (inside ``units.scaled`` the scaled ones)."""
    if isinstance(fn, nn.Module):
        blocks = list(fn) if isinstance(fn, nn.Sequential) else [fn]
        boundary: str | None = "post"
    else:
        blocks = list(getattr(fn, "modules", []))
        boundary = _boundary_of(fn)
    if not blocks or boundary is None:
        raise TypeError(f"cannot translate {fn!r} to JAX: pass a JAX function, a units.unit_function / "
                        "stage_function, or a BasicBlock / Bottleneck (or a Sequential of them)")
    pairs = [unit_from_torch(b, f"unit {i}") for i, b in enumerate(blocks)]
    return UnitChain([p[0] for p in pairs], [p[1] for p in pairs], boundary)


def is_torch_function(fn: Any) -> bool:
    """True for what ``from_torch_function`` translates: a module, or a function of ``units`` over modules."""
    return isinstance(fn, nn.Module) or (hasattr(fn, "modules") and isinstance(getattr(fn, "modules"), list)
                                         and all(isinstance(m, nn.Module) for m in fn.modules))
