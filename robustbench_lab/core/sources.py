"""Models from outside the zoo: any importable factory, torchvision and timm architectures by name, and the
RobustBench model zoo. Each factory returns a plain ``nn.Module`` mapping inputs (already normalized as the
caller arranges) to logits; ``app.builders`` wraps it in a ``Classifier``.

Factories that take ``num_classes`` / ``in_channels`` get the dataset's values unless the config sets them.
Weights are never loaded by pickling: RobustBench checkpoints go through ``cache.load_weights`` (weights
only), after the file is fetched where a network is reachable.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from robustbench_lab.core.cache import load_weights
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.model import Classifier

MODEL_CONTRACT = "an nn.Module mapping inputs (B, C, H, W) in [0, 1] to logits (B, num_classes)"
ROBUSTBENCH_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet"}
ROBUSTBENCH_THREATS = ("Linf", "L2", "corruptions")


def locate(path: str, key: str = "model._target_") -> Callable[..., Any]:
    """The object at the import path ``package.module.name``; a ConfigError names the key otherwise."""
    allowed = "an importable factory or class returning an nn.Module (package.module.name, on PYTHONPATH)"
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(key, path, allowed)
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(key, path, allowed, f"cannot import {module_name!r}: {e}") from e
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ConfigError(key, path, allowed, f"{module_name!r} has no callable {attr!r}")
    return obj


def call_factory(factory: Callable[..., Any], kwargs: dict[str, Any], defaults: dict[str, Any],
                 key: str = "model.kwargs") -> nn.Module:
    """``factory(**kwargs)``, adding each of ``defaults`` (num_classes, in_channels) that the factory takes
    and the config does not set. The result must be an nn.Module."""
    try:
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):   # builtins without a signature
        params, takes_any = {}, False
    args = {**{k: v for k, v in defaults.items() if (k in params or takes_any) and k not in kwargs}, **kwargs}
    try:
        net = factory(**args)
    except TypeError as e:   # an option the factory does not take
        raise ConfigError(key, kwargs, f"the options of {getattr(factory, '__name__', factory)!r}", str(e)) from e
    if not isinstance(net, nn.Module):
        raise ConfigError(key.rsplit(".", 1)[0] + "._target_", getattr(factory, "__qualname__", str(factory)),
                          "a factory or class returning an nn.Module", f"it returned {type(net).__name__}")
    return net


def check_logits(model: nn.Module, x_probe: torch.Tensor, num_classes: int | None, key: str, value: Any) -> int:
    """Run ``model`` on ``x_probe`` (B, C, H, W) in eval mode and check it returns logits (B, K), K >= 2 (and
    K == ``num_classes`` when given). Returns K; a ConfigError names ``key`` and the contract otherwise."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x_probe)
    finally:
        model.train(was_training)
    ok = isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == x_probe.shape[0] and out.shape[1] >= 2
    if not ok or (num_classes is not None and out.shape[1] != num_classes):
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(key, value, MODEL_CONTRACT + (f" with {num_classes} classes" if num_classes else ""),
                          f"it returned output {found} for input {tuple(x_probe.shape)}")
    return int(out.shape[1])


def wrap(net: nn.Module, x_probe: torch.Tensor, mean: Any, std: Any, num_classes: int | None, name: str,
         key: str, value: Any, norm_key: str) -> Classifier:
    """``net`` inside the harness's wrapper: normalization by ``mean``/``std`` (both None: none; one value
    or one per channel), inputs in [0, 1], and the logits contract checked on ``x_probe`` (B, C, H, W)
    (``num_classes`` None: taken from the output). ``key``/``value`` name the model in errors, ``norm_key``
    the normalization setting."""
    channels = x_probe.shape[1]
    if (mean is None) != (std is None):
        raise ConfigError(norm_key, f"mean {mean}, std {std}", "both mean and std (one value or one per channel), "
                          "or neither for no normalization")
    if mean is None:
        mean, std = [0.0], [1.0]
    mean, std = ([float(v) for v in (p if isinstance(p, (list, tuple)) else [p])] for p in (mean, std))
    mean, std = (v * channels if len(v) == 1 else v for v in (mean, std))
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ConfigError(norm_key, f"mean {mean}, std {std}", f"{channels} values each (or one), std > 0")
    clf = Classifier(net, mean, std, num_classes or 2, name=name)
    clf.num_classes = check_logits(clf, x_probe, num_classes, key=key, value=value)
    return clf


def torchvision_model(arch: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """A torchvision architecture by name (``resnet18``, ``vit_b_16``, ...), randomly initialised; the first
    convolution is rebuilt for ``in_channels`` other than 3 (grayscale data)."""
    import torchvision
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ConfigError("model.arch", arch, sorted(names), "a torchvision classification architecture")
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _adapt_first_conv(net, in_channels, "model.arch", arch)
    return net


def timm_model(arch: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """A timm architecture by name, randomly initialised (``pip install timm``)."""
    try:
        import timm
    except ImportError as e:
        raise ConfigError("model", "timm", "an installed timm (pip install timm) for model=timm") from e
    if arch not in timm.list_models():
        raise ConfigError("model.arch", arch, "a timm architecture (timm.list_models())")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


def robustbench_model(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
                      model_dir: str = "models") -> nn.Module:
    """A RobustBench model-zoo entry: its architecture from the ``robustbench`` package, its weights from
    ``<model_dir>/<dataset>/<threat_model>/<name>.pt`` (downloaded there where a network is reachable;
    offline, put the file there). Zoo models take inputs in [0, 1] and normalize themselves."""
    try:
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except ImportError as e:
        raise ConfigError("model", "robustbench", "an installed robustbench package (pip install robustbench)",
                          str(e)) from e
    if dataset not in ROBUSTBENCH_DATASETS:
        raise ConfigError("model.dataset", dataset, sorted(ROBUSTBENCH_DATASETS))
    if threat_model not in ROBUSTBENCH_THREATS:
        raise ConfigError("model.threat_model", threat_model, ROBUSTBENCH_THREATS)
    entries = model_dicts[BenchmarkDataset(ROBUSTBENCH_DATASETS[dataset])][ThreatModel(threat_model)]
    if name not in entries:
        raise ConfigError("model.name", name, sorted(entries), f"RobustBench {dataset} / {threat_model} models")
    net = entries[name]["model"]()
    path = Path(model_dir) / BenchmarkDataset(ROBUSTBENCH_DATASETS[dataset]).value / \
        ThreatModel(threat_model).value / f"{name}.pt"
    if not path.is_file():
        _fetch_robustbench(entries[name], path)
    load_weights(net, path, what=f"RobustBench checkpoint (model.name={name})")
    return net


def _fetch_robustbench(entry: dict[str, Any], path: Path) -> None:
    gdrive_id = entry.get("gdrive_id")
    try:
        if not isinstance(gdrive_id, str):
            raise OSError("this entry's weights come in several files")
        from robustbench.utils import download_gdrive
        path.parent.mkdir(parents=True, exist_ok=True)
        download_gdrive(gdrive_id, path)
    except Exception as e:   # no network, or the hosting refused: say where the file must go
        path.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"RobustBench weights not found at {path} and could not be downloaded ({type(e).__name__}: {e}); "
            f"put the file {path.name} into the folder {path.parent} (model.model_dir sets the base folder)") from e


def _adapt_first_conv(net: nn.Module, in_channels: int, key: str, arch: str) -> None:
    for parent in net.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                setattr(parent, child_name, nn.Conv2d(in_channels, child.out_channels, child.kernel_size,
                                                      child.stride, child.padding, child.dilation, child.groups,
                                                      child.bias is not None, child.padding_mode))
                return
    raise ConfigError(key, arch, "an architecture whose first convolution takes 3 channels",
                      f"cannot adapt it to {in_channels}-channel data")
