"""The Python API: evaluate your own model in a few lines.

    import robustbench_lab as rbl
    result = rbl.evaluate(my_model, data="cifar10", attacks=["pgd"], eps=8/255, n_examples=1000)
    print(result.metrics["robust_accuracy"]); result.save("my_eval")

The same machinery as ``run.py`` (``app.assess``): the attacks as a cascade with the harness re-verifying
success on the returned tensors, the summary metrics of ``metrics.json``, the sanity checks, and the same
files when saved.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from robustbench_lab.app.assess import Assessment, assess, finish, write_assessment
from robustbench_lab.app.builders import attack_from_name, check_target_classes, targetable_attacks
from robustbench_lab.app.checks import LEVELS
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.attack_base import Attack
from robustbench_lab.core.device import resolve_device
from robustbench_lab.core.errors import ConfigError, check_bool, check_choice, check_number
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.norms import Norm
from robustbench_lab.core.progress import Progress
from robustbench_lab.core.results import ResultWriter
from robustbench_lab.core.sources import MODEL_CONTRACT, wrap
from robustbench_lab.core.targets import TargetSpec, check_target



@dataclasses.dataclass
class EvaluationResult:
    """What ``evaluate`` returns: ``metrics`` (the keys of a run's ``metrics.json``), ``per_example`` (one row
    per example x attack), ``x_adv`` (per example the adversarial that broke it, else the clean input),
    ``checks_fired`` (names of the sanity checks that fired)."""

    metrics: dict[str, Any]
    per_example: pd.DataFrame
    x_adv: torch.Tensor
    checks_fired: list[str]
    _assessment: Assessment = dataclasses.field(repr=False)
    _class_names: Sequence[str] | None = dataclasses.field(default=None, repr=False)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the files a CLI run writes (``metrics.json`` last, ``per_example.parquet``, ``summary.md``,
        ``eval_indices.json``, plots) into ``directory``. Returns the path of ``metrics.json``."""
        writer = ResultWriter(Path(directory))
        metrics = dict(self.metrics)
        sections = write_assessment(writer, self._assessment, metrics,
                                    f"{metrics['attack']} on {metrics['model']}/{metrics['dataset']}",
                                    metrics["dataset"], self._class_names)
        return finish(writer, metrics, sections, metrics["started_at"])


def as_classifier(model: nn.Module, x_probe: torch.Tensor, preprocessing: tuple[Sequence[float], Sequence[float]] | None,
                  name: str) -> Classifier:
    """Wrap a user's model so the harness sees inputs in [0, 1] and logits: ``preprocessing=(mean, std)``
    normalizes inside the wrapper (epsilons stay in pixel space). Checks the output on ``x_probe``."""
    if isinstance(model, Classifier) and preprocessing is None:
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError("model", type(model).__name__, MODEL_CONTRACT)
    if preprocessing is not None and len(preprocessing) != 2:
        raise ConfigError("preprocessing", preprocessing, "(mean, std), each one value or one per channel")
    mean, std = preprocessing if preprocessing is not None else (None, None)
    return wrap(model, x_probe, mean, std, None, name, key="model", value=type(model).__name__,
                norm_key="preprocessing")


def _targeted(atk: Attack, target: TargetSpec) -> Attack:
    """A copy of ``atk`` in targeted mode (the caller's object is left as it was), or a ConfigError naming
    ``target`` when the method takes none."""
    if not atk.targetable:
        raise ConfigError("target", target, "None (untargeted)", f"{atk.name} is an untargeted method; attacks "
                          "that take a target: " + ", ".join(targetable_attacks()))
    return copy.copy(atk).set_target(target)


def _points(data: str | tuple[torch.Tensor, torch.Tensor], n_examples: int | None, data_root: str | None,
            download: bool, split_seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int], str, Sequence[str] | None]:
    if isinstance(data, str):
        names = data_mod.available()
        check_choice("data", data, names)
        root = data_root or os.environ.get("ROBUSTBENCH_LAB_DATA", "data")
        n = int(n_examples) if n_examples is not None else int(data_mod.get_card(data).sizes[1])
        splits = data_mod.load_splits(data, root, download, n_val=0, n_eval=n, split_seed=split_seed)
        return (data_mod.to_float(splits.x_eval), splits.y_eval, splits.eval_indices.tolist(), data,
                splits.card.class_names)
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        raise ConfigError("data", type(data).__name__, data_mod.available() + ["(x, y) tensors"])
    x, y = data
    if x.dim() != 4 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ConfigError("data", f"x {tuple(x.shape)}, y {tuple(y.shape)}", "x (N, C, H, W) and y (N,), N >= 1")
    if not torch.is_floating_point(x) or float(x.min()) < 0 or float(x.max()) > 1:
        raise ConfigError("data", "x outside [0, 1]" if torch.is_floating_point(x) else f"x of dtype {x.dtype}",
                          "float inputs in [0, 1] (normalization belongs in preprocessing=(mean, std))")
    n = x.shape[0] if n_examples is None else min(int(n_examples), x.shape[0])
    return x[:n], y[:n].long(), list(range(n)), "tensors", None


def evaluate(model: nn.Module, data: str | tuple[torch.Tensor, torch.Tensor] = "fashion_mnist",
             attacks: Sequence[str | Attack] = ("pgd",), eps: float | None = None, norm: str = "linf",
             n_examples: int | None = 1000, device: str = "auto", checks: str = "quick", batch_size: int = 500,
             seed: int = 0, preprocessing: tuple[Sequence[float], Sequence[float]] | None = None,
             data_root: str | None = None, download: bool = False, split_seed: int = 0,
             name: str | None = None, attack_options: dict[str, Any] | None = None,
             progress: bool = False, target: str | int | None = None) -> EvaluationResult:
    """Evaluate ``model`` (any ``nn.Module`` mapping inputs in [0, 1] to logits) against ``attacks``.

    ``data``: a dataset name (``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``svhn``; its test
    split, the same points as the CLI's ``data.n_eval`` subset for the same ``split_seed``) or a tuple
    ``(x, y)`` of tensors. ``attacks``: attack-config names (``robustbench_lab/conf/attack``) or ``Attack`` objects, run as
    a cascade exactly as the CLI runs ``attacks=[...]`` under one threat model (``norm``, ``eps``; eps None
    for minimal-norm attacks); ``attack_options`` override settings of the named attacks (``{"steps": 50}``).
    ``checks``: ``none``, ``quick`` or ``full``. ``progress=True`` draws bars on stderr over the attack
    batches and the checks (plain periodic lines when stderr is not a terminal); off by default.
    ``target``: targeted mode for every attack (``random``, ``least_likely`` or a class index, as
    ``attack.target``; docs/metrics.md): success then means "predicted as the target". None: untargeted.
    """
    t_start = time.time()
    check_choice("norm", norm, [n.value for n in Norm])
    check_number("eps", eps, low=0, allow_none=True)
    check_choice("checks", checks, LEVELS)
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("seed", seed, integer=True)
    check_number("n_examples", n_examples, low=1, integer=True, allow_none=True)
    check_bool("progress", progress)
    if isinstance(attacks, (str, Attack)):
        attacks = [attacks]
    built: list[Attack] = []
    for i, a in enumerate(attacks):
        if isinstance(a, Attack):
            built.append(a)
        elif isinstance(a, str):
            built.append(attack_from_name(a, norm, eps, key=f"attacks[{i}]", **(attack_options or {}))[0])
        else:
            raise ConfigError(f"attacks[{i}]", type(a).__name__, "an attack config name or an Attack object")
    if target is not None:
        built = [_targeted(a, check_target(target, "target")) for a in built]
    if not built:
        raise ConfigError("attacks", list(attacks), "at least one attack")
    dev = resolve_device(device)
    x, y, indices, dataset, class_names = _points(data, n_examples, data_root, download, split_seed)
    x, y = x.to(dev), y.to(dev)
    label = name or type(model).__name__
    clf = as_classifier(model.to(dev), x[:2], preprocessing, label).to(dev).eval()
    if int(y.max()) >= clf.num_classes:
        raise ConfigError("model", f"{clf.num_classes} outputs", f"at least {int(y.max()) + 1} (the labels' range)")
    check_target_classes(built, clf.num_classes, key="target")
    a = assess(clf, x, y, built, eps, seed, batch_size, checks, indices=indices, progress=Progress(progress))
    metrics = {"dataset": dataset, "model": label, "defense": "none", "attack": "+".join(at.name for at in built),
               **a.metrics, "seed": int(seed), "device": str(dev), "torch_version": torch.__version__,
               "python": platform.python_version(), "pid": os.getpid(), "started_at": t_start,
               "seconds": time.time() - t_start}
    fired = list(metrics.get("checks_fired") or [])
    return EvaluationResult(metrics, a.evaluation.per_example(), a.evaluation.x_adv, fired, a, class_names)
