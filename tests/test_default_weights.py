"""The default model's weights ship with the package: a cold start on the default job loads them exactly as a
cache hit, after the same checks; changing the recipe or ``retrain=true`` still trains; and the shipped
weights are what the recipe trains (a retraining test, run in CI)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import compose, fashion_available
from robustbench_lab.app.builders import build_defense, checkpoint_spec, load_model
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.cache import BUNDLED_DIR, CheckpointCache, content_key, sha256_file
from robustbench_lab.core.recipe import Recipe
from robustbench_lab.core.train import accuracy, load_or_build

needs_data = pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST is not installed")


def _default(tmp_path: Path, *extra: str):
    cfg = compose(["logger=none", f"paths.cache_dir={tmp_path / 'cache'}", *extra])
    recipe = Recipe.from_config(cfg.model.train)
    return cfg, recipe, checkpoint_spec(cfg, recipe, build_defense(cfg.defense))


def _card() -> tuple[Path, dict]:
    cards = sorted(BUNDLED_DIR.glob("*.json"))
    assert len(cards) == 1, f"expected the default model's card in {BUNDLED_DIR}, found {cards}"
    return cards[0], json.loads(cards[0].read_text())


def test_the_shipped_checkpoint_is_the_default_recipes(tmp_path):
    path, card = _card()
    _, _, spec = _default(tmp_path)
    key = content_key(spec)
    assert card["key"] == key == path.stem, "the default config's checkpoint key is not the shipped one"
    assert card["spec"] == json.loads(json.dumps(spec))
    weights = path.with_suffix(".safetensors")
    assert sha256_file(weights) == card["sha256"]
    assert weights.stat().st_size < 1.5e6
    assert 0.85 < card["test_accuracy"] < 1.0


@needs_data
def test_a_cold_start_loads_the_shipped_weights_as_a_cache_hit(tmp_path, monkeypatch):
    cfg, recipe, spec = _default(tmp_path)
    splits = data_mod.load_splits(cfg.data.name, cfg.data.root, False, int(cfg.data.n_val), 200,
                                  int(cfg.data.split_seed))

    def no_training(*a, **k):
        raise AssertionError("the default model was trained although its weights ship with the package")
    monkeypatch.setattr("robustbench_lab.core.train.StandardTraining.fit", no_training)
    model, info = load_model(cfg, torch.device("cpu"), build_defense(cfg.defense), recipe, splits)
    assert info["cache_hit"] is True and info["checkpoint_source"] == "bundled"
    cached = tmp_path / "cache" / "checkpoints" / f"{content_key(spec)}.safetensors"
    assert cached.is_file() and sha256_file(cached) == _card()[1]["sha256"]    # copied into the cache
    acc = accuracy(model, splits.x_test[:500], splits.y_test[:500], torch.device("cpu"))
    assert acc > 0.85                                                            # the weights are really in
    _, info2 = load_model(cfg, torch.device("cpu"), build_defense(cfg.defense), recipe, splits)
    assert info2["cache_hit"] is True and info2["checkpoint_source"] == "bundled"   # now an ordinary hit


def test_a_shipped_entry_that_fails_its_checksum_is_not_used(tmp_path):
    src, card = _card()
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    shutil.copy(src, bundled / src.name)
    w = bundled / f"{src.stem}.safetensors"
    w.write_bytes(src.with_suffix(".safetensors").read_bytes()[:-8] + b"\0" * 8)   # same size, other bytes
    cache = CheckpointCache(tmp_path / "cache", bundled=bundled)
    assert cache.load(card["key"], torch.nn.Linear(1, 1)) is None
    assert not cache.weights_path(card["key"]).exists()


def test_retrain_builds_even_when_an_entry_exists(tmp_path):
    cache = CheckpointCache(tmp_path / "cache", bundled=None)
    module = torch.nn.Linear(2, 2)
    spec = {"toy": 1}
    builds = []

    def build():
        builds.append(1)
        with torch.no_grad():
            module.weight.fill_(float(len(builds)))
        return {"n": len(builds)}
    load_or_build(cache, "k", module, spec, build)
    meta, hit = load_or_build(cache, "k", module, spec, build)
    assert hit and builds == [1]
    meta, hit = load_or_build(cache, "k", module, spec, build, rebuild=True)
    assert not hit and builds == [1, 1] and meta["n"] == 2
    fresh = torch.nn.Linear(2, 2)
    cache.load("k", fresh, spec)
    assert torch.all(fresh.weight == 2.0)                                       # the new weights replaced the old


def test_another_recipe_does_not_match_the_shipped_key(tmp_path):
    _, card = _card()
    _, _, spec = _default(tmp_path, "model.train.epochs=3")
    assert content_key(spec) != card["key"]


@needs_data
@pytest.mark.skipif(os.environ.get("CI") != "true" and not os.environ.get("RUN_RETRAIN"),
                    reason="retrains ResNet-20 (about 4 min on 2 cores): runs in CI (CI=true) or with RUN_RETRAIN=1")
def test_retraining_the_recipe_reproduces_the_shipped_card(tmp_path):
    """Trains the default recipe from scratch (``retrain=true``) and compares with the shipped card: test
    accuracy within 0.5 points (the same code and seed on the same kind of machine gives the same weights;
    other CPUs/BLAS libraries can round differently, which moves accuracy by a few tenths at most)."""
    cfg, recipe, spec = _default(tmp_path, "retrain=true", "progress=false")
    splits = data_mod.load_splits(cfg.data.name, cfg.data.root, False, int(cfg.data.n_val), 200,
                                  int(cfg.data.split_seed))
    model, info = load_model(cfg, torch.device("cpu"), build_defense(cfg.defense), recipe, splits)
    assert info["cache_hit"] is False and info["checkpoint_source"] == "trained"
    card = _card()[1]
    assert abs(info["checkpoint_test_accuracy"] - card["test_accuracy"]) <= 0.005, \
        (info["checkpoint_test_accuracy"], card["test_accuracy"])
