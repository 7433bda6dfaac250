"""Same seed, same machine -> the same numbers, bit for bit: two complete runs through run.py (training
included: separate roots, so each trains its own checkpoint) in separate output directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from robustbench_lab.core.cache import sha256_file

from conftest import ROOT, fashion_available

pytestmark = pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")

TINY = ["model=small_cnn", "model.train.max_train=2000", "model.train.epochs=1", "data.n_eval=32",
        "logger=none", "checks=none", "resume=false", "progress=false"]
# fields that record when, where or how long, not what was measured
WALL_CLOCK = {"seconds", "started_at", "finished_at", "pid", "checkpoint"}


def _numbers(obj):
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items() if k not in WALL_CLOCK and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    return obj


def _run(root: Path) -> Path:
    run_dir = root / "run"
    env = {**os.environ, "ROBUSTBENCH_LAB_ROOT": str(root), "ROBUSTBENCH_LAB_CACHE": str(root / "cache")}
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, f"hydra.run.dir={run_dir}"],
                       capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir


def test_same_seed_gives_bit_identical_metrics(tmp_path):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["cache_hit"] is False and mb["cache_hit"] is False      # both trained their own checkpoint
    assert ma["checkpoint"] != mb["checkpoint"] and ma["started_at"] != mb["started_at"]
    # what is left after dropping wall-clock fields is identical, floats serialized exactly (repr)
    na, nb = _numbers(ma), _numbers(mb)
    assert json.dumps(na, sort_keys=True) == json.dumps(nb, sort_keys=True)
    assert {"clean_accuracy", "robust_accuracy", "median_l2", "checkpoint_test_accuracy", "audit"} <= set(na)
    assert set(ma) - set(na) == {"seconds", "started_at", "finished_at", "pid", "checkpoint", "checks_seconds",
                                 "train_seconds", "attack_seconds"}
    # and so are the per-example records, the evaluated points and the trained weights
    pd.testing.assert_frame_equal(pd.read_parquet(a / "per_example.parquet"),
                                  pd.read_parquet(b / "per_example.parquet"), check_exact=True)
    assert (a / "eval_indices.json").read_bytes() == (b / "eval_indices.json").read_bytes()
    (wa,), (wb,) = ((d.parent / "cache" / "checkpoints").glob("*.safetensors") for d in (a, b))
    assert wa.name == wb.name and sha256_file(wa) == sha256_file(wb)
