"""A JAX backend for the zoo's CIFAR ResNets: forward pass, unit functions, Jacobian operators, and a
torch-facing classifier that attacks can run on.

Why: JAX composes ``jvp``/``vjp`` with ``vmap`` and ``jit``, which makes the batched Jacobian products of the
linearization analysis (Rothauge et al., arXiv 1905.13386; docs/methods.md section 6) cheap, and gives an
independent implementation of the network to check the PyTorch numbers against (docs/jax_backend.md).

- ``params_from_torch(model)``: the weights of a ``Classifier`` around a ``CifarResNet`` (or a bare
  ``CifarResNet``, or either one's state dict) as a ``ResNetParams`` pytree of ``jnp`` arrays, including the
  normalization mean/std, BatchNorm running statistics and eps, and every unit's skip scale lambda.
- ``jax_forward(params, x)``: logits (B, K) for images x (B, C, H, W) in [0, 1]; NCHW throughout,
  ``lax.conv_general_dilated`` with torch's stride and symmetric zero padding, BatchNorm in eval mode, He et
  al.'s option-A shortcut (stride-2 subsampling, zero channel padding) or the bottleneck's projection.
- ``jax_hidden_states(params, x)``: ``"stem"`` and ``"s{stage}u{unit}"`` (1-based, after the post-addition
  ReLU), the names of ``robustbench_lab.linearization.units.hidden_states``.
- ``jax_unit_function`` / ``jax_stage_function``: a unit (or a stage) as a batched function of its input,
  with boundary ``"pre"`` (lambda * S(x) + F(x)) or ``"post"`` (relu of it), skip scale and residual-weight
  scale as arguments.
- ``JaxJacobian(fn, x0)``: the Jacobian operator of ``operators.JacobianOperator`` (numpy in and out:
  ``jvp``, ``vjp``, ``dense``) by vmapped, jitted ``jax.jvp`` / ``jax.vjp``. ``fn`` is a JAX function or one of
  the torch unit/stage functions of ``units`` (translated here, and checked against torch at ``x0``).
- ``JaxClassifier``: an ``nn.Module`` whose forward and backward (first and second order) run in JAX, with
  the ``num_classes`` and ``bounds`` of ``Classifier``, so every attack in ``attacks/`` runs on it unchanged.

Precision: float32 by default (convolutions and matmuls at ``Precision.HIGHEST``, so no TF32/bf16 passes on
accelerators). float64 operators run inside ``jax.enable_x64`` locally; the global JAX setting is untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.zoo import BasicBlock, Bottleneck, CifarResNet, ShortcutA

HIGHEST = jax.lax.Precision.HIGHEST
BOUNDARIES = ("pre", "post")
_DN = ("NCHW", "OIHW", "NCHW")    # torch's layouts: activations NCHW, conv weights (out, in, kh, kw)


# ------------------------------------------------------------------------------------------ static structure
@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """Static facts of one ``nn.Conv2d``: stride and symmetric zero padding (per spatial dim)."""

    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """Static structure of one residual unit.

    ``kind``: "basic" (conv3x3-BN-ReLU-conv3x3-BN) or "bottleneck" (1x1-3x3-1x1, BN and ReLU between);
    ``convs``: the residual branch's convolutions in order; ``shortcut``: "identity", "A" (subsample by
    ``stride``, zero-pad ``pad`` = (before, after) channels) or "projection" (conv ``proj`` + BN).
    """

    kind: str
    convs: tuple[ConvSpec, ...]
    shortcut: str
    stride: int = 1
    pad: tuple[int, int] = (0, 0)
    proj: ConvSpec | None = None


@dataclasses.dataclass(frozen=True)
class NetSpec:
    """Static structure of a CifarResNet: stem conv, stages of units, channel and class counts."""

    stem: ConvSpec
    stages: tuple[tuple[UnitSpec, ...], ...]
    in_channels: int
    num_classes: int

    def unit_names(self) -> list[str]:
        return [f"s{s + 1}u{u + 1}" for s, st in enumerate(self.stages) for u in range(len(st))]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class ResNetParams:
    """The weights of a CifarResNet classifier as a pytree: ``arrays`` (nested dicts/lists of ``jnp``
    arrays: the leaves) and ``spec`` (a hashable ``NetSpec``: static, part of the tree structure, so jitted
    functions are compiled once per architecture and input shape, not per set of weights).

    ``arrays``: ``mean``/``std`` (1, C, 1, 1); ``stem`` {conv, bn}; ``stages[s][u]`` {res: [{conv, bn}, ...],
    optional proj {conv, bn}, skip_scale ()}; ``fc`` {w (K, D), b (K,)}. A conv is {w (O, I, kh, kw),
    optional b}; a BatchNorm is {mean, var, weight, bias, eps} (running statistics: eval mode).
    """

    arrays: dict[str, Any]
    spec: NetSpec

    def tree_flatten(self) -> tuple[tuple[Any, ...], NetSpec]:
        return (self.arrays,), self.spec

    @classmethod
    def tree_unflatten(cls, spec: NetSpec, children: Sequence[Any]) -> "ResNetParams":
        return cls(children[0], spec)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def unit(self, stage: int, index: int) -> tuple[dict[str, Any], UnitSpec]:
        """Arrays and structure of unit (stage, index), both 0-based."""
        return self.arrays["stages"][stage][index], self.spec.stages[stage][index]


# ------------------------------------------------------------------------------------------ torch -> JAX
def _np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def _conv_from_torch(conv: nn.Module, where: str) -> tuple[dict[str, Any], ConvSpec]:
    if type(conv) is not nn.Conv2d:
        raise TypeError(f"{where}: expected nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros" \
            or isinstance(conv.padding, str):
        raise TypeError(f"{where}: only groups=1, dilation=1, numeric zero padding are translated "
                        f"(got groups={conv.groups}, dilation={conv.dilation}, padding={conv.padding!r}, "
                        f"padding_mode={conv.padding_mode!r})")
    arrays: dict[str, Any] = {"w": jnp.asarray(_np32(conv.weight))}
    if conv.bias is not None:
        arrays["b"] = jnp.asarray(_np32(conv.bias))
    st, pd = conv.stride, conv.padding
    return arrays, ConvSpec((int(st[0]), int(st[1])), (int(pd[0]), int(pd[1])))


def _bn_from_torch(bn: nn.Module, where: str) -> dict[str, Any]:
    if type(bn) is not nn.BatchNorm2d:
        raise TypeError(f"{where}: expected nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{where}: BatchNorm without running statistics (track_running_stats=False) uses batch "
                         "statistics even in eval mode; the JAX backend implements eval-mode BatchNorm only")
    c = bn.num_features
    return {
        "mean": jnp.asarray(_np32(bn.running_mean)),
        "var": jnp.asarray(_np32(bn.running_var)),
        "weight": jnp.asarray(_np32(bn.weight) if bn.weight is not None else np.ones(c, np.float32)),
        "bias": jnp.asarray(_np32(bn.bias) if bn.bias is not None else np.zeros(c, np.float32)),
        "eps": jnp.asarray(np.float32(bn.eps)),
    }


def _layer(conv: nn.Module, bn: nn.Module, where: str) -> tuple[dict[str, Any], ConvSpec]:
    c, spec = _conv_from_torch(conv, f"{where}.conv")
    return {"conv": c, "bn": _bn_from_torch(bn, f"{where}.bn")}, spec


def _check_relu(m: nn.Module, where: str) -> None:
    # A retrofitted activation (JumpReLU) or a hook-carrying subclass would be silently dropped here.
    if type(m) is not nn.ReLU:
        raise TypeError(f"{where} is {type(m).__name__}, not nn.ReLU: the JAX backend translates the zoo's plain "
                        "ReLU networks only (a model transform such as JumpReLU is not translated)")


def unit_from_torch(block: nn.Module, where: str = "block") -> tuple[dict[str, Any], UnitSpec]:
    """Arrays and structure of one ``BasicBlock`` / ``Bottleneck`` (its current weights and ``skip_scale``)."""
    if type(block) is BasicBlock:
        kind, pairs, relus = "basic", [("conv1", "bn1"), ("conv2", "bn2")], ["relu1", "post_relu"]
    elif type(block) is Bottleneck:
        kind = "bottleneck"
        pairs, relus = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")], ["relu1", "relu2", "post_relu"]
    else:
        raise TypeError(f"{where}: expected a BasicBlock or Bottleneck of robustbench_lab.core.zoo, got "
                        f"{type(block).__name__}")
    for r in relus:
        _check_relu(getattr(block, r), f"{where}.{r}")
    res, convs = [], []
    for c, b in pairs:
        layer, spec = _layer(getattr(block, c), getattr(block, b), f"{where}.{c}")
        res.append(layer)
        convs.append(spec)
    arrays: dict[str, Any] = {"res": res, "skip_scale": jnp.asarray(np.float32(block.skip_scale))}
    sc = block.shortcut
    if type(sc) is nn.Identity:
        spec_u = UnitSpec(kind, tuple(convs), "identity")
    elif type(sc) is ShortcutA:
        spec_u = UnitSpec(kind, tuple(convs), "A", stride=int(sc.stride), pad=(sc.pad // 2, sc.pad - sc.pad // 2))
    elif type(sc) is nn.Sequential and len(sc) == 2:
        arrays["proj"], pspec = _layer(sc[0], sc[1], f"{where}.shortcut")
        spec_u = UnitSpec(kind, tuple(convs), "projection", proj=pspec)
    else:
        raise TypeError(f"{where}.shortcut: expected Identity, ShortcutA or Sequential(conv, bn), got {sc}")
    return arrays, spec_u


def _resnet_from_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[CifarResNet, torch.Tensor | None,
                                                                      torch.Tensor | None]:
    """A CifarResNet whose depth, block, width, channels and classes are read off the state dict's keys and
    shapes, loaded strictly; plus the Classifier's normalization buffers when the dict has them."""
    prefix = "net." if "net.conv1.weight" in sd else ""
    if prefix + "conv1.weight" not in sd or prefix + "fc.weight" not in sd:
        raise ValueError("not the state dict of a CifarResNet (or a Classifier around one): no conv1.weight / "
                         "fc.weight")
    width, in_ch = (int(v) for v in sd[prefix + "conv1.weight"].shape[:2])
    num_classes = int(sd[prefix + "fc.weight"].shape[0])
    counts = []
    for s in range(4):
        n = 0
        while f"{prefix}stages.{s}.{n}.conv1.weight" in sd:
            n += 1
        counts.append(n)
    if counts[3] or not (counts[0] == counts[1] == counts[2] > 0):
        raise ValueError(f"not a CifarResNet state dict: units per stage {counts[:3]} (3 equal non-empty stages "
                         "expected)")
    n = counts[0]
    block = "bottleneck" if f"{prefix}stages.0.0.conv3.weight" in sd else "basic"
    depth = 9 * n + 2 if block == "bottleneck" else 6 * n + 2
    net = CifarResNet(depth=depth, in_channels=in_ch, num_classes=num_classes, block=block, width=width)
    own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    extra = sorted(k for k in sd if not k.startswith(prefix) and k not in ("normalize.mean", "normalize.std"))
    if extra:
        raise ValueError(f"unexpected keys in the state dict: {extra[:5]}")
    net.load_state_dict(own, strict=True)
    return net.eval(), sd.get("normalize.mean"), sd.get("normalize.std")


def params_from_torch(model: nn.Module | Mapping[str, torch.Tensor], *, mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None) -> ResNetParams:
    """The weights of ``model`` as a ``ResNetParams`` pytree (float32 ``jnp`` arrays, copied).

    ``model``: a ``Classifier`` around a ``CifarResNet`` (normalization taken from its buffers), a bare
    ``CifarResNet`` (``mean``/``std`` given here, default 0/1: no normalization), or the state dict of either
    (architecture read off its keys and shapes, loaded strictly; BatchNorm eps is then torch's default 1e-5
    and every skip scale 1, as the zoo builds them). From a module the BatchNorm eps and each block's current
    ``skip_scale`` are taken as they are. BatchNorm always uses its running statistics (eval mode), whatever
    mode the module is in.
    """
    m_buf = s_buf = None
    if isinstance(model, Mapping):
        net, m_buf, s_buf = _resnet_from_state_dict(model)
    else:
        net = getattr(model, "net", model)
        norm = getattr(model, "normalize", None)
        if net is not model and norm is not None:
            m_buf, s_buf = norm.mean, norm.std
    if type(net) is not CifarResNet:
        raise TypeError(f"params_from_torch needs a CifarResNet (or a Classifier around one); got "
                        f"{type(net).__name__}")
    c = int(net.conv1.in_channels)
    if m_buf is not None:
        mean_a, std_a = _np32(m_buf).reshape(1, -1, 1, 1), _np32(s_buf).reshape(1, -1, 1, 1)
    else:
        mean_a = np.asarray(mean if mean is not None else [0.0] * c, np.float32).reshape(1, -1, 1, 1)
        std_a = np.asarray(std if std is not None else [1.0] * c, np.float32).reshape(1, -1, 1, 1)
    if mean_a.shape[1] not in (1, c) or std_a.shape[1] not in (1, c):
        raise ValueError(f"normalization has {mean_a.shape[1]} / {std_a.shape[1]} channels; the network takes {c}")
    _check_relu(net.relu, "net.relu")
    stem, stem_spec = _layer(net.conv1, net.bn1, "net.conv1")
    if type(net.pool) is not nn.AdaptiveAvgPool2d or net.pool.output_size not in (1, (1, 1)):
        raise TypeError("net.pool: expected AdaptiveAvgPool2d(1)")
    stages, specs = [], []
    for s, stage in enumerate(net.stages):
        arrs, sps = [], []
        for u, block in enumerate(stage):
            a, sp = unit_from_torch(block, f"net.stages.{s}.{u}")
            arrs.append(a)
            sps.append(sp)
        stages.append(arrs)
        specs.append(tuple(sps))
    arrays = {"mean": jnp.asarray(mean_a), "std": jnp.asarray(std_a), "stem": stem, "stages": stages,
              "fc": {"w": jnp.asarray(_np32(net.fc.weight)), "b": jnp.asarray(_np32(net.fc.bias))}}
    spec = NetSpec(stem_spec, tuple(specs), c, int(net.fc.out_features))
    return ResNetParams(arrays, spec)


# ------------------------------------------------------------------------------------------ the forward pass
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


def _is_torch_function(fn: Any) -> bool:
    return isinstance(fn, nn.Module) or (hasattr(fn, "modules") and isinstance(getattr(fn, "modules"), list)
                                         and all(isinstance(m, nn.Module) for m in fn.modules))


# ------------------------------------------------------------------------------------------ Jacobian operator
def _np_dtype(dtype: Any) -> type:
    if dtype is None:
        return np.float32
    name = str(dtype).replace("torch.", "")
    if name in ("float32", "float"):
        return np.float32
    if name in ("float64", "double"):
        return np.float64
    try:
        name = str(np.dtype(dtype))
    except TypeError:
        name = ""
    if name in ("float32", "float64"):
        return np.float32 if name == "float32" else np.float64
    raise ConfigError("linearize.dtype", dtype, ["float32", "float64"])


def _x64(enabled: bool) -> contextlib.AbstractContextManager:
    # A local switch: float64 products for one operator without changing the process-wide JAX default.
    return jax.enable_x64(True) if enabled else contextlib.nullcontext()


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
        self.np_dtype = _np_dtype(dtype)
        self.x64 = self.np_dtype == np.float64
        self.batch_size = int(batch_size)
        torch_fn = fn if _is_torch_function(fn) else None
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
        with _x64(self.x64):
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
        with _x64(self.x64):
            for i in range(0, b, chunk):
                blk = A[i:i + chunk]
                m = blk.shape[0]
                if m < chunk:       # pad the tail to the compiled chunk size
                    blk = np.concatenate([blk, np.zeros((chunk - m, blk.shape[1]), blk.dtype)])
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
        with _x64(self.x64):
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


# ------------------------------------------------------------------------------------------ torch-facing model
def _bucket(n: int) -> int:
    """Next power of two >= n: attacks shrink their active batch every step; padding to a few bucket sizes
    bounds the number of compilations (examples are independent, padded rows are zeros and are dropped)."""
    return 1 << max(0, (n - 1).bit_length())


def _pad_rows(a: np.ndarray, m: int) -> np.ndarray:
    if a.shape[0] == m:
        return a
    return np.concatenate([a, np.zeros((m - a.shape[0],) + a.shape[1:], a.dtype)])


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
        return jnp.asarray(_pad_rows(t.detach().to("cpu", torch.float32).contiguous().numpy(), m))

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


@contextlib.contextmanager
def x64() -> Iterator[None]:
    """``jax.enable_x64`` for a block of code (float64 JAX arrays), restoring the previous setting."""
    with jax.enable_x64(True):
        yield
