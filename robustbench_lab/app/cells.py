"""Resumable sweep cells.

Each run is keyed by a hash of its resolved config minus the fields that cannot change its results (paths,
logger, progress bars, Hydra's own settings). Finished cells are stored, complete or not at all, in a
content-addressed store (``paths.cells_dir``); a re-launched sweep finds them there and copies their results
into the new job directory instead of recomputing them. Failed and missing cells simply run again.

Each stored cell carries ``manifest.json`` (the SHA-256 of every file in it) and ``cell_config.json`` (the
config its key is the hash of); a cell whose files do not match, or whose config does not hash to its key,
is reported, removed and recomputed, never restored. ``origin.json`` names the run directory (and W&B run)
that computed the cell, so a restored run can point at it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from robustbench_lab.app.tracking import wandb_run_ids
from robustbench_lab.core.cache import atomic_write_text, canonical_json, content_key, sha256_file
from robustbench_lab.core.results import METRICS_FILE

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
ORIGIN = "origin.json"

# Classes that moved to another module keep their former import path in the key, so cells stored before the
# move are still found (the path names the same class; it changes no number).
MOVED_TARGETS = {"robustbench_lab.core.defense_base.NoDefense": "robustbench_lab.defense_base.NoDefense",
                 "defenses.jumprelu.defense.JumpReLUDefense": "defenses.jumprelu.JumpReLUDefense"}

# Top-level keys that never change a run's numbers.
IRRELEVANT = ("paths", "logger", "progress", "hydra", "resume", "retrain", "num_threads")
RESULT_FILES = ("metrics.json", "per_example.parquet", "per_example.csv", "summary.md", "examples.png",
                "eval_indices.json", "robust_accuracy_curve.csv", "robust_accuracy_curve.png")


def relevant_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    d = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    assert isinstance(d, dict)
    out = {k: v for k, v in d.items() if k not in IRRELEVANT}
    data = dict(out.get("data") or {})
    data.pop("root", None)       # where the files are does not change them
    data.pop("download", None)
    out["data"] = data
    for group in ("attack", "defense"):
        node = out.get(group)
        if isinstance(node, dict) and node.get("_target_") in MOVED_TARGETS:
            out[group] = {**node, "_target_": MOVED_TARGETS[node["_target_"]]}
    if out.get("task", "evaluate") == "evaluate":   # evaluation cells keep the keys they had before task=
        out.pop("task", None)
        out.pop("linearize", None)
    if out.get("curve") is None:                     # likewise without a curve (curve=null)
        out.pop("curve", None)
    return out


def settings(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The run's results-relevant config flattened to dotted keys (``attack.steps``, ``defense.jump``) with
    scalar values (lists as JSON text): what tells two cells of a sweep apart in its tables."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple)):
            flat[prefix] = json.dumps(node, sort_keys=True)
        else:
            flat[prefix] = node

    walk(relevant_config(cfg), "")
    return flat


def config_hash(node: Any) -> str:
    """A short hash of a resolved config node (the attack's, the defense's)."""
    d = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return content_key(d)[:16]


def result_files(cell_dir: Path) -> tuple[str, ...]:
    """The files a cell holds: the evaluation's, plus any plain file names its metrics.json lists under
    ``result_files`` (a task=linearize run writes other tables and plots)."""
    extra: list[str] = []
    try:
        listed = json.loads((cell_dir / METRICS_FILE).read_text()).get("result_files") or []
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        listed = []
    for name in listed:
        ok = isinstance(name, str) and name and Path(name).name == name   # a plain name, never a path
        if ok and name not in RESULT_FILES + (MANIFEST, "cell_config.json"):
            extra.append(name)
    return RESULT_FILES + tuple(extra)


def cell_key(cfg: DictConfig | dict[str, Any]) -> str:
    return content_key(relevant_config(cfg))


class CellStore:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)

    def path(self, key: str) -> Path:
        return self.dir / key

    def done(self, key: str) -> bool:
        return (self.path(key) / METRICS_FILE).is_file()

    def put(self, key: str, run_dir: Path, cfg: DictConfig | dict[str, Any]) -> Path:
        """Copy a finished run's results into the store, atomically (a complete folder or nothing)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        dst = self.path(key)
        with FileLock(str(self.dir / f"{key}.lock")):
            if self.done(key) and self.verify(key) is None:
                return dst                 # a damaged cell is replaced by this run's results
            tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=f".{key}."))
            try:
                for name in result_files(run_dir):
                    if (run_dir / name).is_file() and name != METRICS_FILE:
                        shutil.copy2(run_dir / name, tmp / name)
                (tmp / "cell_config.json").write_text(canonical_json(relevant_config(cfg)))
                (tmp / ORIGIN).write_text(json.dumps({"run_dir": str(Path(run_dir).resolve()),
                                                      "wandb_runs": wandb_run_ids(run_dir)}, indent=2))
                shutil.copy2(run_dir / METRICS_FILE, tmp / METRICS_FILE)
                (tmp / MANIFEST).write_text(json.dumps(
                    {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}, indent=2, sort_keys=True))
                if dst.exists():
                    shutil.rmtree(dst)
                os.replace(tmp, dst)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return dst

    def verify(self, key: str) -> str | None:
        """None if stored cell ``key`` is intact, else what is wrong with it."""
        src = self.path(key)
        try:
            manifest = json.loads((src / MANIFEST).read_text())
        except FileNotFoundError:
            return f"it has no {MANIFEST} (stored by an older version, or damaged)"
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"its {MANIFEST} is not valid JSON"
        if not isinstance(manifest, dict):
            return f"its {MANIFEST} is not a mapping of file names to hashes"
        present = {p.name for p in src.iterdir() if p.name != MANIFEST}
        if present != set(manifest):
            return f"its files {sorted(present)} are not those of its manifest {sorted(manifest)}"
        for name, digest in sorted(manifest.items()):
            if sha256_file(src / name) != digest:
                return f"{name} does not match the sha256 recorded when the cell was stored"
        try:
            stored_key = content_key(json.loads((src / "cell_config.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return "it has no readable cell_config.json"
        if stored_key != key:
            return f"its cell_config.json is the config of cell {stored_key}, not of {key}"
        return None

    def discard(self, key: str) -> None:
        with FileLock(str(self.dir / f"{key}.lock")):
            shutil.rmtree(self.path(key), ignore_errors=True)

    def restore(self, key: str, run_dir: Path) -> dict[str, Any] | None:
        """Copy a stored cell's results into ``run_dir`` (metrics.json last). Returns its metrics, or None
        when the stored cell is damaged (it is then removed, so the caller recomputes it). The metrics name
        where they come from: ``restored_from_cell``, and the run directory and last W&B run id that computed
        them (``restored_from_run``, ``restored_from_wandb_run``; None for cells stored without ``origin.json``)."""
        src = self.path(key)
        problem = self.verify(key)
        if problem is not None:
            log.warning("stored cell %s is damaged (%s); removing it and recomputing the cell", src, problem)
            self.discard(key)
            return None
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in result_files(src):
            if (src / name).is_file() and name != METRICS_FILE:
                shutil.copy2(src / name, run_dir / name)
        metrics = json.loads((src / METRICS_FILE).read_text())
        metrics["restored_from_cell"] = str(src)
        try:
            origin = json.loads((src / ORIGIN).read_text())   # verified with the manifest above
        except FileNotFoundError:
            origin = {}
        metrics["restored_from_run"] = origin.get("run_dir")
        metrics["restored_from_wandb_run"] = (origin.get("wandb_runs") or [None])[-1]
        atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True))
        with contextlib.suppress(FileNotFoundError):
            (run_dir / "failed.json").unlink()
        return metrics
