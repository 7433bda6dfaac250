"""A whole run on the real default data at a tiny scale: files, keys, caching, W&B offline."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from robustbench_lab.app.execute import run_task
from robustbench_lab.core.results import REQUIRED_METRICS

from conftest import compose, fashion_available

pytestmark = pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")

SMALL = ["model=small_cnn", "model.train.max_train=3000", "model.train.epochs=1", "data.n_eval=64",
         "data.n_val=500", "attack.steps=5", "progress=false"]


def test_run_writes_complete_results_and_reuses_checkpoint(tmp_root):
    cfg = compose(SMALL + ["logger=wandb", "logger.mode=offline"])
    out = tmp_root / "run1"
    m = run_task(cfg, out)
    saved = json.loads((out / "metrics.json").read_text())
    for k in REQUIRED_METRICS:
        assert k in saved, k
    assert saved["dataset"] == "fashion_mnist" and saved["attack"] == "pgd" and saved["norm"] == "linf"
    assert saved["n_examples"] == 64 and saved["eps"] == 0.1
    assert 0.5 < saved["clean_accuracy"] <= 1.0
    assert saved["robust_accuracy"] <= saved["clean_accuracy"]
    assert m["cache_hit"] is False
    pe = pd.read_parquet(out / "per_example.parquet")
    assert len(pe) == 64
    assert {"index", "label", "clean_pred", "adv_pred", "success", "l2", "linf"} <= set(pe.columns)
    # metrics are derived from the table
    robust = (pe["clean_correct"] & ~pe["success"]).mean()
    assert math.isclose(robust, saved["robust_accuracy"])
    assert math.isclose(pe["clean_correct"].mean(), saved["clean_accuracy"])
    atk = pe[pe["attacked"]]
    assert (atk["linf"] <= 0.1 + 1e-6).all()
    idx = json.loads((out / "eval_indices.json").read_text())["indices"]
    assert sorted(pe["index"].tolist()) == idx
    assert (out / "summary.md").read_text().startswith("# pgd vs none")
    assert (out / "examples.png").stat().st_size > 1000
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run was written"
    assert not (out / ".staging").exists()

    m2 = run_task(compose(SMALL + ["logger=none"]), tmp_root / "run2")
    assert m2["cache_hit"] is True
    assert m2["clean_accuracy"] == saved["clean_accuracy"]
    assert m2["robust_accuracy"] == saved["robust_accuracy"]   # same seed -> same numbers


def test_wandb_failure_does_not_lose_results(tmp_root, monkeypatch):
    import wandb

    def boom(*a, **k):
        raise RuntimeError("W&B is down")
    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(UserWarning, match="W&B init failed"):
        run_task(compose(SMALL + ["logger=wandb"]), tmp_root / "run")
    assert (tmp_root / "run" / "metrics.json").is_file()


def test_seed_changes_attack_randomness_not_eval_points(tmp_root):
    a = run_task(compose(SMALL + ["logger=none", "seed=0"]), tmp_root / "a")
    b = run_task(compose(SMALL + ["logger=none", "seed=1", "model.train_seed=0"]), tmp_root / "b")
    ia = pd.read_parquet(tmp_root / "a" / "per_example.parquet")["index"].tolist()
    ib = pd.read_parquet(tmp_root / "b" / "per_example.parquet")["index"].tolist()
    assert ia == ib
    assert b["cache_hit"] is True   # train_seed pinned -> same checkpoint


def test_cascade_runs_each_attack_on_points_still_robust(tmp_root):
    m = run_task(compose(SMALL + ["logger=none", "attacks=[fgsm,pgd]", "attack.eps=0.03"]), tmp_root / "c")
    pe = pd.read_parquet(tmp_root / "c" / "per_example.parquet")
    f, p = pe[pe["attack"] == "fgsm"].set_index("index"), pe[pe["attack"] == "pgd"].set_index("index")
    assert len(f) == len(p) == 64
    # FGSM runs on clean-correct points; PGD only on those FGSM left robust
    assert (f["attacked"] == f["clean_correct"]).all()
    assert (p["attacked"] == (f["clean_correct"] & ~f["success"])).all()
    robust = f["clean_correct"] & ~f["success"] & ~p["success"]
    assert math.isclose(robust.mean(), m["robust_accuracy"])
    assert m["attack"] == "fgsm+pgd" and m["attacks"] == ["fgsm", "pgd"]
    assert m["per_attack"]["pgd"]["attacked"] == int(p["attacked"].sum())


def test_cascade_unknown_member_is_a_config_error(tmp_root):
    from robustbench_lab.core.errors import ConfigError
    with pytest.raises(ConfigError, match=r"attacks\[1\]"):
        run_task(compose(SMALL + ["logger=none", "attacks=[fgsm,nope]"]), tmp_root / "x")
    assert not (tmp_root / "x" / "metrics.json").exists()
