"""Config composition of every option, instantiation, and clear early errors for bad values."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from robustbench_lab.core import data as data_mod, zoo
from robustbench_lab.app.builders import build_attack, build_defense, build_model
from robustbench_lab.core.device import resolve_device
from robustbench_lab.app.validate import validate
from robustbench_lab.core.attack_base import Attack
from robustbench_lab.core.defense_base import Defense
from robustbench_lab.core.errors import ConfigError

from conftest import ROOT, compose


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "robustbench_lab" / "conf" / group).glob("*.yaml"))


def test_defaults_compose():
    cfg = compose()
    assert cfg.data.name == "fashion_mnist" and cfg.model.name == "resnet20"
    assert cfg.attack.name == "pgd" and cfg.defense.name == "none" and cfg.logger.name == "wandb"
    assert cfg.logger.mode == "offline" and cfg.device == "auto"
    assert cfg.attack.eps == 0.1 and cfg.attack.steps == 20 and cfg.data.n_eval == 1000
    validate(cfg)


@pytest.mark.parametrize("opt", options("attack"))
def test_every_attack_option_builds(opt):
    atk, eps = build_attack(compose([f"attack={opt}"]).attack)
    assert isinstance(atk, Attack) and atk.name == opt


@pytest.mark.parametrize("opt", options("defense"))
def test_every_defense_option_builds(opt):
    d = build_defense(compose([f"defense={opt}"]).defense)
    assert isinstance(d, Defense)


IMPORTED = {"custom": ["model._target_=byom.user_models.TinyNet"], "torchvision": [], "timm": [],
            "robustbench": ["data=cifar10"]}
OPTIONAL = {"timm": "timm"}   # packages a named source needs


@pytest.mark.parametrize("opt", options("model"))
def test_every_model_option_is_registered_and_builds(opt):
    if opt in IMPORTED:   # a model from outside the zoo: built through the config, as a run builds it
        cfg = compose([f"model={opt}", *IMPORTED[opt]])
        if opt == "robustbench":
            return   # composes; its weights need a network (tests/test_byom.py checks the source offline)
        validate(cfg)
        try:
            __import__(OPTIONAL.get(opt, "torch"))
        except ImportError:   # not installed here: the build names the package instead
            with pytest.raises(ConfigError, match="pip install"):
                build_model(cfg, data_mod.get_card("cifar10"))
            return
        if opt == "robustbench":
            return   # its weights need a network (tests/test_byom.py checks the offline error)
        m = build_model(cfg, data_mod.get_card("fashion_mnist"))
        assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
        return
    cfg = compose([f"model={opt}"])
    validate(cfg)
    card = zoo.get_card(cfg.model.name)
    for dcard in (data_mod.get_card("fashion_mnist"), data_mod.get_card("cifar10")):
        net = card.builder(dcard.channels, dcard.num_classes, dcard.image_size)
        assert net is not None


@pytest.mark.parametrize("opt", options("data"))
def test_every_data_option_is_registered(opt):
    cfg = compose([f"data={opt}"])
    assert data_mod.get_card(cfg.data.name).name == opt


@pytest.mark.parametrize("opt", options("logger"))
def test_every_logger_option(opt):
    from robustbench_lab.app.tracking import make_tracker
    assert make_tracker(compose([f"logger={opt}"]).logger).name == opt


@pytest.mark.parametrize("override,key", [
    (["attack.eps=-0.1"], "attack.eps"),
    (["attack.norm=l3"], "attack.norm"),
    (["attack.eps=2.0"], "attack.eps"),
    (["attack.steps=0"], "attack.steps"),
    (["attack.loss=hinge"], "attack.loss"),
])
def test_bad_attack_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        build_attack(compose(override).attack)
    assert key in str(e.value) and "allowed" in str(e.value)


@pytest.mark.parametrize("override,key", [
    (["data.n_eval=0"], "data.n_eval"),
    (["data.n_val=-1"], "data.n_val"),
    (["model.train.optimizer=rmsprop"], "model.train.optimizer"),
    (["model.train.schedule=linear"], "model.train.schedule"),
    (["+model.train.epochz=3"], "model.train.epochz"),
    (["batch_size=0"], "batch_size"),
])
def test_bad_values_fail_validation(override, key):
    with pytest.raises(ConfigError) as e:
        validate(compose(override))
    assert key in str(e.value)


def test_bad_device():
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    assert str(resolve_device("cpu")) == "cpu"


def test_unknown_group_option_lists_choices():
    from hydra.errors import MissingConfigException
    with pytest.raises(MissingConfigException) as e:
        compose(["attack=nosuchattack"])
    assert "pgd" in str(e.value)


def test_typo_key_rejected():
    from hydra.errors import ConfigCompositionException
    with pytest.raises(ConfigCompositionException) as e:
        compose(["attack.stepz=3"])
    assert "stepz" in str(e.value)


@pytest.mark.parametrize("args,needle", [
    (["attack.eps=-1"], "attack.eps"),
    (["attack.norm=l7"], "attack.norm"),
    (["device=tpu"], "device"),
    (["attack=nope"], "attack"),
])
def test_run_py_fails_fast_with_clear_error(tmp_path, args, needle):
    t0 = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, "logger=none",
                        f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert needle in p.stderr + p.stdout
    assert time.time() - t0 < 60
    assert not list((tmp_path / "cache").glob("**/*.safetensors"))


def test_wandb_tables_with_mixed_columns_are_made_loggable():
    """W&B rejects a table whose column mixes None, numbers and strings (a linearization run lost its tables to
    it); wandb_safe turns such columns into strings and leaves numeric ones alone."""
    import pandas as pd
    wandb = pytest.importorskip("wandb")
    from robustbench_lab.app.tracking import wandb_safe

    df = pd.DataFrame({"note": [None, 1.5, "top: not converged"], "x": [1.0, float("nan"), 3.0],
                       "name": ["a", "b", "c"]})
    with pytest.raises(TypeError):
        wandb.Table(dataframe=df)                              # the failure this guards against
    safe = wandb_safe(df)
    table = wandb.Table(dataframe=safe)
    assert table.data[0] == ["", 1.0, "a"] and table.data[2][0] == "top: not converged"
    assert safe["x"].dtype == float and safe["name"].tolist() == ["a", "b", "c"]
    assert df["note"].iloc[0] is None                          # the caller's frame is untouched
