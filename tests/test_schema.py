"""The structured-config schemas: every option composes into typed nodes, and the training-recipe schema
stays in step with the Recipe it feeds. (Bad values against the schemas: tests/test_bad_inputs.py.)"""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from robustbench_lab.app import schema
from robustbench_lab.core.recipe import Recipe

from conftest import ROOT, compose


def test_train_schema_mirrors_recipe():
    """A field added to Recipe but not to the schema could not be set from a config (and vice versa)."""
    s_fields = {f.name: f for f in dataclasses.fields(schema.TrainSchema)}
    r_fields = {f.name: f for f in dataclasses.fields(Recipe)}
    assert list(s_fields) == list(r_fields)
    s_default, r_default = schema.TrainSchema(), Recipe()
    for name in r_fields:
        sv, rv = getattr(s_default, name), getattr(r_default, name)
        assert (list(sv) if isinstance(sv, list) else sv) == (list(rv) if isinstance(rv, tuple) else rv), name
    # the composed schema defaults give exactly Recipe's defaults
    assert Recipe.from_config(OmegaConf.structured(schema.TrainSchema)) == r_default


@pytest.mark.parametrize("group,key,cls", [
    ("data", "data", schema.DataSchema), ("model", "model", schema.ModelSchema),
    ("paths", "paths", schema.PathsSchema)])
def test_every_group_option_is_typed(group, key, cls):
    for p in sorted((ROOT / "robustbench_lab" / "conf" / group).glob("*.yaml")):
        cfg = compose([f"{group}={p.stem}", "logger=none"])
        assert OmegaConf.get_type(cfg[key]) is cls, p.name
        if key == "model":
            assert OmegaConf.get_type(cfg.model.train) is schema.TrainSchema
        assert schema.unknown_keys(cfg) == []


@pytest.mark.parametrize("name,cls", [("wandb", schema.WandbLoggerSchema), ("none", schema.NoLoggerSchema)])
def test_logger_options_extend_their_schema(name, cls):
    cfg = compose([f"logger={name}"])
    assert OmegaConf.get_type(cfg) is schema.Config
    assert OmegaConf.get_type(cfg.logger) is cls and cfg.logger.name == name


@pytest.mark.parametrize("opt", sorted(p.stem for p in (ROOT / "robustbench_lab" / "conf" / "experiment").glob("*.yaml")) +
                         ["defense=adv_training", "defense=trades", "defense=jumprelu"])
def test_experiments_and_global_defenses_fit_the_schema(opt):
    cfg = compose([opt if "=" in opt else f"experiment={opt}"])
    assert schema.unknown_keys(cfg) == []
    Recipe.from_config(cfg.model.train)


def test_attack_and_defense_stay_open():
    """Their fields depend on the _target_ class; build_attack checks them against its constructor."""
    cfg = compose(["attack=square", "defense=jumprelu"])
    assert OmegaConf.get_type(cfg.attack) is dict and OmegaConf.get_type(cfg.defense) is dict
    assert cfg.attack.n_queries == 1000 and cfg.defense.jump == "auto"
