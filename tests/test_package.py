"""The package installs anywhere: a wheel built from the repository, installed into a fresh virtual
environment, gives a console command that runs from another directory with the configs it ships, and writes
its outputs below the current directory (never into the package)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT, fashion_available


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


@pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")
def test_wheel_installs_and_its_console_command_runs_elsewhere(tmp_path):
    wheels = tmp_path / "wheels"
    # built from a copy, so the build leaves nothing (build/, *.egg-info) in the repository
    src = tmp_path / "src"
    top_only = {".git", ".venv", "outputs", ".cache", "build", "data", "wandb", "multirun"}   # not conf/data

    def skip(folder: str, names: list[str]) -> set[str]:
        here = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        return here | (top_only & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, src, ignore=skip)
    p = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
              str(src)])
    assert p.returncode == 0, p.stderr[-3000:]
    (whl,) = wheels.glob("robustbench_lab-*.whl")
    # a fresh environment; its dependencies (torch, hydra, ...) are this environment's, reached through a
    # .pth line, so the test installs nothing from a registry and sees only the wheel's own files
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    vpy = venv / "bin" / "python"
    site = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = _run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--no-index", "-q", str(whl)])
    assert p.returncode == 0, p.stderr[-3000:]
    where = _run([str(vpy), "-c", "import robustbench_lab, attacks, defenses; print(robustbench_lab.__file__)"],
                 cwd=tmp_path)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr   # not the repository's copy

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTBENCH_LAB_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    p = _run([str(venv / "bin" / "robustbench-lab"), "model=small_cnn", "model.train.max_train=1000",
              "model.train.epochs=1", "data.n_eval=32", "data.n_val=100", "attack=fgsm", "logger=none",
              "checks=none", "progress=false"], cwd=work, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    (metrics,) = (work / "outputs" / "runs").rglob("metrics.json")
    m = json.loads(metrics.read_text())
    assert m["attack"] == "fgsm" and 0 <= m["robust_accuracy"] <= m["clean_accuracy"]
    assert (work / ".cache" / "checkpoints").is_dir()                     # the cache below the current directory
    assert not list(site.rglob("outputs")) and not list(site.rglob(".cache"))   # nothing written into the package
    # the user's own config folder joins the package's (Hydra's --config-dir)
    mine = tmp_path / "my_conf" / "attack"
    mine.mkdir(parents=True)
    (mine / "fgsm_small.yaml").write_text("_target_: attacks.fgsm.FGSM\nname: fgsm_small\nnorm: linf\neps: 0.01\n")
    p = _run([str(venv / "bin" / "robustbench-lab"), "--config-dir", str(tmp_path / "my_conf"), "attack=fgsm_small",
              "model=small_cnn", "model.train.max_train=1000", "model.train.epochs=1", "data.n_eval=32",
              "data.n_val=100", "logger=none", "checks=none", "progress=false"], cwd=work, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "fgsm_small" in p.stdout and "cell" not in p.stdout.split("fgsm_small")[0][-20:]
