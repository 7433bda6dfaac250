"""The command line: ``robustbench-lab attack=<name> defense=<name> model=<name> data=<name> [overrides]``
(installed console command), or ``python run.py ...`` in the repository.

Hydra composes the config from the package's own ``conf/`` (add your config folder with ``--config-dir``);
``app.execute`` runs the cell (resumable, failures captured in a multirun) and returns the robust accuracy,
the value a Hydra sweeper optimizes. Outputs, cache and data go below the current directory, or where
``ROBUSTBENCH_LAB_ROOT`` / ``ROBUSTBENCH_LAB_CACHE`` / ``ROBUSTBENCH_LAB_DATA`` point; never into the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from robustbench_lab.app.execute import execute  # importing the app registers the config schemas
from robustbench_lab.app.tracking import sweep_group

# config groups that moved (old -> new): the old spelling stops with the new one named, before Hydra runs
RENAMED_GROUPS = {"neural_guidance_arm": "defense/neural_guidance_arm"}


def check_renamed_groups(argv: list[str]) -> None:
    for arg in argv:
        group = arg.lstrip("+~").split("=", 1)[0]
        if group in RENAMED_GROUPS:
            raise SystemExit(f"error: config group '{group}' is now '{RENAMED_GROUPS[group]}': "
                             f"write {arg.replace(group, RENAMED_GROUPS[group], 1)}")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun and cfg.get("logger") is not None and cfg.logger.get("group") is None:
        with open_dict(cfg):
            cfg.logger.group = sweep_group(hc.sweep.dir, hc.runtime.choices.get("experiment"))   # one per sweep
    return execute(cfg, Path(hc.runtime.output_dir), multirun=multirun, overrides=list(hc.overrides.task))


def main() -> None:
    check_renamed_groups(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
