"""Model zoo: architectures and a registry of model cards.

Every activation is an ``nn.ReLU`` module (never functional relu), one module per use, so a defense can
retrofit each of them (JumpReLU) and analyses can hook each of them. Architectures adapt to the dataset's
channel count and image size (global average pooling before the classifier).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F

from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.model import Classifier


# ----------------------------------------------------------------------------------------------- small nets
class SmallCNN(nn.Module):
    """A small fast CNN: two conv blocks and a two-layer head. For tests and quick runs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class LeNetLike(nn.Module):
    """A LeNet-like MNIST network: the architecture of Madry et al.'s MNIST challenge model (two 5x5 conv/pool
    stages of 32 and 64 channels, FC 1024), the kind of small network the JumpReLU paper evaluates on MNIST."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 1024), nn.ReLU(),
                                        nn.Linear(1024, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class LinearClassifier(nn.Module):
    """A linear classifier on flattened inputs: minimal adversarial perturbations are known in closed form."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(x))


# ------------------------------------------------------------------------------------------- CIFAR ResNets
class ShortcutA(nn.Module):
    """He et al.'s CIFAR option-A shortcut: stride-2 subsampling and zero-padding of new channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """u(x) = relu(skip_scale * shortcut(x) + F(x)); F = conv-bn-relu-conv-bn.

    ``skip_scale`` (lambda) is 1 for the trained network; the linearization analysis varies it.
    ``post_relu`` is the post-addition activation, a module so that a unit boundary can be placed before it.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(in_planes, planes, stride)
        self.post_relu = nn.ReLU()
        self.skip_scale = 1.0

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip_scale * self.shortcut(x) + self.residual(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_relu(self.pre_activation(x))


class Bottleneck(nn.Module):
    """Bottleneck unit: 1x1 reduce, 3x3, 1x1 expand (x4), projection shortcut where shapes change."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        self.post_relu = nn.ReLU()
        self.skip_scale = 1.0

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(h)))
        return self.bn3(self.conv3(h))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip_scale * self.shortcut(x) + self.residual(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_relu(self.pre_activation(x))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet: 3 stages of n units (16, 32, 64 planes); depth = 6n + 2 (basic)."""

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10,
                 block: str = "basic", width: int = 16) -> None:
        super().__init__()
        if block == "basic":
            if (depth - 2) % 6:
                raise ConfigError("model.depth", depth, "6n+2 for basic blocks (20, 32, 44, 56, 110)")
            n, blk = (depth - 2) // 6, BasicBlock
        elif block == "bottleneck":
            if (depth - 2) % 9:
                raise ConfigError("model.depth", depth, "9n+2 for bottleneck blocks (29, 47, 56, 110, 164)")
            n, blk = (depth - 2) // 9, Bottleneck
        else:
            raise ConfigError("model.block", block, ["basic", "bottleneck"])
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        in_planes = width
        stages = []
        for i, planes in enumerate([width, 2 * width, 4 * width]):
            units = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                units.append(blk(in_planes, planes, stride))
                in_planes = planes * blk.expansion
            stages.append(nn.Sequential(*units))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(h), 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for s in self.stages:
            h = s(h)
        return torch.flatten(self.pool(h), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class PreActFreeBasic(nn.Module):
    """ResNet-18 basic block (projection shortcut), as in the CIFAR-stem ResNet-18 used by ACL."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.post_relu = nn.ReLU()
        self.skip_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.post_relu(self.skip_scale * self.shortcut(x) + h)


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool): 4 stages of 2 units, 64..512 planes."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        in_planes, stages = width, []
        for i, mult in enumerate([1, 2, 4, 8]):
            planes = width * mult
            units = [PreActFreeBasic(in_planes, planes, 1 if i == 0 else 2), PreActFreeBasic(planes, planes, 1)]
            in_planes = planes
            stages.append(nn.Sequential(*units))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        for s in self.stages:
            h = s(h)
        return torch.flatten(self.pool(h), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# --------------------------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What is needed to build and use a model correctly.

    ``builder(in_channels, num_classes, image_size, **kwargs)`` returns the bare network. ``mean``/``std``
    of ``None`` mean "the dataset's statistics"; ``input_shape`` of ``None`` means "adapts to the dataset".
    ``stages``: names (in the bare network's ``named_modules()``) of the modules whose outputs end its
    successive stages, lowest first; empty for a network without stages.
    """

    name: str
    builder: Callable[..., nn.Module]
    description: str
    input_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    bounds: tuple[float, float] = (0.0, 1.0)
    default_recipe: str = "default"
    stages: tuple[str, ...] = ()


_REGISTRY: dict[str, ModelCard] = {}


def register(card: ModelCard) -> ModelCard:
    if card.name in _REGISTRY:
        raise ValueError(f"model card {card.name!r} is already registered")
    _REGISTRY[card.name] = card
    return card


def get_card(name: str, key: str = "model.name") -> ModelCard:
    if name not in _REGISTRY:
        raise ConfigError(key, name, sorted(_REGISTRY))
    return _REGISTRY[name]


def available() -> list[str]:
    return sorted(_REGISTRY)


# the pooling layers of the two conv blocks, then the hidden FC layer's activation (SmallCNN, LeNetLike)
CONV_STAGES = ("features.2", "features.5", "classifier.2")
RESNET_STAGES = ("stages.0", "stages.1", "stages.2")


def _resnet(depth: int, block: str = "basic") -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, image_size: tuple[int, int], **kw: Any) -> nn.Module:
        return CifarResNet(depth=kw.pop("depth", depth), in_channels=in_channels, num_classes=num_classes,
                           block=kw.pop("block", block), **kw)
    return build


register(ModelCard("small_cnn", lambda in_channels, num_classes, image_size, **kw:
                   SmallCNN(in_channels, num_classes, **kw), "small fast CNN (2 conv, 2 FC)", default_recipe="fast",
                   stages=CONV_STAGES))
register(ModelCard("lenet", lambda in_channels, num_classes, image_size, **kw:
                   LeNetLike(in_channels, num_classes, **kw), "LeNet-like network of the JumpReLU paper",
                   stages=CONV_STAGES))
register(ModelCard("linear", lambda in_channels, num_classes, image_size, **kw:
                   LinearClassifier(in_channels, num_classes, in_channels * image_size[0] * image_size[1], **kw),
                   "linear classifier (closed-form minimal perturbations)", default_recipe="fast"))
for _d in (20, 32, 44, 56, 110):
    register(ModelCard(f"resnet{_d}", _resnet(_d), f"CIFAR-style ResNet-{_d}, basic blocks (He et al. 2016)",
                       stages=RESNET_STAGES))
register(ModelCard("resnet56_bottleneck", _resnet(56, "bottleneck"), "CIFAR-style ResNet-56, bottleneck blocks",
                   stages=RESNET_STAGES))
register(ModelCard("resnet18", lambda in_channels, num_classes, image_size, **kw:
                   ResNet18(in_channels, num_classes, **kw), "ResNet-18 with CIFAR stem",
                   stages=RESNET_STAGES + ("stages.3",)))


def build_classifier(name: str, data_card: Any, kwargs: dict[str, Any] | None = None,
                     key: str = "model.kwargs") -> Classifier:
    """A freshly initialised ``Classifier`` of zoo model ``name`` for the data of ``data_card`` (channels,
    classes, image size, and the normalization unless the model card fixes its own). The initialisation
    draws from torch's global generator: seed it first for a reproducible model."""
    mcard = get_card(name)
    kwargs = dict(kwargs or {})
    try:
        net = mcard.builder(data_card.channels, data_card.num_classes, data_card.image_size, **kwargs)
    except TypeError as e:   # an option the architecture does not take
        raise ConfigError(key, kwargs, f"the options of model {mcard.name!r}", str(e)) from e
    mean = mcard.mean if mcard.mean is not None else data_card.mean
    std = mcard.std if mcard.std is not None else data_card.std
    return Classifier(net, mean, std, data_card.num_classes, mcard.bounds, name=mcard.name)
