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

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robustbench_lab.app.builders import (build_attacks, build_defense, build_model, check_model_config,
                                          load_model)
from robustbench_lab.app.cells import config_hash, settings
from robustbench_lab.app.checks import report as checks_report
from robustbench_lab.app.checks import run_checks
from robustbench_lab.app.tracking import make_tracker, run_name
from robustbench_lab.app.validate import validate
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.attack_base import MINIMIZATION
from robustbench_lab.core.device import resolve_device
from robustbench_lab.core.evaluator import evaluate, robust_accuracy_curve, summarize
from robustbench_lab.core.norms import Norm
from robustbench_lab.core.results import ResultWriter, plot_curve, plot_examples, summary_markdown
from robustbench_lab.core.recipe import Recipe

log = logging.getLogger(__name__)


def run_evaluation(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one evaluation into ``run_dir``. Returns the metrics (also written as ``metrics.json``, last).
    ``overrides``: the command-line overrides that made this run (recorded with the results)."""
    t_start = time.time()
    run_dir = Path(run_dir)
    validate(cfg)
    device = resolve_device(cfg.device)
    attacks, eps, attack_label = build_attacks(cfg)
    defense = build_defense(cfg.defense)
    recipe = Recipe.from_config(cfg.model.get("train"))
    tracker = make_tracker(cfg.get("logger"))
    tracker.start(config=OmegaConf.to_container(cfg, resolve=True), run_dir=run_dir,
                  name=run_name(f"{attack_label}-{cfg.defense.name}-{cfg.model.name}-s{cfg.seed}", overrides),
                  group=cfg.logger.get("group") if cfg.get("logger") else None,
                  tags=[f"attack:{a.name}" for a in attacks] + [f"defense:{cfg.defense.name}", f"model:{cfg.model.name}",
                        f"data:{cfg.data.name}"])
    exit_code = 1
    try:
        metrics = _evaluate(cfg, run_dir, device, attacks, attack_label, eps, defense, recipe, tracker, t_start,
                            overrides)
        exit_code = 0
        return metrics
    finally:
        tracker.finish(exit_code)


def _evaluate(cfg, run_dir, device, attacks, attack_label, eps, defense, recipe, tracker, t_start,
              overrides) -> dict[str, Any]:
    attack = attacks[-1]
    torch.manual_seed(int(cfg.seed))
    check_model_config(cfg)
    splits = data_mod.load_splits(cfg.data.name, cfg.data.root, bool(cfg.data.download), int(cfg.data.n_val),
                                  int(cfg.data.n_eval), int(cfg.data.split_seed))
    model, ckpt_info = load_model(cfg, device, defense, recipe, splits)
    writer = ResultWriter(run_dir)
    defended = defense.transform(model, {"splits": splits, "device": device, "cfg": cfg, "run_dir": run_dir,
                                         "writer": writer, "seed": int(cfg.seed),
                                         "cache_dir": Path(cfg.paths.cache_dir)})
    defended.to(device).eval()

    x = data_mod.to_float(splits.x_eval).to(device)
    y = splits.y_eval.to(device)
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    ev = evaluate(defended, x, y, attacks, eps, gen, batch_size=int(cfg.batch_size),
                  indices=splits.eval_indices.tolist())
    summ = summarize(ev, attacks, eps)
    t_chk = time.time()
    check_gen = torch.Generator(device=device).manual_seed(int(cfg.seed) + 1_000_003)
    chk = checks_report(run_checks(defended, x, y, attacks, eps, ev.robust, ev.x_adv, ev.n_nan,
                                   str(cfg.get("checks", "quick")), check_gen, int(cfg.batch_size),
                                   table=ev.table))
    chk["checks_seconds"] = time.time() - t_chk
    metrics: dict[str, Any] = {
        "dataset": cfg.data.name, "model": cfg.model.name, "defense": cfg.defense.name, "attack": attack_label,
        "norm": attack.norm.value, "eps": eps, **summ, "seed": int(cfg.seed), "device": str(device),
        "attacks": [a.name for a in attacks], "attack_config": {a.name: a.config() for a in attacks},
        "per_attack": {a.name: {**ev.attack_counts[a.name], "seconds": ev.attack_seconds[a.name]} for a in attacks},
        "defense_config": defense.describe(), **ckpt_info,
        "torch_version": torch.__version__, "python": platform.python_version(),
        "pid": os.getpid(), "started_at": t_start, **chk,
        "overrides": list(overrides or []), "settings": settings(cfg),
        "attack_config_hash": config_hash(cfg.attack), "defense_config_hash": config_hash(cfg.defense),
    }

    table = ev.table
    writer.write_table("per_example", table)
    writer.write_json("eval_indices.json", {"dataset": cfg.data.name, "split": "test",
                                            "indices": splits.eval_indices.tolist()})
    extra_sections = []
    if all(a.family == MINIMIZATION for a in attacks):
        pe = ev.per_example()
        norms = np.where(pe["broken_by"].notna(), pe["linf" if attack.norm is Norm.LINF else "l2"], np.inf)
        finite = norms[np.isfinite(norms)]
        top = float(np.quantile(finite, 0.99)) * 1.1 if finite.size else 1.0
        grid = np.linspace(0, top, 41)
        curve = robust_accuracy_curve(norms, pe["clean_correct"].to_numpy(), grid)
        writer.write_csv("robust_accuracy_curve.csv", curve)
        plot_curve(writer.path("robust_accuracy_curve.png"), curve,
                   f"{attack_label} on {cfg.model.name}/{cfg.data.name}", f"epsilon ({attack.norm.value})")
        extra_sections.append("Robust accuracy vs epsilon (from minimal norms): robust_accuracy_curve.csv/.png")
    pe = ev.per_example()
    sel = np.array(pe.index[pe["broken_by"].notna()].to_numpy()[:8])
    if sel.size == 0:
        sel = np.arange(min(8, len(pe)))
    plot_examples(writer.path("examples.png"), x[sel].cpu(), ev.x_adv[sel].cpu(), pe["label"].to_numpy()[sel],
                  pe["clean_pred"].to_numpy()[sel],
                  np.where(pe["broken_by"].notna(), pe["adv_pred"], pe["clean_pred"]).astype(int)[sel],
                  splits.card.class_names)
    metrics["seconds"] = time.time() - t_start
    metrics["finished_at"] = time.time()
    writer.write_text("summary.md", summary_markdown(metrics, extra_sections))
    final = writer.commit(metrics)
    tracker.log_metrics({f"clean/accuracy": metrics["clean_accuracy"], "robust/accuracy": metrics["robust_accuracy"],
                         **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
    tracker.log_table("per_example", table)
    for name in ("examples.png", "robust_accuracy_curve.png"):
        if (run_dir / name).is_file():
            tracker.log_image(name.split(".")[0], run_dir / name)
    log.info("results: %s", final.parent)
    return metrics
