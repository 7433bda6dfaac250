"""Entry point in the repository: ``python run.py attack=<name> defense=<name> model=<name> data=<name> [...]``.

The same command as the installed ``robustbench-lab`` (``robustbench_lab.cli``), with outputs, cache and data
kept below the repository (``ROBUSTBENCH_LAB_ROOT``) rather than the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("ROBUSTBENCH_LAB_ROOT", str(Path(__file__).resolve().parent))

from robustbench_lab.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
