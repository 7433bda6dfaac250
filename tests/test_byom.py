"""Bring your own model through the command line: ``model._target_`` with its checkpoint in the wrappers
users' training scripts write, named architectures, and clear errors for what does not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import robustbench_lab as rbl
from robustbench_lab.app.builders import build_model
from robustbench_lab.core import data as data_mod
from robustbench_lab.core import sources
from robustbench_lab.core.errors import ConfigError

from byom.user_models import TinyNet
from conftest import ROOT, compose, fashion_available

TESTS = Path(__file__).resolve().parent
SMALL = ["data.n_eval=64", "data.n_val=100", "logger=none", "progress=false", "attack.eps=0.05", "attack.steps=5"]


def _cli(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "ROBUSTBENCH_LAB_ROOT": str(tmp_path),
           "ROBUSTBENCH_LAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


@pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")
def test_a_users_model_and_checkpoint_through_the_cli_match_the_api(tmp_path):
    torch.manual_seed(0)
    net = TinyNet(width=4)
    # as a DataParallel training script saves it: module. prefixes, nested under state_dict, extra entries
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
               tmp_path / "user.pt")
    p = _cli(tmp_path, ["model=custom", "model._target_=byom.user_models.TinyNet", "+model.kwargs.width=4",
                        f"model.checkpoint={tmp_path / 'user.pt'}", *SMALL])
    assert p.returncode == 0, p.stderr[-3000:]
    cli = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert cli["model"] == "custom" and cli["checkpoint"] == str(tmp_path / "user.pt")
    api = rbl.evaluate(net, data="fashion_mnist", attacks=["pgd"], eps=0.05, n_examples=64, seed=0, device="cpu",
                       attack_options={"steps": 5})
    for k in ("clean_accuracy", "robust_accuracy", "attack_success_rate", "median_linf", "checks_fired"):
        a, c = api.metrics[k], cli[k]
        assert a == c or (c is None and a != a), (k, a, c)    # NaN is written to JSON as null


@pytest.mark.parametrize("args,key,found", [
    (["model._target_=byom.user_models.OneOutput"], "model._target_", "output (2, 1)"),
    (["model._target_=byom.user_models.not_a_module"], "model._target_", "returned str"),
    (["model._target_=byom.user_models.Nope"], "model._target_", "has no callable 'Nope'"),
])
def test_models_that_do_not_fit_are_named_before_any_work(tmp_path, args, key, found):
    p = _cli(tmp_path, ["model=custom", *args, *SMALL])
    assert p.returncode != 0
    assert f"config key '{key}'" in p.stderr and found in p.stderr, p.stderr[-2000:]
    written = {q.name for q in (tmp_path / "run").iterdir()} - {".hydra", "run.log"}
    assert written == {"failed.json"}, written


def test_a_checkpoint_with_wrong_keys_names_them(tmp_path):
    torch.save({"state_dict": {"features.0.weight": torch.zeros(4, 1, 3, 3), "other.bias": torch.zeros(3)}},
               tmp_path / "bad.pt")
    p = _cli(tmp_path, ["model=custom", "model._target_=byom.user_models.TinyNet", "+model.kwargs.width=4",
                        f"model.checkpoint={tmp_path / 'bad.pt'}", *SMALL])
    assert p.returncode != 0
    assert "model.checkpoint" in p.stderr and "missing keys" in p.stderr and "other.bias" in p.stderr


def test_named_sources_build_and_unknown_names_are_refused():
    card = data_mod.get_card("fashion_mnist")
    m = build_model(compose(["model=torchvision", "model.arch=resnet18"]), card)
    assert m.name == "torchvision_resnet18" and m(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="config key 'model.arch'"):
        build_model(compose(["model=torchvision", "model.arch=resnet_nope"]), card)


def test_robustbench_offline_names_the_file_and_folder(tmp_path, monkeypatch):
    """The zoo entry's architecture comes from the robustbench package; its weights are read weights-only
    from the expected file, and offline a missing file is named with its folder (a stand-in package here:
    the real one needs a network for its weights)."""
    import types
    import enum

    class BenchmarkDataset(enum.Enum):
        cifar_10 = "cifar10"

    class ThreatModel(enum.Enum):
        Linf = "Linf"

    zoo = types.ModuleType("robustbench.model_zoo")
    zoo.model_dicts = {BenchmarkDataset("cifar10"): {ThreatModel("Linf"): {
        "Tiny": {"model": lambda: TinyNet(width=2, in_channels=3), "gdrive_id": None}}}}
    enums = types.ModuleType("robustbench.model_zoo.enums")
    enums.BenchmarkDataset, enums.ThreatModel = BenchmarkDataset, ThreatModel
    monkeypatch.setitem(sys.modules, "robustbench", types.ModuleType("robustbench"))
    monkeypatch.setitem(sys.modules, "robustbench.model_zoo", zoo)
    monkeypatch.setitem(sys.modules, "robustbench.model_zoo.enums", enums)
    with pytest.raises(FileNotFoundError, match=r"put the file Tiny\.pt into the folder .*cifar10/Linf"):
        sources.robustbench_model("Tiny", "cifar10", "Linf", str(tmp_path))
    with pytest.raises(ConfigError, match="config key 'model.name'"):
        sources.robustbench_model("Nope", "cifar10", "Linf", str(tmp_path))
    ref = TinyNet(width=2, in_channels=3)
    (tmp_path / "cifar10" / "Linf").mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}},
               tmp_path / "cifar10" / "Linf" / "Tiny.pt")
    net = sources.robustbench_model("Tiny", "cifar10", "Linf", str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))


def test_jumprelu_retrofits_an_imported_relu_model_and_names_a_gelu_one():
    from defenses.jumprelu.retrofit import jump_modules, retrofit
    card = data_mod.get_card("fashion_mnist")
    m = build_model(compose(["model=custom", "model._target_=byom.user_models.TinyNet"]), card)
    assert len(jump_modules(retrofit(m, 0.1))) == 2
    gelu = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.GELU(), torch.nn.Linear(32, 10))
    with pytest.raises(ConfigError, match="config key 'defense'.*GELU"):
        retrofit(gelu, 0.1)


@pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")
def test_a_training_time_defense_trains_an_imported_architecture(tmp_root):
    from robustbench_lab.app.execute import run_task
    cfg = compose(["model=custom", "model._target_=byom.user_models.TinyNet", "model.train.max_train=500",
                   "model.train.epochs=1", "defense=adv_training", "data.n_eval=32", "data.n_val=100",
                   "logger=none", "progress=false", "checks=none", "attack=fgsm"])
    m = run_task(cfg, tmp_root / "run")
    assert m["cache_hit"] is False and m["model"] == "custom" and m["defense"] == "adv_training"
    again = run_task(cfg, tmp_root / "run2")
    assert again["cache_hit"] is True and again["robust_accuracy"] == m["robust_accuracy"]
