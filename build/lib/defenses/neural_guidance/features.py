"""The guided layer: where the neural head sits, and its features during a forward pass.

``penultimate`` (the default, as the authors' ``CoTrainNet`` on the avg-pooled ``layer4``) is the *input*
of the model's last ``nn.Linear``; any other module name is that module's output, 4-D outputs
average-pooled to ``pool`` x ``pool`` (as their ``layer1``-``layer3`` heads).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.model import eval_frozen

from .pipeline import pool_flatten

PENULTIMATE = "penultimate"


def layer_names(model: nn.Module) -> list[str]:
    """The module names a head can sit on (``penultimate`` plus every named submodule)."""
    return [PENULTIMATE] + [n for n, _ in model.named_modules() if n]


def resolve_layer(model: nn.Module, layer: str) -> tuple[str, nn.Module, bool]:
    """(name, module, is_input): ``penultimate`` is the *input* of the last ``nn.Linear``; any other name is
    the output of that module (``net.`` may be omitted for a Classifier)."""
    named = dict(model.named_modules())
    if layer == PENULTIMATE:
        linears = [(n, m) for n, m in named.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError("defense.layer", layer, layer_names(model)[1:21],
                              "the model has no nn.Linear classifier layer: name a layer")
        return linears[-1][0], linears[-1][1], True
    for cand in (layer, f"net.{layer}"):
        if cand and cand in named:
            return cand, named[cand], False
    raise ConfigError("defense.layer", layer, layer_names(model)[:40], "a module name of the model")


class FeatureTap:
    """Captures the features of ``layer`` during a forward pass: (B, D), 4-D outputs average-pooled to
    ``pool`` x ``pool`` then flattened. Use as a context manager; the hook is removed on exit."""

    def __init__(self, model: nn.Module, layer: str, pool: int) -> None:
        self.name, self.module, self.is_input = resolve_layer(model, layer)
        self.pool = int(pool)
        self.features: torch.Tensor | None = None
        self._handle: Any = None

    def __enter__(self) -> "FeatureTap":
        if self.is_input:
            self._handle = self.module.register_forward_pre_hook(self._pre)
        else:
            self._handle = self.module.register_forward_hook(self._post)
        return self

    def _pre(self, _m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.features = pool_flatten(inputs[0], self.pool)

    def _post(self, _m: nn.Module, _i: Any, output: torch.Tensor) -> None:
        self.features = pool_flatten(output, self.pool)

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


@torch.no_grad()
def layer_features(model: nn.Module, x: torch.Tensor, layer: str, pool: int, batch_size: int = 500) -> torch.Tensor:
    """Features of ``layer`` for ``x`` (N, C, H, W) in eval mode: (N, D)."""
    out = []
    with eval_frozen(model, warn_train=False):
        tap = FeatureTap(model, layer, pool)
        with tap:
            for i in range(0, x.shape[0], batch_size):
                model(x[i:i + batch_size])
                assert tap.features is not None
                out.append(tap.features.detach())
    return torch.cat(out)
