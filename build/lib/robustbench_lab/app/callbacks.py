"""Hydra callbacks: aggregate a multirun into one comparison when it ends."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from robustbench_lab.app.report import aggregate, collect
from robustbench_lab.app.tracking import WandbTracker, sweep_group

log = logging.getLogger(__name__)


def _experiment(config: DictConfig) -> str | None:
    """The experiment chosen for the sweep (``experiment=<study>``), as Hydra recorded it, or None."""
    return OmegaConf.select(config, "hydra.runtime.choices.experiment", default=None)


class AggregateOnMultirunEnd(Callback):
    """Writes comparison.csv/.md/.tex and plots into the sweep directory after the last job."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        if config.get("task", "evaluate") != "evaluate":   # the comparison tables are of evaluations
            log.info("task=%s sweep: no evaluation comparison (each run has its own summary.md)", config.task)
            return
        written = aggregate([sweep_dir], sweep_dir)
        _, failed = collect([sweep_dir])
        log.info("sweep comparison: %s", written["md"])
        print(f"sweep comparison written to {written['md']}")
        self._log_to_wandb(config, sweep_dir, written)
        if len(failed):
            log.error("%d cell(s) failed; see %s (re-launch the same sweep to re-run only those)",
                      len(failed), written["md"])

    @staticmethod
    def _log_to_wandb(config: DictConfig, sweep_dir: Path, written: dict) -> None:
        """The sweep's comparison as its own W&B run (job_type 'comparison', same group as the jobs)."""
        lg = config.get("logger")
        if lg is None or lg.get("name") != "wandb":
            return
        import pandas as pd

        t = WandbTracker(project=lg.get("project", "robustbench_lab"), mode=lg.get("mode", "offline"),
                         entity=lg.get("entity"), tags=list(lg.get("tags") or []))
        t.start(config={"sweep_dir": str(sweep_dir)}, run_dir=sweep_dir, name=f"comparison-{sweep_dir.name}",
                group=lg.get("group") or sweep_group(sweep_dir, _experiment(config)), tags=["comparison"],
                job_type="comparison")
        try:
            t.log_table("comparison", pd.read_csv(written["csv"]))
            for key, p in written.items():
                if str(p).endswith(".png"):
                    t.log_image(key, p)
        finally:
            t.finish(0)


class StudyTableOnMultirunEnd(Callback):
    """Base of a study's own end-of-sweep table (experiments/*: ACL variants, neural-guidance hierarchy).

    Subclasses set ``what`` (a label), ``script`` (the by-hand command's script) and ``expected`` (exceptions
    that mean "nothing to tabulate", reported in one line), and implement ``write(sweep, config)`` returning
    the written table's path. Any other failure is printed with its traceback and the by-hand command, and
    never stops the sweep's other callbacks (the generic comparison): the runs themselves are intact.
    """

    what = "study table"
    script = ""
    expected: tuple[type[BaseException], ...] = ()

    def write(self, sweep: Path, config: Any) -> Path:
        raise NotImplementedError   # each study's subclass writes its own table

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if not sweep.exists():
            return
        try:
            md = self.write(sweep, config)
        except self.expected as e:
            print(f"{self.what} not written: {e}", file=sys.stderr)
            return
        except Exception:
            traceback.print_exc()
            print(f"{self.what} FAILED; the runs are intact, retry by hand: python {self.script} {sweep}",
                  file=sys.stderr)
            return
        print(f"{self.what} written to {md}")
