"""Sweeps: config-hash cells, resumption after a kill, failure isolation, aggregation, launchers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from robustbench_lab.app.cells import cell_key
from robustbench_lab.app.report import aggregate, collect, summarize

from conftest import ROOT, compose, fashion_available

needs_data = pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")

TINY = ["model=small_cnn", "model.train.max_train=2000", "model.train.epochs=1", "data.n_eval=32",
        "data.n_val=200", "progress=false", "logger=none"]


def test_cell_key_ignores_irrelevant_fields_and_tracks_relevant_ones():
    base = cell_key(compose(TINY))
    assert cell_key(compose(TINY + ["paths.output_dir=/elsewhere", "logger=wandb", "progress=true",
                                    "data.root=/other", "num_threads=1"])) == base
    for change in (["attack.eps=0.05"], ["seed=1"], ["model.train.epochs=2"], ["attack=fgsm"],
                   ["data.n_eval=33"], ["attack.norm=l2"]):
        assert cell_key(compose(TINY + change)) != base, change


def _fake_run(d: Path, **kw) -> None:
    d.mkdir(parents=True)
    m = {"dataset": "fashion_mnist", "model": "m", "defense": "none", "attack": "pgd", "norm": "linf",
         "eps": 0.1, "seed": 0, "clean_accuracy": 0.9, "robust_accuracy": 0.5, "attack_success_rate": 0.4,
         "median_l2": 1.0, "median_linf": 0.1, "mean_rel_l2": 0.1, "grad_evals_per_example": 20,
         "attack_seconds": 1.0, "seconds": 2.0, "n_examples": 10}
    m.update(kw)
    (d / "metrics.json").write_text(json.dumps(m))


def test_aggregation_from_run_directories(tmp_path):
    for s, r in enumerate([0.4, 0.5, 0.6]):
        _fake_run(tmp_path / "sweep" / f"{s}_pgd", seed=s, robust_accuracy=r)
    _fake_run(tmp_path / "other" / "x", attack="fgsm", robust_accuracy=0.7, eps=0.05)
    (tmp_path / "sweep" / "9_bad").mkdir()
    (tmp_path / "sweep" / "9_bad" / "failed.json").write_text(json.dumps({"error": "ValueError: boom"}))
    w = aggregate([tmp_path / "sweep", tmp_path / "other"], tmp_path / "out")
    cells = pd.read_csv(w["csv"])
    assert len(cells) == 4
    summ = pd.read_csv(w["summary"])
    pgd = summ[summ["attack"] == "pgd"].iloc[0]
    assert pgd["n_seeds"] == 3 and abs(pgd["robust_accuracy"] - 0.5) < 1e-12
    # 95% t-interval of (0.4, 0.5, 0.6): t(0.975, 2) * 0.1 / sqrt(3)
    assert abs(pgd["robust_accuracy_ci95"] - 4.302652729911275 * 0.1 / 3 ** 0.5) < 1e-6
    md = w["md"].read_text()
    assert "1 failed" in md and "boom" in md and "fgsm" in md
    assert "\\begin{tabular}" in w["tex"].read_text()
    for k in ("robust_vs_eps", "clean_vs_robust", "cost_vs_size", "seed_spread"):
        assert w[k].stat().st_size > 1000


def test_aggregation_with_minimization_attacks_without_eps(tmp_path):
    """A TR/CW/DeepFool cell run without epsilon (eps None) is scored by its curve; seeds still group."""
    for s, r in enumerate([0.0, 0.1]):
        d = tmp_path / "sweep" / f"{s}_tr"
        _fake_run(d, attack="trust_region", eps=None, seed=s, robust_accuracy=r)
        pd.DataFrame({"eps": [0.0, 0.01, 0.02], "robust_accuracy": [0.9, 0.4, r]}).to_csv(
            d / "robust_accuracy_curve.csv", index=False)
    _fake_run(tmp_path / "sweep" / "2_pgd", robust_accuracy=0.3)
    w = aggregate([tmp_path / "sweep"], tmp_path / "out")
    summ = pd.read_csv(w["summary"])
    tr = summ[summ["attack"] == "trust_region"]
    assert len(tr) == 1 and tr["eps"].isna().all() and tr["n_seeds"].iloc[0] == 2
    assert abs(tr["robust_accuracy"].iloc[0] - 0.05) < 1e-12
    for k in ("robust_vs_eps", "seed_spread"):
        assert w[k].stat().st_size > 1000


def test_report_cli(tmp_path):
    _fake_run(tmp_path / "r")
    p = subprocess.run([sys.executable, "-m", "robustbench_lab.app.report", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "comparison.md").is_file()
    p = subprocess.run([sys.executable, "-m", "robustbench_lab.app.report", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no such run directory" in p.stderr


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "ROBUSTBENCH_LAB_ROOT": str(tmp_path), "ROBUSTBENCH_LAB_CACHE": str(tmp_path / "cache"),
            "HYDRA_FULL_ERROR": "1"}


def _sweep(tmp_path: Path, args: list[str], sweep_name: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", *TINY, *args, f"hydra.sweep.dir={tmp_path}/{sweep_name}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(tmp_path))


@needs_data
def test_multirun_aggregates_isolates_failures_and_resumes(tmp_path):
    p = _sweep(tmp_path, ["attack=fgsm,pgd", "attack.eps=0.05,-1"], "s1")
    assert p.returncode == 0, p.stderr[-3000:]
    sweep = tmp_path / "s1"
    cells, failed = collect([sweep])
    assert len(cells) == 2 and len(failed) == 2           # eps=-1 fails for both attacks, the rest goes on
    assert "attack.eps" in failed["error"].iloc[0]
    assert (sweep / "comparison.md").is_file() and (sweep / "robust_vs_eps.png").is_file()
    # relaunch: finished cells are restored, failed ones run again (and fail again)
    p2 = _sweep(tmp_path, ["attack=fgsm,pgd", "attack.eps=0.05,-1"], "s2")
    assert p2.stdout.count("done before") == 2, p2.stdout
    cells2, failed2 = collect([tmp_path / "s2"])
    assert sorted(cells2["robust_accuracy"]) == sorted(cells["robust_accuracy"]) and len(failed2) == 2


@needs_data
def test_killed_sweep_recomputes_nothing_finished(tmp_path):
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", *TINY, "attack=fgsm", "attack.eps=0.01,0.02,0.03,0.04",
           f"hydra.sweep.dir={tmp_path}/k1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(tmp_path),
                            start_new_session=True)
    cells_dir = tmp_path / "outputs" / "cells"

    def done() -> set[str]:   # finished cells (hidden folders are a put in progress)
        return {p.parent.name for p in cells_dir.glob("*/metrics.json") if not p.parent.name.startswith(".")}

    t0 = time.time()
    while time.time() - t0 < 300:
        if len(done()) >= 1 or proc.poll() is not None:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = done()
    assert 1 <= len(finished) < 4
    p = subprocess.run(cmd[:-1] + [f"hydra.sweep.dir={tmp_path}/k2"], capture_output=True, text=True, timeout=600,
                       env=_env(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("done before") == len(finished)
    assert len(done()) == 4
    assert len(collect([tmp_path / "k2"])[0]) == 4


@needs_data
def test_joblib_launcher_runs_two_jobs_at_once(tmp_path):
    p = _sweep(tmp_path, ["hydra/launcher=local_parallel", "num_threads=1", "attack=fgsm,pgd"], "j")
    assert p.returncode == 0, p.stderr[-3000:]
    ms = [json.loads(f.read_text()) for f in (tmp_path / "j").rglob("metrics.json")]
    assert len(ms) == 2 and ms[0]["pid"] != ms[1]["pid"]
    a, b = sorted(ms, key=lambda m: m["started_at"])
    assert b["started_at"] < a["finished_at"], "jobs did not overlap"
    assert (tmp_path / "j" / "comparison.md").is_file()


@needs_data
def test_submitit_local_sweep(tmp_path):
    p = _sweep(tmp_path, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "attack=fgsm,pgd"], "sl")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(collect([tmp_path / "sl"])[0]) == 2
    assert (tmp_path / "sl" / "comparison.md").is_file()


def test_multirun_end_callback_writes_comparison_and_wandb_run(tmp_path):
    from omegaconf import OmegaConf

    from robustbench_lab.app.callbacks import AggregateOnMultirunEnd
    for s in range(2):
        _fake_run(tmp_path / f"{s}_pgd", seed=s)
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}},
                            "logger": {"name": "wandb", "mode": "offline", "project": "t", "group": None}})
    AggregateOnMultirunEnd().on_multirun_end(cfg)
    assert (tmp_path / "comparison.md").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "the comparison was not logged as a W&B run"


def test_swept_settings_stay_apart_and_intervals_are_over_seeds(tmp_path):
    """`-m attack.steps=5,10 seed=0,1` is two rows with two seeds each, not one row over four runs; the same
    for a defense setting; the curves' labels name the swept value."""
    for steps, base in ((5, 0.6), (10, 0.4)):
        for seed in (0, 1):
            _fake_run(tmp_path / "s" / f"{steps}_{seed}", seed=seed, robust_accuracy=base + 0.01 * seed,
                      settings={"attack.name": "pgd", "attack.steps": steps, "attack.eps": 0.1, "seed": seed,
                                "defense.name": "none", "model.train.epochs": 4})
    w = aggregate([tmp_path / "s"], tmp_path / "out")
    summ = pd.read_csv(w["summary"])
    assert list(summ["attack.steps"]) == [5, 10] and list(summ["n_seeds"]) == [2, 2]
    assert summ["robust_accuracy"].round(6).tolist() == [0.605, 0.405]
    assert "model.train.epochs" not in summ and "seed" not in summ   # constant settings are not columns
    assert "attack.steps" in w["md"].read_text()
    for jump, r in (("0.1", 0.3), ("0.3", 0.2), ("auto", 0.25)):
        _fake_run(tmp_path / "j" / jump, defense="jumprelu", robust_accuracy=r,
                  settings={"defense.name": "jumprelu", "defense.jump": float(jump) if jump != "auto" else jump})
    summ = summarize(collect([tmp_path / "j"])[0])
    assert len(summ) == 3 and sorted(summ["defense.jump"]) == ["0.1", "0.3", "auto"]
    from robustbench_lab.app.report import curve_label
    assert curve_label({"attack": "pgd", "defense": "none", "attack.steps": 10}, ["attack.steps"]) == \
        "PGD / no defense (attack.steps=10)"


def test_runs_record_their_settings(tmp_root):
    from robustbench_lab.app.cells import config_hash, settings
    cfg = compose(TINY + ["attack.steps=7"])
    s = settings(cfg)
    assert s["attack.steps"] == 7 and s["seed"] == 0 and "paths.output_dir" not in s
    assert config_hash(cfg.attack) != config_hash(compose(TINY + ["attack.steps=8"]).attack)


def test_wandb_groups_and_names_carry_date_study_and_swept_values():
    from robustbench_lab.app.tracking import run_name, sweep_group
    assert sweep_group("/o/multirun/2026-11-30/10-00-00") == "2026-11-30_10-00-00"
    assert sweep_group("/o/multirun/2026-11-30/10-00-00", "acl_variants") == "2026-11-30_10-00-00_acl_variants"
    assert sweep_group("/o/multirun/2026-12-01/10-00-00") != sweep_group("/o/multirun/2026-11-30/10-00-00")
    assert run_name("pgd-none-resnet20-s0", ["attack=pgd", "attack.steps=10", "seed=0", "hydra.job.num=1",
                                            "paths.output_dir=/x"]) == "pgd-none-resnet20-s0 [attack.steps=10]"
    assert run_name("pgd-none-resnet20-s0", ["attack=pgd"]) == "pgd-none-resnet20-s0"
