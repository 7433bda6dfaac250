"""Model registry: every card builds for every data shape, runs forward/backward without NaN, and uses only
nn.ReLU modules as activations (so defenses can retrofit them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustbench_lab.core import zoo
from robustbench_lab.core.model import Classifier, eval_frozen

SHAPES = [(1, (28, 28), 10), (3, (32, 32), 100)]
CARDS = [c for c in zoo.available() if c not in ("resnet110",)]   # ResNet-110 is just deeper; keep tests fast


def test_duplicate_registration_raises():
    card = zoo.get_card("small_cnn")
    with pytest.raises(ValueError, match="already registered"):
        zoo.register(card)


def test_unknown_model_names_allowed_values():
    with pytest.raises(ValueError, match="model.name") as e:
        zoo.get_card("resnet21")
    assert "resnet20" in str(e.value)


@pytest.mark.parametrize("name", CARDS)
@pytest.mark.parametrize("channels,size,classes", SHAPES)
def test_forward_backward(name, channels, size, classes):
    torch.manual_seed(0)
    net = zoo.get_card(name).builder(channels, classes, size)
    m = Classifier(net, [0.5] * channels, [0.25] * channels, classes)
    x = torch.rand(2, channels, *size, requires_grad=True)
    out = m(x)
    assert out.shape == (2, classes) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [c for c in CARDS if c.startswith("resnet")] + ["linear"])
def test_only_relu_modules_are_nonlinear(name):
    """Replace every nn.ReLU by identity: a ResNet in eval mode (BN affine, option-A shortcuts, average
    pooling) must then be an affine map. A hidden functional relu would break affinity."""
    torch.manual_seed(0)
    net = zoo.get_card(name).builder(1, 10, (28, 28))
    n_relu = sum(isinstance(mod, nn.ReLU) for mod in net.modules())
    assert n_relu > 0 or name == "linear"
    for parent in list(net.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, nn.Identity())
    with eval_frozen(net, warn_train=False), torch.no_grad():
        a, b = torch.rand(1, 1, 28, 28), torch.rand(1, 1, 28, 28)
        zero = net(torch.zeros_like(a))
        lhs = net(a + b) - zero
        rhs = (net(a) - zero) + (net(b) - zero)
    assert torch.allclose(lhs, rhs, atol=1e-3, rtol=1e-3)


def test_relu_modules_are_not_shared():
    net = zoo.get_card("resnet20").builder(1, 10, (28, 28))
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == len({id(m) for m in relus}) == 1 + 2 * 9   # stem + 2 per unit, 9 units


def test_resnet_depths():
    for d, units in ((20, 3), (32, 5), (56, 9)):
        net = zoo.get_card(f"resnet{d}").builder(3, 10, (32, 32))
        assert all(len(s) == units for s in net.stages)
    with pytest.raises(ValueError, match="model.depth"):
        zoo.CifarResNet(depth=21)
