"""Residual units of a CIFAR ResNet as functions: naming, boundaries, scaling, hidden states.

Rothauge et al. (arXiv 1905.13386; docs/methods.md section 6) linearize a ResNet at its residual units.
A unit with input x is

* boundary ``"pre"``:  u(x) = lambda * S(x) + F(x), the unit *before* its post-addition ReLU, so that its
  Jacobian is J = lambda * S + dF (S = I for an identity shortcut);
* boundary ``"post"``: u(x) = relu(lambda * S(x) + F(x)), the module as the network runs it, so that
  J = D (lambda * S + dF) with D the 0/1 diagonal of the active ReLUs (rows of inactive outputs are zero).

F is the residual branch (conv-BN-ReLU-conv-BN, or the bottleneck's 1x1-3x3-1x1), lambda the block's
``skip_scale``. BatchNorm always runs in eval mode (running statistics), which makes F piecewise affine.
Every state here is a batch (B, C, H, W); a unit's input is the network's state after the previous unit
(after its ReLU), or the stem's output for the first unit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.zoo import BasicBlock, Bottleneck, CifarResNet
from robustbench_lab.linearization.options import BOUNDARIES

_RESNETS = "a CIFAR ResNet with residual units (resnet20/32/44/56/110, resnet56_bottleneck)"


@dataclasses.dataclass(frozen=True)
class UnitRef:
    """One residual unit: 0-based ``stage`` and ``index`` within the stage; ``name`` is ``f"s{stage+1}u{index+1}"``
    (the paper's and the configs' spelling, 1-based)."""

    stage: int
    index: int
    name: str

    @staticmethod
    def of(stage: int, index: int) -> "UnitRef":
        return UnitRef(int(stage), int(index), f"s{int(stage) + 1}u{int(index) + 1}")


def as_resnet(model: nn.Module, key: str = "model.name") -> CifarResNet:
    """The bare CifarResNet of ``model`` (a CifarResNet, or a Classifier around one); ConfigError otherwise."""
    net = getattr(model, "net", model)
    if not isinstance(net, CifarResNet):
        raise ConfigError(key, getattr(model, "name", "") or type(net).__name__, _RESNETS,
                          f"linearization needs units with skip_scale/residual(); got {type(net).__name__}")
    return net


def list_units(net: nn.Module) -> list[UnitRef]:
    """Every residual unit of ``net`` (CifarResNet or a Classifier around one), in forward order."""
    resnet = as_resnet(net)
    return [UnitRef.of(s, i) for s, stage in enumerate(resnet.stages) for i in range(len(stage))]


def find_unit(net: nn.Module, name: str, key: str = "linearize.unit") -> UnitRef:
    """The unit called ``name`` (e.g. ``"s3u2"``); ConfigError naming ``key`` and the valid names otherwise."""
    units = list_units(net)
    for u in units:
        if u.name == name:
            return u
    raise ConfigError(key, name, [u.name for u in units])


def get_block(net: nn.Module, ref: UnitRef) -> nn.Module:
    """The block (BasicBlock or Bottleneck) of unit ``ref``."""
    resnet = as_resnet(net)
    if not (0 <= ref.stage < len(resnet.stages)) or not (0 <= ref.index < len(resnet.stages[ref.stage])):
        raise ConfigError("linearize.unit", ref.name, [u.name for u in list_units(resnet)])
    return resnet.stages[ref.stage][ref.index]


def check_boundary(boundary: str) -> str:
    if boundary not in BOUNDARIES:
        raise ConfigError("linearize.boundary", boundary, BOUNDARIES,
                          "pre: before the post-addition ReLU (J = lambda*S + dF); post: after it (J = D(lambda*S + dF))")
    return boundary


def _check_block(block: nn.Module) -> nn.Module:
    if not isinstance(block, (BasicBlock, Bottleneck)):
        raise ConfigError("linearize.unit", type(block).__name__, ["BasicBlock", "Bottleneck"],
                          "a residual unit of a CIFAR ResNet (robustbench_lab.core.zoo)")
    return block


def has_identity_shortcut(block: nn.Module) -> bool:
    """True when S = I (same shape in and out): the exact low-rank reduction applies."""
    return isinstance(_check_block(block).shortcut, nn.Identity)


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics) for the call, restoring the caller's modes afterwards."""
    modes = [(m, m.training) for mod in modules for m in mod.modules()]
    if not any(t for _, t in modes):     # the common case: nothing to switch
        yield
        return
    for m, _ in modes:
        m.train(False)
    try:
        yield
    finally:
        for m, t in modes:
            m.train(t)


class ModuleFunction:
    """A batched function (B, ...) -> (B, ...) of some modules, evaluated in eval mode.

    ``cast(dtype, device)`` returns the same function on a copy of the modules in another dtype/device
    (the Jacobian operators use it for float64 products on float32 weights); ``modules`` are the modules
    whose parameters the function uses.
    """

    def __init__(self, modules: Sequence[nn.Module], body: Callable[..., torch.Tensor], description: str,
                 boundary: str | None = None) -> None:
        self.modules = list(modules)
        self._body = body
        self.description = description
        self.boundary = boundary      # of the last unit; other backends (jax_backend) translate by it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with _eval_mode(self.modules):
            return self._body(self.modules, x)

    def param_dtype(self) -> torch.dtype | None:
        for m in self.modules:
            for p in m.parameters():
                return p.dtype
        return None

    def param_device(self) -> torch.device | None:
        for m in self.modules:
            for p in m.parameters():
                return p.device
        return None

    def cast(self, dtype: torch.dtype, device: torch.device | None = None) -> "ModuleFunction":
        """This function on deep copies of the modules in ``dtype`` (and on ``device``); skip scales kept."""
        mods = [copy.deepcopy(m).to(dtype=dtype, device=device) for m in self.modules]
        return ModuleFunction(mods, self._body, self.description, self.boundary)

    def __repr__(self) -> str:
        return f"ModuleFunction({self.description})"


def _unit_body(boundary: str) -> Callable[[list[nn.Module], torch.Tensor], torch.Tensor]:
    def body(mods: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        (block,) = mods
        return block.pre_activation(x) if boundary == "pre" else block(x)
    return body


def unit_function(block: nn.Module, boundary: str = "pre") -> ModuleFunction:
    """The unit as a batched function (B, C, H, W) -> (B, C', H', W') with BatchNorm in eval mode.

    ``"pre"``: lambda * shortcut(x) + F(x); ``"post"``: relu of that (the module itself). The block's
    current ``skip_scale`` and weights are used at each call (so ``scaled`` applies to it).
    """
    check_boundary(boundary)
    _check_block(block)
    return ModuleFunction([block], _unit_body(boundary), f"{type(block).__name__}, boundary {boundary}", boundary)


def _stage_body(boundary: str) -> Callable[[list[nn.Module], torch.Tensor], torch.Tensor]:
    def body(mods: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        for b in mods[:-1]:
            x = b(x)
        last = mods[-1]
        return last.pre_activation(x) if boundary == "pre" else last(x)
    return body


def stage_function(net: nn.Module, stage: int, boundary: str = "pre") -> ModuleFunction:
    """All units of ``stage`` (0-based) composed, as a batched function of the stage's input; ``boundary``
    applies to the last unit only (inner units always end with their ReLU, as in the network)."""
    check_boundary(boundary)
    resnet = as_resnet(net)
    if not isinstance(stage, int) or not (0 <= stage < len(resnet.stages)):
        raise ConfigError("linearize.stage", stage, list(range(len(resnet.stages))), "0-based stage index")
    blocks = list(resnet.stages[stage])
    return ModuleFunction(blocks, _stage_body(boundary), f"stage {stage + 1} ({len(blocks)} units), boundary {boundary}",
                          boundary)


@contextlib.contextmanager
def scaled(block: nn.Module, skip_scale: float | None = 1.0, weight_scale: float = 1.0) -> Iterator[nn.Module]:
    """Temporarily set the block's skip scale lambda and multiply every conv weight of its residual branch
    by ``weight_scale`` (BatchNorm and the shortcut untouched). The exact previous values are restored on
    exit (saved copies, not a division), also on error.

    ``skip_scale=None`` keeps the current lambda (useful when nesting inside another ``scaled``).
    """
    _check_block(block)
    convs = [m for name, m in block.named_children() if name.startswith("conv") and isinstance(m, nn.Conv2d)]
    saved = [c.weight.detach().clone() for c in convs]
    old_lambda = block.skip_scale
    try:
        if skip_scale is not None:
            block.skip_scale = float(skip_scale)
        if weight_scale != 1.0:
            with torch.no_grad():
                for c in convs:
                    c.weight.mul_(float(weight_scale))
        yield block
    finally:
        block.skip_scale = old_lambda
        with torch.no_grad():
            for c, w in zip(convs, saved):
                c.weight.copy_(w)


def _net_input(model: nn.Module, x: torch.Tensor, normalized_input: bool) -> tuple[CifarResNet, torch.Tensor]:
    resnet = as_resnet(model)
    normalize = getattr(model, "normalize", None)
    if normalize is not None and not normalized_input and model is not resnet:
        x = normalize(x)
    return resnet, x


def hidden_states(model: nn.Module, x: torch.Tensor, normalized_input: bool = False) -> dict[str, torch.Tensor]:
    """The network's states for images ``x`` (B, C, H, W): ``"stem"`` then every unit's output (after its
    post-addition ReLU, as the network computes it), keyed by unit name, in forward order.

    ``model``: a Classifier (``x`` in [0, 1], normalized here unless ``normalized_input``) or a bare
    CifarResNet (``x`` is the network's input as is). Eval mode; gradients flow if the caller enables them.
    """
    resnet, h = _net_input(model, x, normalized_input)
    out: dict[str, torch.Tensor] = {}
    with _eval_mode([resnet]):
        h = resnet.stem(h)
        out["stem"] = h
        for s, stage in enumerate(resnet.stages):
            for i, block in enumerate(stage):
                h = block(h)
                out[f"s{s + 1}u{i + 1}"] = h
    return out


def unit_input(model: nn.Module, x: torch.Tensor, ref: UnitRef, normalized_input: bool = False) -> torch.Tensor:
    """The actual input (B, C, H, W) of unit ``ref`` for images ``x`` (in [0, 1] for a Classifier), i.e. the
    state after the previous unit (or the stem). Runs the network only up to that unit; eval mode."""
    resnet, h = _net_input(model, x, normalized_input)
    get_block(resnet, ref)   # validates ref
    with _eval_mode([resnet]):
        h = resnet.stem(h)
        for s in range(ref.stage + 1):
            stage = resnet.stages[s]
            n = ref.index if s == ref.stage else len(stage)
            for i in range(n):
                h = stage[i](h)
    return h


def describe(block: nn.Module) -> dict[str, Any]:
    """Facts about a block used in records: type, identity shortcut, channels, skip scale."""
    _check_block(block)
    return {"block": type(block).__name__, "identity_shortcut": has_identity_shortcut(block),
            "in_channels": block.conv1.in_channels, "skip_scale": float(block.skip_scale)}
