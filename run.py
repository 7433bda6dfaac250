"""Entry point: ``python run.py attack=<name> defense=<name> model=<name> data=<name> [overrides]``.

Thin by design: Hydra composes the config, ``robustbench_lab.app.execute.run_task`` does the work and returns the metrics;
the return value (robust accuracy) is what a Hydra sweeper would optimize. ``task=linearize`` runs the
ResNet linearization analysis instead (``robustbench_lab.app.linearize.run_linearize``). Around it: resumable cells (a
finished cell of a re-launched sweep is restored, not recomputed) and, in a multirun, failure capture so one
failing job does not stop the others.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("ROBUSTBENCH_LAB_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from robustbench_lab.app.execute import execute  # noqa: E402  (importing the app registers the config schemas)
from robustbench_lab.app.tracking import sweep_group  # noqa: E402

log = logging.getLogger("robustbench_lab")

# config groups that moved (old -> new): the old spelling stops with the new one named, before Hydra runs
RENAMED_GROUPS = {"neural_guidance_arm": "defense/neural_guidance_arm"}


def check_renamed_groups(argv: list[str]) -> None:
    for arg in argv:
        group = arg.lstrip("+~").split("=", 1)[0]
        if group in RENAMED_GROUPS:
            raise SystemExit(f"error: config group '{group}' is now '{RENAMED_GROUPS[group]}': "
                             f"write {arg.replace(group, RENAMED_GROUPS[group], 1)}")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun and cfg.get("logger") is not None and cfg.logger.get("group") is None:
        with open_dict(cfg):
            cfg.logger.group = sweep_group(hc.sweep.dir, hc.runtime.choices.get("experiment"))   # one per sweep
    return execute(cfg, Path(hc.runtime.output_dir), multirun=multirun,
                   overrides=list(hc.overrides.task))


if __name__ == "__main__":
    check_renamed_groups(sys.argv[1:])
    main()
