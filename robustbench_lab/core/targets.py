"""Targeted mode of the attack contract: which class each example is pushed to.

``attack.targeted=true`` with ``attack.target``:

- ``random``: per example, a class drawn uniformly from the classes other than its label. The draw is keyed
  by the run's seed and the example's dataset index only (not by the attack), so every attack of a run, and
  every batch size, aims at the same class for the same example;
- ``least_likely``: the class of smallest clean logit (the hardest target, as in Kurakin et al. 2017);
- an integer class: that class for every example. An example already labelled as it cannot be attacked
  towards it: it is returned unchanged and never counts as a success.

Success in targeted mode means "predicted as the target", re-verified by the template on the returned input.
"""

from __future__ import annotations

from typing import Union

import torch

from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.rng import ExampleRandom

TARGET_MODES = ("random", "least_likely")
TargetSpec = Union[str, int]

# The salt of the target draws: independent of the attack's name, so a cascade shares its targets.
TARGET_STREAM = "target"


def check_target(value: object, key: str = "attack.target") -> TargetSpec:
    """``value`` as a target spec (``random``, ``least_likely`` or a class index >= 0), else a ConfigError."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not (value in TARGET_MODES or (isinstance(value, int) and value >= 0)):
        raise ConfigError(key, value, "random, least_likely, or a class index >= 0",
                          "the class each example is pushed to when attack.targeted=true")
    return value  # type: ignore[return-value]


def choose_targets(logits: torch.Tensor, y: torch.Tensor, spec: TargetSpec, streams: ExampleRandom,
                   key: str = "attack.target") -> torch.Tensor:
    """Targets (B,) int64 for clean ``logits`` (B, K) and labels ``y`` (B,) under ``spec``. ``streams``:
    per-example streams salted with ``TARGET_STREAM`` (used by ``random`` only)."""
    k = logits.shape[1]
    if spec == "least_likely":
        return logits.argmin(1)
    if spec == "random":
        r = streams.integers(0, k - 1)        # uniform over the k - 1 classes other than y
        return r + (r >= y).long()
    return torch.full_like(y, check_target_class(spec, k, key))


def check_target_class(spec: TargetSpec, num_classes: int, key: str = "attack.target") -> TargetSpec:
    """``spec`` if it names a target on a model of ``num_classes`` classes (a mode, or a class index below
    it), else a ConfigError naming the range: so a run can fail before any data is read."""
    if spec not in TARGET_MODES and (not isinstance(spec, int) or not 0 <= spec < num_classes):
        raise ConfigError(key, spec, f"random, least_likely, or a class index in [0, {num_classes - 1}]",
                          f"the model has {num_classes} classes")
    return spec
