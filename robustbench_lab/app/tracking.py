"""Experiment tracking: Weights & Biases (offline by default) or nothing.

What an evaluation run logs (``docs/tracking.md``): the training curves per epoch, each stage against its
own ``<stage>/epoch`` step (live while the model trains, or once from the checkpoint's sidecar when it came
from the cache); the checkpoint (artifact type ``model``) and ``per_example.parquet`` (type ``results``);
the headline metrics in the run's summary. A cell restored from the cell store gets a run of its own, tagged
``restored``, whose summary names the run that computed it.

W&B problems never lose local results: every W&B call is guarded, failures become warnings, and the run
is always finished (``wandb.finish``) so the next job of a multirun starts clean.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from robustbench_lab.core.cache import CheckpointCache, sha256_file
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.train import epoch_records

log = logging.getLogger(__name__)

HEADLINE = ("clean_accuracy", "robust_accuracy", "attack_success_rate", "median_l2", "median_linf",
            "grad_evals_per_example")
CURVE_NAMES = {"train_loss": "loss", "train_accuracy": "accuracy"}   # history columns under their W&B names
RESTORED_FIELDS = ("restored_from_cell", "restored_from_run", "restored_from_wandb_run")


class NullTracker:
    name = "none"
    url: str | None = None

    def start(self, **_: Any) -> None: ...
    def log_metrics(self, metrics: dict[str, Any]) -> None: ...
    def log_table(self, key: str, df: pd.DataFrame) -> None: ...
    def log_image(self, key: str, path: Path) -> None: ...
    def log_epoch(self, record: dict[str, Any]) -> None: ...
    def log_checkpoint(self, info: dict[str, Any]) -> None: ...
    def log_results(self, metrics: dict[str, Any], run_dir: Path) -> None: ...
    def log_restored(self, metrics: dict[str, Any]) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class WandbTracker(NullTracker):
    name = "wandb"

    def __init__(self, project: str = "robustbench_lab", mode: str = "offline", entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, max_table_rows: int = 10000) -> None:
        self.project, self.mode, self.entity = project, mode, entity
        self.group, self.tags = group, list(tags or [])
        self.max_table_rows = max_table_rows
        self.run = None
        self._stages: set[str] = set()

    def _guard(self, what: str, fn, *a, **kw):
        if self.run is None and what != "init":
            return None
        try:
            return fn(*a, **kw)
        except Exception as e:  # W&B must never break a run
            warnings.warn(f"W&B {what} failed ({type(e).__name__}: {e}); local results are unaffected")
            return None

    def start(self, *, config: dict[str, Any], run_dir: Path, name: str, group: str | None = None,
              tags: list[str] | None = None, job_type: str = "eval") -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError:
            warnings.warn("logger=wandb but wandb is not installed; continuing without it")
            return
        self._wandb = wandb
        self.run = self._guard("init", wandb.init, project=self.project, entity=self.entity, mode=self.mode,
                               group=group or self.group, tags=sorted(set(self.tags + list(tags or []))),
                               name=name, config=config, dir=str(run_dir), job_type=job_type,
                               settings=wandb.Settings(console="off", x_disable_stats=True))
        if self.run is not None:
            log.info("W&B run %s (%s mode) in %s", getattr(self.run, "id", "?"), self.mode, run_dir / "wandb")

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool)) and not isinstance(v, bool)}
        self._guard("log", lambda: (self.run.log(flat), self.run.summary.update(flat)))

    def log_table(self, key: str, df: pd.DataFrame) -> None:
        self._guard("table", lambda: self.run.log({key: self._wandb.Table(dataframe=wandb_safe(
            df.head(self.max_table_rows)))}))

    def log_image(self, key: str, path: Path) -> None:
        self._guard("image", lambda: self.run.log({key: self._wandb.Image(str(path))}))

    def log_epoch(self, record: dict[str, Any]) -> None:
        """One training epoch (a ``core.train.epoch_records`` record) as ``<stage>/loss``, ``/accuracy``,
        ``/val_accuracy``, ``/lr``, ... against the step metric ``<stage>/epoch``."""
        prefix = stage_prefix(str(record.get("stage", "train")))
        if prefix not in self._stages and self.run is not None:
            self._stages.add(prefix)
            self._guard("define_metric", lambda: (self.run.define_metric(f"{prefix}/epoch"),
                                                  self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/epoch")))
        row = {f"{prefix}/{CURVE_NAMES.get(k, k)}": v for k, v in record.items() if k != "stage" and _number(v)}
        self._guard("log", lambda: self.run.log(row))

    def log_checkpoint(self, info: dict[str, Any]) -> None:
        """The run's checkpoint (``load_model``'s record: ``checkpoint`` path, ``cache_hit``, and where present
        ``checkpoint_source``) as a ``model`` artifact with its cache key and SHA-256; when it came from the
        cache, its training curves, once.

        Added in place (policy immutable): cache entries are content-addressed and never rewritten, and a
        copy of every checkpoint per run would fill the disk; sync before the cache is cleared."""
        if self.run is None or not info.get("checkpoint"):
            return
        path, hit = Path(info["checkpoint"]), info.get("cache_hit")
        meta = (CheckpointCache(path.parent).meta(path.stem) or {}) if hit is not None else {}
        source = info.get("checkpoint_source") or ("file" if hit is None else "cache" if hit else "trained")
        if hit:
            for record in meta.get("epochs") or epoch_records(meta.get("history") or {}, "train"):
                self.log_epoch(record)
        key = meta.get("key")
        digest = meta.get("sha256") or self._guard("sha256", sha256_file, path)
        self._guard("summary", lambda: self.run.summary.update({
            "checkpoint/source": source, "checkpoint/key": key, "checkpoint/sha256": digest,
            "train/from_cache": bool(hit)}))
        self._guard("tags", lambda: setattr(self.run, "tags", tuple(self.run.tags or ()) + (f"checkpoint:{source}",)))

        def log() -> None:
            art = self._wandb.Artifact(f"checkpoint-{key or str(digest)[:20]}", type="model", metadata={
                "cache_key": key, "sha256": digest, "source": source, "path": str(path), "spec": meta.get("spec"),
                "test_accuracy": meta.get("test_accuracy"), "train_seconds": meta.get("train_seconds")})
            art.add_file(str(path), policy="immutable")
            self.run.log_artifact(art)
        self._guard("model artifact", log)

    def log_results(self, metrics: dict[str, Any], run_dir: Path) -> None:
        """The headline metrics into the run's summary (null where undefined, as in ``metrics.json``) and
        ``per_example.parquet`` as a ``results`` artifact."""
        headline = {k: _plain(metrics.get(k)) for k in HEADLINE}
        self._guard("summary", lambda: self.run.summary.update(headline))
        path = Path(run_dir) / "per_example.parquet"
        if self.run is None or not path.is_file():
            return

        def log() -> None:
            art = self._wandb.Artifact(f"per_example-{self.run.id}", type="results", metadata={
                **headline, **{k: _plain(metrics.get(k)) for k in ("dataset", "model", "defense", "attack", "norm",
                                                                   "eps", "n_examples", "seed")}})
            art.add_file(str(path), policy="immutable")   # the run directory is final once committed
            self.run.log_artifact(art)
        self._guard("results artifact", log)

    def log_restored(self, metrics: dict[str, Any]) -> None:
        """A cell restored from the cell store: its stored numbers and where they were computed."""
        fields = {k: metrics.get(k) for k in RESTORED_FIELDS}
        self._guard("summary", lambda: self.run.summary.update({
            **{k: _plain(v) for k, v in metrics.items() if _number(v)},
            **{k: _plain(metrics.get(k)) for k in HEADLINE}, "restored": True, **fields}))

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            warnings.warn(f"W&B finish failed ({e}); local results are unaffected")
        finally:
            self.run = None


def wandb_safe(df: pd.DataFrame) -> pd.DataFrame:
    """The table with every object column of mixed value types (e.g. a notes column of None and strings, or
    numbers and strings) as strings ("" for missing): W&B infers one type per column from its values and
    rejects the table otherwise. Numeric and single-typed columns are left as they are."""
    out = df.copy()
    for c in out.columns:
        if isinstance(out[c].dtype, pd.api.extensions.ExtensionDtype) and out[c].isna().any():
            out[c] = out[c].astype(float)   # a nullable integer column (targets): W&B takes NaN, not pd.NA
            continue
        if out[c].dtype != object:
            continue
        kinds = {type(v) for v in out[c] if v is not None and not (isinstance(v, float) and v != v)}
        if len(kinds) > 1 or (kinds and len(kinds) == 1 and out[c].isna().any()):
            out[c] = ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in out[c]]
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plain(v: Any) -> Any:
    """A value as ``metrics.json`` holds it: NaN as null."""
    return None if isinstance(v, float) and math.isnan(v) else v


def stage_prefix(stage: str) -> str:
    """The W&B key prefix of a training stage (the loop's ``desc``): ``train epoch`` -> ``train``,
    ``ACL simclr pre-training`` -> ``acl_simclr_pre-training``."""
    s = stage.strip().lower().removesuffix(" epoch")
    return re.sub(r"[^a-z0-9_.-]+", "_", s).strip("_") or "train"


def sweep_group(sweep_dir: str | Path, experiment: str | None = None) -> str:
    """The W&B group of a sweep: its date and time (the sweep folder ``<date>/<time>``) and, for a named
    study, the experiment's name, so groups do not recur across days."""
    p = Path(sweep_dir)
    name = f"{p.parent.name}_{p.name}" if p.parent.name else p.name
    return f"{name}_{experiment}" if experiment and experiment not in ("null", "None") else name


def run_name(base: str, overrides: list[str] | None) -> str:
    """A run's W&B name: ``base`` and the swept values of its job (its dotted overrides, e.g.
    ``attack.steps=10``; paths and Hydra's own settings left out)."""
    swept = [o for o in overrides or [] if "." in o.split("=", 1)[0]
             and not o.lstrip("+~").startswith(("hydra.", "paths.", "logger."))]
    return f"{base} [{' '.join(swept)}]" if swept else base


def run_identity(cfg: Any, overrides: list[str] | None, attack_names: list[str] | None = None,
                 attack_label: str | None = None) -> dict[str, Any]:
    """An evaluation run's W&B ``name``, ``group`` and ``tags`` (``attack:``, ``defense:``, ``model:``,
    ``data:``), from its config and attacks; the same for the run that computed a cell and one restoring it."""
    label = attack_label or str(cfg.attack.name)
    return {"name": run_name(f"{label}-{cfg.defense.name}-{cfg.model.name}-s{cfg.seed}", overrides),
            "group": cfg.logger.get("group") if cfg.get("logger") else None,
            "tags": [f"attack:{a}" for a in attack_names or [label]] + [
                f"defense:{cfg.defense.name}", f"model:{cfg.model.name}", f"data:{cfg.data.name}"]}


def wandb_run_ids(run_dir: Path) -> list[str]:
    """The ids of the W&B runs written into ``run_dir`` (``wandb/[offline-]run-<date>_<time>-<id>``), oldest
    first."""
    runs = sorted((p.name for p in (Path(run_dir) / "wandb").glob("*run-*-*") if p.is_dir()),
                  key=lambda n: n.removeprefix("offline-"))
    return [n.rsplit("-", 1)[1] for n in runs]


def log_restored(cfg: Any, run_dir: Path, metrics: dict[str, Any], overrides: list[str] | None) -> None:
    """Mark a cell restored from the cell store with a run of its own (tag ``restored``; the summary holds its
    stored headline metrics and ``restored_from_cell``/``_run``/``_wandb_run``), so it is not silently absent
    from the project. Nothing with ``logger=none``."""
    tracker = make_tracker(cfg.get("logger"))
    if isinstance(metrics.get("attacks"), list):
        identity = run_identity(cfg, overrides, [str(a) for a in metrics["attacks"]], metrics.get("attack"))
    else:   # task=linearize: no attacks to name the run by
        identity = {"name": run_name(f"linearize-{cfg.model.name}-{cfg.data.name}-s{cfg.seed}", overrides),
                    "group": cfg.logger.get("group") if cfg.get("logger") else None, "job_type": "linearize",
                    "tags": ["task:linearize", f"model:{cfg.model.name}", f"data:{cfg.data.name}"]}
    tracker.start(config=OmegaConf.to_container(cfg, resolve=True), run_dir=run_dir,
                  **{**identity, "name": f"{identity['name']} (restored)", "tags": [*identity["tags"], "restored"]})
    try:
        tracker.log_restored(metrics)
    finally:
        tracker.finish(0)


def make_tracker(cfg: Any) -> NullTracker:
    name = cfg.get("name", "none") if cfg is not None else "none"
    if name == "none":
        return NullTracker()
    if name == "wandb":
        return WandbTracker(project=cfg.get("project", "robustbench_lab"), mode=cfg.get("mode", "offline"),
                            entity=cfg.get("entity"), group=cfg.get("group"), tags=list(cfg.get("tags") or []))
    raise ConfigError("logger.name", name, ["wandb", "none"])
