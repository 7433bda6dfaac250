"""The zoo's CIFAR ResNets as JAX pytrees: static structure (``NetSpec``) and arrays (``ResNetParams``),
translated from a torch ``Classifier``, a bare ``CifarResNet`` or either one's state dict.

Part of the JAX backend (``jax_backend``): the forward pass is in ``jax_net``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from robustbench_lab.core.zoo import BasicBlock, Bottleneck, CifarResNet, ShortcutA


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
