"""Experiment tracking: Weights & Biases (offline by default) or nothing.

W&B problems never lose local results: every W&B call is guarded, failures become warnings, and the run
is always finished (``wandb.finish``) so the next job of a multirun starts clean.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from robustbench_lab.core.errors import ConfigError

log = logging.getLogger(__name__)


class NullTracker:
    name = "none"
    url: str | None = None

    def start(self, **_: Any) -> None: ...
    def log_metrics(self, metrics: dict[str, Any]) -> None: ...
    def log_table(self, key: str, df: pd.DataFrame) -> None: ...
    def log_image(self, key: str, path: Path) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class WandbTracker(NullTracker):
    name = "wandb"

    def __init__(self, project: str = "robustbench_lab", mode: str = "offline", entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, max_table_rows: int = 10000) -> None:
        self.project, self.mode, self.entity = project, mode, entity
        self.group, self.tags = group, list(tags or [])
        self.max_table_rows = max_table_rows
        self.run = None

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
        if out[c].dtype != object:
            continue
        kinds = {type(v) for v in out[c] if v is not None and not (isinstance(v, float) and v != v)}
        if len(kinds) > 1 or (kinds and len(kinds) == 1 and out[c].isna().any()):
            out[c] = ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in out[c]]
    return out


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


def make_tracker(cfg: Any) -> NullTracker:
    name = cfg.get("name", "none") if cfg is not None else "none"
    if name == "none":
        return NullTracker()
    if name == "wandb":
        return WandbTracker(project=cfg.get("project", "robustbench_lab"), mode=cfg.get("mode", "offline"),
                            entity=cfg.get("entity"), group=cfg.get("group"), tags=list(cfg.get("tags") or []))
    raise ConfigError("logger.name", name, ["wandb", "none"])
