"""The default job's robust-accuracy-vs-epsilon curve: one minimal-norm run beside the fixed-epsilon attacks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import compose, fashion_available
from robustbench_lab.app.execute import run_task
from robustbench_lab.core.errors import ConfigError

pytestmark = [pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed"),
              pytest.mark.usefixtures("one_thread")]

SMALL = ["model=small_cnn", "model.train.max_train=3000", "model.train.epochs=1", "data.n_eval=64",
         "data.n_val=500", "attack.steps=5", "progress=false", "logger=none", "checks=none",
         "curve=trust_region"]


def test_the_curve_beside_pgd(tmp_root):
    m = run_task(compose(SMALL), tmp_root / "run")
    run_dir = tmp_root / "run"
    c = m["curve"]
    assert c["attack"] == "trust_region" and c["norm"] == "linf"
    ra = {float(k): v for k, v in c["robust_accuracy"].items()}
    eps = sorted(ra)
    assert 0.1 in ra                                                   # the run's own eps is on the grid
    assert all(ra[a] >= ra[b] for a, b in zip(eps, eps[1:]))           # robust accuracy falls with epsilon
    assert ra[eps[0]] <= m["clean_accuracy"] and ra[eps[-1]] < ra[eps[0]]
    # the curve file agrees with the per-example minimal norms the summary states
    curve = pd.read_csv(run_dir / "robust_accuracy_curve.csv")
    assert curve["robust_accuracy"].iloc[0] == pytest.approx(m["clean_accuracy"])   # eps 0: clean accuracy
    at = curve.set_index("eps")["robust_accuracy"]
    assert at.loc[np.isclose(at.index, 0.1)].iloc[0] == pytest.approx(ra[0.1])
    assert (run_dir / "robust_accuracy_curve.png").stat().st_size > 1000
    summary = (run_dir / "summary.md").read_text()
    assert "Robust accuracy vs epsilon (trust_region" in summary
    assert json.loads((run_dir / "metrics.json").read_text())["curve"]["attack"] == "trust_region"
    # no curve: nothing extra
    m2 = run_task(compose(SMALL + ["curve=null"]), tmp_root / "run2")
    assert "curve" not in m2 and not (tmp_root / "run2" / "robust_accuracy_curve.csv").exists()
    assert m2["robust_accuracy"] == m["robust_accuracy"]               # the headline is the run's attacks'


def test_a_fixed_epsilon_curve_attack_is_a_config_error_before_any_work(tmp_root):
    with pytest.raises(ConfigError) as ei:
        run_task(compose(SMALL + ["curve=pgd"]), tmp_root / "run")
    assert ei.value.key == "curve" and "trust_region" in str(ei.value)
    assert not (tmp_root / "cache").exists()


def test_minimization_runs_are_not_attacked_twice(tmp_root):
    m = run_task(compose(SMALL + ["attack=deepfool", "attack.steps=5"]), tmp_root / "run")
    assert "curve" not in m and "trust_region" not in m["per_attack"]
    assert (tmp_root / "run" / "robust_accuracy_curve.csv").exists()    # the run's own curve
