"""The contrastive model: the run's classifier with its head cut off (the encoder), a projection head, every
BatchNorm dual; and the way back, a classifier initialised from the pre-trained encoder.

Head surgery relies on the zoo's convention that a classifier's last ``nn.Linear`` is its classification
head, applied last to the features; ``check_head`` verifies it on real inputs before pre-training.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from defenses.acl.dual_bn import convert_dual_bn
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.model import eval_frozen


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(path, module) of the classification head: the network's last ``nn.Linear``.

    True of every zoo architecture (the head is the last layer registered and the last applied);
    ``check_head`` verifies the "last applied" part on real inputs.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError("model.name", getattr(model, "name", type(model).__name__),
                          "a network whose last nn.Linear is its classification head", "ACL needs an encoder")
    return found[-1]   # type: ignore[return-value]


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def encoder_of(classifier: nn.Module) -> nn.Module:
    """A copy of ``classifier`` (normalization included) whose head is the identity: returns the features."""
    enc = copy.deepcopy(classifier)
    path, _ = find_head(enc)
    _set_submodule(enc, path, nn.Identity())
    return enc


@torch.no_grad()
def check_head(classifier: nn.Module, x: torch.Tensor) -> None:
    """Raise unless classifier(x) == head(encoder(x)) in eval mode, i.e. the head is applied last."""
    path, head = find_head(classifier)
    enc = encoder_of(classifier)
    with eval_frozen(classifier, warn_train=False), eval_frozen(enc, warn_train=False):
        ok = torch.allclose(classifier(x), head(enc(x)), rtol=1e-4, atol=1e-5)
    if not ok:
        raise ConfigError("model.name", getattr(classifier, "name", type(classifier).__name__),
                          "a network whose last nn.Linear is applied last, to the features",
                          f"{path} is not the final layer of this network")


class ProjectionHead(nn.Module):
    """SimCLR projection MLP with BatchNorm after every linear layer (the ACL head): for ``dims`` = (h, o),
    Linear(d, h) - BN - ReLU - Linear(h, o, no bias) - BN. Input (B, d), output (B, o)."""

    def __init__(self, in_dim: int, dims: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = int(in_dim)
        for i, h in enumerate(dims):
            # a bias before BN is redundant; the first layer keeps one, as in the authors' head
            layers += [nn.Linear(d, int(h), bias=(i == 0)), nn.BatchNorm1d(int(h))]
            if i < len(dims) - 1:
                layers.append(nn.ReLU())
            d = int(h)
        self.layers = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


class ContrastiveModel(nn.Module):
    """encoder (the classifier minus its head, normalization included) -> projection head, all BN dual.

    Input (B, C, H, W) in [0, 1]; output (B, o) projections. ``features`` gives the encoder output (B, d).
    """

    def __init__(self, classifier: nn.Module, proj_dims: Sequence[int] | None = None) -> None:
        super().__init__()
        _, head = find_head(classifier)
        self.feature_dim = int(head.in_features)
        self.encoder = encoder_of(classifier)
        self.head = ProjectionHead(self.feature_dim, list(proj_dims) if proj_dims else
                                   [self.feature_dim, self.feature_dim])
        self.n_dual = convert_dual_bn(self)
        self.bounds = tuple(getattr(classifier, "bounds", (0.0, 1.0)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def load_pretrained(classifier: nn.Module, cmodel: ContrastiveModel, branch: str = "pgd") -> None:
    """Initialise ``classifier`` (in place) from ``cmodel``'s encoder with the BN set of ``branch``, and a zero
    classification head (the authors' fine-tuning start). Every other tensor is copied exactly, so in eval
    mode the classifier's features equal the encoder's features in that branch bit for bit."""
    head_path, _ = find_head(classifier)
    enc_sd = cmodel.encoder.state_dict()
    bn_paths = {n for n, m in classifier.named_modules() if isinstance(m, _BatchNorm)}
    new: dict[str, torch.Tensor] = {}
    for key, value in classifier.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod == head_path:
            new[key] = torch.zeros_like(value)
            continue
        src = f"{mod}.{branch}.{leaf}" if mod in bn_paths else key
        if src not in enc_sd:
            raise RuntimeError(f"pre-trained encoder has no tensor {src!r} for classifier tensor {key!r}")
        new[key] = enc_sd[src].detach().clone().to(value.device)
    classifier.load_state_dict(new, strict=True)
