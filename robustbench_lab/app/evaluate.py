"""The evaluate task: config -> data -> model (trained or cached) -> defense -> attacks -> checks -> results.

``run_evaluation(cfg, run_dir)`` is a plain function (no Hydra inside), so tests and other entry points can
call it with a composed config; ``app.execute`` wraps it with resumable cells and failure capture.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from robustbench_lab.app.builders import (CONF_DIR, attack_from_name, build_attacks, build_defense, check_model_config,
                                          check_target_classes, load_model, targetable_attacks)
from robustbench_lab.app.assess import assess, finish, write_assessment
from robustbench_lab.app.cells import config_hash, settings
from robustbench_lab.app.curve import needs_curve, robustness_curve
from robustbench_lab.app.tracking import make_tracker, run_identity
from robustbench_lab.app.validate import validate
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.attack_base import Attack
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.device import resolve_device
from robustbench_lab.core.progress import Progress
from robustbench_lab.core.results import ResultWriter
from robustbench_lab.core.recipe import Recipe

log = logging.getLogger(__name__)

STAGES = ("data", "model", "defense", "attacks", "checks", "report")   # one banner each, in this order


def run_evaluation(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one evaluation into ``run_dir``. Returns the metrics (also written as ``metrics.json``, last).
    ``overrides``: the command-line overrides that made this run (recorded with the results)."""
    t_start = time.time()
    run_dir = Path(run_dir)
    validate(cfg)
    device = resolve_device(cfg.device)
    attacks, eps, attack_label = build_attacks(cfg)
    # a target class the model does not have fails here, before any data is read
    check_target_classes(attacks, int(cfg.model.get("num_classes") or data_mod.get_card(cfg.data.name).num_classes))
    curve_attack = build_curve_attack(cfg, attacks)
    defense = build_defense(cfg.defense)
    recipe = Recipe.from_config(cfg.model.get("train"))
    tracker = make_tracker(cfg.get("logger"))
    tracker.start(config=OmegaConf.to_container(cfg, resolve=True), run_dir=run_dir,
                  **run_identity(cfg, overrides, [a.name for a in attacks], attack_label))
    exit_code = 1
    try:
        metrics = _evaluate(cfg, run_dir, device, attacks, attack_label, eps, defense, recipe, tracker, t_start,
                            overrides, curve_attack)
        exit_code = 0
        return metrics
    finally:
        tracker.finish(exit_code)


def build_curve_attack(cfg: DictConfig, attacks: list[Attack]) -> Attack | str | None:
    """The ``curve`` attack (a minimization attack's config name) in the run's norm and mode (targeted
    runs: towards the same targets), or None (no ``curve``, or the run's attacks already give the curve).
    In a targeted run an untargeted curve attack is skipped: the string returned instead says why."""
    name = cfg.get("curve")
    if not name:
        return None
    minimal = sorted(p.stem for p in (CONF_DIR / "attack").glob("*.yaml") if OmegaConf.load(p).get("eps", 0) is None)
    if str(name) not in minimal:   # fixed-epsilon configs carry an eps; minimization ones have eps: null
        raise ConfigError("curve", name, minimal + [None], "the curve comes from a minimization attack's minimal norms")
    spec = next((a.target_spec for a in attacks if a.targeted), None)
    if spec is not None and str(name) not in targetable_attacks():
        if not needs_curve(attack_from_name(str(name), str(cfg.attack.norm), None, "curve")[0], attacks):
            return None
        why = (f"curve skipped: {name} takes no target and this run is targeted (an untargeted curve would not "
               "describe it); minimization attacks that take one: "
               + ", ".join(n for n in minimal if n in targetable_attacks()))
        log.warning(why)
        return why
    shared = {"targeted": True, "target": spec} if spec is not None else {}
    atk, _ = attack_from_name(str(name), str(cfg.attack.norm), None, "curve", **shared)
    return atk if needs_curve(atk, attacks) else None


def _evaluate(cfg, run_dir, device, attacks, attack_label, eps, defense, recipe, tracker, t_start,
              overrides, curve_attack=None) -> dict[str, Any]:
    torch.manual_seed(int(cfg.seed))
    check_model_config(cfg)
    progress = Progress(bool(cfg.get("progress", True)), STAGES)
    splits = data_mod.load_splits(cfg.data.name, cfg.data.root, bool(cfg.data.download), int(cfg.data.n_val),
                                  int(cfg.data.n_eval), int(cfg.data.split_seed))
    progress.stage("data", f"{cfg.data.name} ({len(splits.eval_indices)} test points, split seed "
                   f"{cfg.data.split_seed}; {len(splits.x_train)} train, {len(splits.x_val)} validation)")
    model, ckpt_info = load_model(cfg, device, defense, recipe, splits, on_epoch=tracker.log_epoch)
    tracker.log_checkpoint(ckpt_info)
    progress.stage("model", model_banner(cfg.model.name, ckpt_info))
    t_defense = time.time()
    writer = ResultWriter(run_dir)
    defended = defense.transform(model, {"splits": splits, "device": device, "cfg": cfg, "run_dir": run_dir,
                                         "writer": writer, "seed": int(cfg.seed),
                                         "cache_dir": Path(cfg.paths.cache_dir)})
    defended.to(device).eval()
    progress.stage("defense", defense_banner(cfg.defense.name, defense.describe(), time.time() - t_defense))

    x = data_mod.to_float(splits.x_eval).to(device)
    y = splits.y_eval.to(device)
    a = assess(defended, x, y, attacks, eps, int(cfg.seed), int(cfg.batch_size), str(cfg.get("checks", "quick")),
               indices=splits.eval_indices.tolist(), progress=progress)
    metrics: dict[str, Any] = {
        "dataset": cfg.data.name, "model": cfg.model.name, "defense": cfg.defense.name, "attack": attack_label,
        **a.metrics, "seed": int(cfg.seed), "device": str(device),
        "defense_config": defense.describe(), **ckpt_info,
        "torch_version": torch.__version__, "python": platform.python_version(),
        "pid": os.getpid(), "started_at": t_start,
        "overrides": list(overrides or []), "settings": settings(cfg),
        "attack_config_hash": config_hash(cfg.attack), "defense_config_hash": config_hash(cfg.defense),
    }
    title = f"{attack_label} on {cfg.model.name}/{cfg.data.name}"
    sections = write_assessment(writer, a, metrics, title, cfg.data.name, splits.card.class_names)
    if isinstance(curve_attack, str):   # skipped in a targeted run
        metrics["curve"] = {"attack": cfg.get("curve"), "skipped": curve_attack}
        sections.append(f"## Robust accuracy vs epsilon\n\n{curve_attack[:1].upper()}{curve_attack[1:]}.")
    elif curve_attack is not None:
        metrics["curve"], section = robustness_curve(defended, x, y, curve_attack, eps, int(cfg.seed), int(cfg.batch_size),
                                                     splits.eval_indices.tolist(), writer, title, progress)
        sections.append(section)
    final = finish(writer, metrics, sections, t_start)
    progress.stage("report", f"{final.parent} (metrics.json, summary.md, per_example.parquet; "
                   f"{metrics['seconds']:.0f} s in all)")
    table = a.evaluation.table
    tracker.log_metrics({"clean/accuracy": metrics["clean_accuracy"], "robust/accuracy": metrics["robust_accuracy"],
                         **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
    tracker.log_table("per_example", table)
    for name in ("examples.png", "robust_accuracy_curve.png"):
        if (run_dir / name).is_file():
            tracker.log_image(name.split(".")[0], run_dir / name)
    tracker.log_results(metrics, run_dir)
    log.info("results: %s", final.parent)
    return metrics


def model_banner(name: str, info: dict[str, Any]) -> str:
    """``resnet20 (cache hit, 92.5% test accuracy)``: where the weights came from (``load_model``'s record)."""
    if info.get("cache_hit") is None:
        return f"{name} (weights from {info.get('checkpoint')})"
    acc = info.get("checkpoint_test_accuracy")
    acc_text = f", {acc:.1%} test accuracy" if isinstance(acc, (int, float)) else ""
    if info["cache_hit"]:
        source = info.get("checkpoint_source")   # where the cache entry came from, when not the cache's own training
        extra = f", {source} weights" if source not in (None, "cache", "trained") else ""
        return f"{name} (cache hit{extra}{acc_text})"
    return f"{name} (trained in {info.get('train_seconds') or 0:.0f} s{acc_text})"


def defense_banner(name: str, described: dict[str, Any], seconds: float) -> str:
    """``jumprelu (jump 0.12, jump_mode auto, ...; 240.0 s)``: the defense, its first few scalar settings
    (``Defense.describe``; all of them are in metrics.json) and the time its transform took."""
    values = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in described.items()
              if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    shown = ", ".join(values[:3]) + (", ..." if len(values) > 3 else "")
    return f"{name} ({shown + '; ' if shown else ''}{seconds:.1f} s)"
