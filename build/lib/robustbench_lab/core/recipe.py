"""The training recipe: every setting of the training loop that changes the trained weights.

Light on purpose (no torch): the application's config schema derives its ``model.train`` node from this
dataclass (``app.schema``), and that module is imported before Hydra composes a config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from robustbench_lab.core.errors import ConfigError, check_known_fields

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("onecycle", "cosine", "step", "constant")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training recipe. Everything here enters the checkpoint key."""

    epochs: int = 4
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_frac: float = 0.15          # onecycle: fraction of steps spent warming up
    milestones: tuple[float, ...] = (0.5, 0.75)   # step schedule: fractions of training
    augment: bool = True
    label_smoothing: float = 0.0
    max_train: int = 0                  # >0: train on the first N training points only (tests, quick runs)

    @classmethod
    def from_config(cls, cfg: Any, key: str = "model.train") -> "Recipe":
        d = dict(cfg) if cfg is not None else {}
        check_known_fields(cls, d, key, "recipe field")
        if "milestones" in d:
            d["milestones"] = tuple(float(m) for m in d["milestones"])
        r = cls(**d)
        if r.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{key}.optimizer", r.optimizer, OPTIMIZERS)
        if r.schedule not in SCHEDULES:
            raise ConfigError(f"{key}.schedule", r.schedule, SCHEDULES)
        if r.epochs < 0:
            raise ConfigError(f"{key}.epochs", r.epochs, "an integer >= 0")
        if r.batch_size <= 0:
            raise ConfigError(f"{key}.batch_size", r.batch_size, "an integer > 0")
        if not r.lr > 0:
            raise ConfigError(f"{key}.lr", r.lr, "a float > 0")
        if not 0 <= r.momentum < 1:
            raise ConfigError(f"{key}.momentum", r.momentum, "a float in [0, 1)")
        if r.optimizer == "sgd" and r.nesterov and r.momentum == 0:
            raise ConfigError(f"{key}.nesterov", r.nesterov, [False],
                              "Nesterov SGD needs momentum > 0 (set model.train.nesterov=false or a momentum)")
        if not r.weight_decay >= 0:
            raise ConfigError(f"{key}.weight_decay", r.weight_decay, "a float >= 0")
        if not 0 < r.warmup_frac < 1:
            raise ConfigError(f"{key}.warmup_frac", r.warmup_frac, "a float in (0, 1) (onecycle's warm-up share)")
        if any(not 0 < m < 1 for m in r.milestones) or list(r.milestones) != sorted(r.milestones):
            raise ConfigError(f"{key}.milestones", list(r.milestones),
                              "increasing fractions of training in (0, 1), e.g. [0.5, 0.75]")
        if not 0 <= r.label_smoothing < 1:
            raise ConfigError(f"{key}.label_smoothing", r.label_smoothing, "a float in [0, 1)")
        if r.max_train < 0:
            raise ConfigError(f"{key}.max_train", r.max_train, "an integer >= 0 (0: the whole training split)")
        return r
