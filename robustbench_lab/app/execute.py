"""One cell of a run or a sweep: resumption from the cell store, the task, and failure capture."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from robustbench_lab.app.cells import CellStore, cell_key
from robustbench_lab.app.evaluate import run_evaluation
from robustbench_lab.app.linearize import run_linearize
from robustbench_lab.app.tracking import log_restored
from robustbench_lab.app.validate import task_of
from robustbench_lab.core.cache import atomic_write_text

log = logging.getLogger(__name__)


def run_task(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the config's task (``evaluate``, or ``linearize``: the ResNet linearization analysis) into
    ``run_dir``. Returns the metrics."""
    if task_of(cfg) == "linearize":
        return run_linearize(cfg, Path(run_dir))
    return run_evaluation(cfg, run_dir, overrides)


def execute(cfg: DictConfig, run_dir: Path, multirun: bool = False, overrides: list[str] | None = None) -> float:
    """Run one cell with resumption and failure capture. Returns robust accuracy (NaN for a failed cell);
    for ``task=linearize``, the run's ``objective`` (robustbench_lab.app.linearize).

    A cell already finished (same config key in ``paths.cells_dir``) is restored into ``run_dir`` unless
    ``resume=false``. A failure writes ``failed.json`` into ``run_dir``; in a multirun it is logged and the
    sweep goes on, in a single run it is raised (non-zero exit).
    """
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    log.info("output directory: %s", run_dir)
    task = task_of(cfg)
    key = cell_key(cfg)
    store = CellStore(cfg.paths.cells_dir)
    if cfg.get("resume", True) and store.done(key):
        m = store.restore(key, run_dir)   # None: the stored cell was damaged and is removed; recompute it
        if m is not None:
            log.info("cell %s already finished: restored its results (resume=false recomputes)", key)
            log_restored(cfg, run_dir, m, overrides)
            if task == "linearize":
                print(f"[cell {key} done before] linearization | results in {run_dir}")
                return float(m.get("objective", float("nan")))
            print(f"[cell {key} done before] robust accuracy {m['robust_accuracy']:.4f} | results in {run_dir}")
            return float(m["robust_accuracy"])
    try:
        metrics = run_task(cfg, run_dir, overrides)
    except Exception as e:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "failed.json", json.dumps({
            "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
            "overrides": " ".join(overrides or []), "cell": key}, indent=2))
        if multirun:
            log.error("job failed (%s: %s); the sweep goes on. Details: %s", type(e).__name__, e, run_dir / "failed.json")
            return float("nan")
        raise
    store.put(key, run_dir, cfg)
    if task == "linearize":
        print(f"linearization of {metrics['model']} ({metrics['n_units']} units, boundary {metrics['boundary']}) | "
              f"results in {run_dir}")
        return float(metrics.get("objective", float("nan")))
    print(f"clean accuracy {metrics['clean_accuracy']:.4f} | robust accuracy {metrics['robust_accuracy']:.4f} "
          f"({metrics['attack']}, {metrics['norm']}, eps={metrics['eps']}) | results in {run_dir}")
    return float(metrics["robust_accuracy"])
