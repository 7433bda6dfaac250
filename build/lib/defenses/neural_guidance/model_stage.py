"""The higher-area surrogate (``model_stage``): stage ``k`` of a separately trained, frozen zoo network.

A proxy for successively higher areas, so a hierarchy runs offline. The network is trained (once) and cached
by the core's checkpoint cache under the same key a run of that model would use; its stage modules come
from its model card (``ModelCard.stages``). Model-derived, not brain data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from robustbench_lab.core import data as data_mod
from robustbench_lab.core import zoo
from robustbench_lab.core.cache import CheckpointCache, content_key, load_weights, sha256_file
from robustbench_lab.core.errors import ConfigError, check_choice, check_known_fields, check_number
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.recipe import Recipe
from robustbench_lab.core.train import checkpoint_spec, get_or_train

from .pipeline import PooledResponse
from .target import MODEL_DERIVED, TargetSource


def network_stages(name: str) -> list[str]:
    """Names, in a ``Classifier``'s ``named_modules()``, of the modules that end each stage of zoo model
    ``name`` (its card's ``stages`` under the classifier's ``net.``); [] for a network without stages."""
    return [f"net.{s}" for s in zoo.get_card(name).stages]


class _StopForward(Exception):
    pass


class StageOutput(nn.Module):
    """The output of module ``name`` of a frozen classifier (the forward pass stops there)."""

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self._module = dict(net.named_modules())[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured: dict[str, torch.Tensor] = {}

        def hook(_m: nn.Module, _i: Any, o: torch.Tensor) -> None:
            captured["out"] = o
            raise _StopForward   # the later stages are not needed

        h = self._module.register_forward_hook(hook)
        try:
            self.net(x)
        except _StopForward:
            pass
        finally:
            h.remove()
        return captured["out"]


@dataclasses.dataclass(frozen=True)
class SourceNetwork:
    """``defense.neural_target.source``: the source network as a model card node (``robustbench_lab/conf/model/<name>.yaml``,
    which the config's defaults bring): zoo ``name``, ``kwargs``, ``train`` (its recipe; needed unless
    ``checkpoint`` is given), ``train_seed`` (an integer: the source does not follow the run's seed, so every
    cell of a seed sweep shares one source), ``checkpoint`` (a weights file instead of the cache)."""

    name: str = "resnet20"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train: Mapping[str, Any] | None = None
    train_seed: int = 0
    checkpoint: str | None = None


class ModelStageTarget(TargetSource):
    """Higher-area surrogate: stage ``stage`` (1-based) of a separately trained, frozen network.

    The network is ``source`` (a ``SourceNetwork`` node) trained by the core's loop on ``data`` (name, n_val,
    split_seed: the run's, by config interpolation), loaded from the checkpoint cache under ``cache_dir``
    (trained there once if missing; with the model card's recipe the key is the one ``python run.py
    model=<name>`` would use, so the default ResNet-20 is shared with the main job) -- or
    ``source.checkpoint``: a weights file of that architecture. Its stage output is average-pooled to
    ``pool`` x ``pool`` and PCA-reduced. Model-derived, not brain data.
    """

    kind = "model_stage"
    source_kind = "surrogate"

    def __init__(self, *, stage: int = 3, source: Mapping[str, Any] | None = None,
                 data: Mapping[str, Any] | None = None, cache_dir: str | None = None, pool: int = 4,
                 **kw: Any) -> None:
        super().__init__(**kw)
        key = self.key
        node = dict(source or {})
        check_known_fields(SourceNetwork, node, f"{key}.source", "source network field")
        self.source = src = SourceNetwork(**node)
        self.model = src.name
        zoo.get_card(src.name, key=f"{key}.source.name")
        self.kwargs = dict(src.kwargs or {})
        self.train_seed = check_number(f"{key}.source.train_seed", src.train_seed, integer=True)
        self.checkpoint = str(src.checkpoint) if src.checkpoint else None
        if self.checkpoint and not Path(self.checkpoint).expanduser().is_file():
            raise ConfigError(f"{key}.source.checkpoint", src.checkpoint, "null (the harness's cached network) or "
                              "an existing weights file of the source architecture")
        if src.train is None and not self.checkpoint:
            raise ConfigError(f"{key}.source.train", None, "the source network's training recipe (a model card's "
                              "train node; the config brings robustbench_lab/conf/model/<name>.yaml's)")
        self.recipe = None if src.train is None else Recipe.from_config(src.train, key=f"{key}.source.train")
        self.data = dict(data or {"name": "fashion_mnist", "n_val": 5000, "split_seed": 0})
        for k in ("name", "n_val", "split_seed"):
            if k not in self.data:
                raise ConfigError(f"{key}.data.{k}", None, "the run's data settings (name, n_val, split_seed)")
        self.stage_names = network_stages(src.name)
        if not self.stage_names:
            raise ConfigError(f"{key}.source.name", src.name,
                              [n for n in zoo.available() if zoo.get_card(n).stages], "a network with stages")
        self.stage = check_choice(f"{key}.stage", stage, range(1, len(self.stage_names) + 1),
                                  f"{src.name} has {len(self.stage_names)} stages ({', '.join(self.stage_names)})")
        self.pool = check_number(f"{key}.pool", pool, low=1, integer=True)
        self._ckpt_sha = sha256_file(Path(self.checkpoint).expanduser()) if self.checkpoint else None
        self.cache_dir = cache_dir
        self._build(data_mod.get_card(self.data["name"]))   # a bad kwargs option fails before any data is read
        self._net: Classifier | None = None
        self.source_meta: dict[str, Any] = {}

    @property
    def level(self) -> int:
        return 1 + self.stage

    @property
    def label(self) -> str:
        return f"{self.model} stage {self.stage} {MODEL_DERIVED}"

    def _build(self, dcard: data_mod.DataCard) -> Classifier:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.train_seed)    # the init the harness would use for this checkpoint
            return zoo.build_classifier(self.model, dcard, self.kwargs, key=f"{self.key}.source.kwargs")

    def source_spec(self) -> dict[str, Any]:
        """The source network's checkpoint spec (the cache key's content), or its weights file's hash."""
        if self.checkpoint:
            return {"checkpoint_sha256": self._ckpt_sha, "model": self.model, "kwargs": self.kwargs}
        assert self.recipe is not None
        # procedure None: standard cross-entropy training, as the undefended run of that model
        return checkpoint_spec(self.model, self.kwargs, self.data["name"], self.data["n_val"],
                               self.data["split_seed"], self.recipe, None, self.train_seed)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "stage": self.stage, "stage_module": self.stage_names[self.stage - 1],
                "pool": self.pool, "source": self.source_spec()}

    def source_network(self, splits: data_mod.Splits, device: torch.device) -> Classifier:
        """The frozen source network (trained and cached by the harness when missing)."""
        if self._net is not None:
            return self._net
        if splits.card.name != self.data["name"]:
            raise ConfigError(f"{self.key}.data.name", self.data["name"], [splits.card.name],
                              "the source network must be trained on the run's dataset")
        net = self._build(splits.card)
        if self.checkpoint:
            load_weights(net, Path(self.checkpoint).expanduser(), what=f"{self.key}.source.checkpoint")
            self.source_meta = {"checkpoint": self.checkpoint}
        else:
            if not self.cache_dir:
                raise ConfigError(f"{self.key}.cache_dir", self.cache_dir, "the checkpoint cache directory "
                                  "(${paths.cache_dir} in the config)")
            spec = self.source_spec()
            cache = CheckpointCache(Path(self.cache_dir) / "checkpoints")
            meta = get_or_train(net, spec, splits, self.recipe, cache, device, self.train_seed, None, progress=False)
            self.source_meta = {"checkpoint_key": content_key(spec), "cache_hit": bool(meta.get("cache_hit")),
                                "source_test_accuracy": meta.get("test_accuracy")}
        net.to(device).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self._net = net
        return net

    def response_module(self, splits: data_mod.Splits, device: torch.device) -> nn.Module:
        net = self.source_network(splits, device)
        return PooledResponse(StageOutput(net, self.stage_names[self.stage - 1]), self.pool).to(device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "stage": self.stage, "stage_module": self.stage_names[self.stage - 1],
                "model": self.model, **self.source_meta}
