"""Checks of a composed config that need no data or model, so bad input fails before any work is done."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from robustbench_lab.app.checks import LEVELS
from robustbench_lab.app.schema import unknown_keys
from robustbench_lab.core import data as data_mod
from robustbench_lab.core import sources, zoo
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.recipe import Recipe


def validate(cfg: DictConfig) -> None:
    """Checks that need no data or model, so bad input fails before any work is done.

    Types and key names are checked at composition (``robustbench_lab.app.schema``); here: keys force-added
    with ``+`` that no schema declares, registered names, value ranges (the evaluation subset against the
    test-set size, read from the files' headers where the format has them), an explicit checkpoint file.
    """
    for key, declared in unknown_keys(cfg):
        raise ConfigError(key, OmegaConf.select(cfg, key), declared, "unknown key (no schema declares it; a "
                          "'+key=value' override adds a key, it cannot rename one)")
    data_mod.check_split_args(cfg.data.name, cfg.data.root, cfg.data.get("n_val"), cfg.data.get("n_eval"),
                              cfg.data.get("split_seed"))
    if cfg.model.get("_target_"):
        sources.locate(cfg.model._target_)
    else:
        zoo.get_card(cfg.model.name)
    ckpt = cfg.model.get("checkpoint")
    if ckpt and not Path(str(ckpt)).expanduser().is_file():
        raise ConfigError("model.checkpoint", ckpt, "null (train or use the cache) or the path of an existing "
                          "weights file (.safetensors, or a torch state dict loaded weights-only)")
    if not isinstance(cfg.seed, int):
        raise ConfigError("seed", cfg.seed, "an integer")
    bs = cfg.get("batch_size")
    if not isinstance(bs, int) or bs < 1:
        raise ConfigError("batch_size", bs, "an integer >= 1")
    Recipe.from_config(cfg.model.get("train"))
    if str(cfg.get("checks", "quick")) not in LEVELS:
        raise ConfigError("checks", cfg.get("checks"), LEVELS)


TASKS = ("evaluate", "linearize")


def task_of(cfg: DictConfig) -> str:
    """The run's ``task`` (evaluate when absent), checked against ``TASKS``."""
    task = cfg.get("task", "evaluate")
    if task not in TASKS:
        raise ConfigError("task", task, TASKS)
    return str(task)
