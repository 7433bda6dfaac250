"""Structured-config schemas: the types of every config key that has one fixed shape.

Registered in Hydra's ConfigStore and used as the base of ``robustbench_lab/conf/config.yaml`` (``base_config``), so the
group options (``data/``, ``model/`` with its ``train:`` recipe, ``paths/``) merge into typed nodes and the
two ``logger/`` options extend their own schema (``schema/logger/<name>``). A typo'd key or a value of the
wrong type then fails *at composition*, on the command line or in a YAML file, with Hydra's error naming
the full key (``full_key: data.n_eval``) and a non-zero exit.

``attack`` and ``defense`` stay open (``Any``): their fields depend on the ``_target_`` class and are
validated against its constructor when the object is built (``robustbench_lab.app.evaluate.build_attack``).

Value ranges (``n_eval >= 1``, known devices, ...) are not types; ``robustbench_lab.app.evaluate.validate`` checks
them, and :func:`unknown_keys` catches keys force-added with ``+key=value`` that no schema declares, all
before any data is read.

This module stays light (no torch), like ``core.recipe`` and ``linearization.options`` that it derives the
training recipe and the linearize options from.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from robustbench_lab.core.recipe import Recipe
from robustbench_lab.linearization.options import LinearizeOptions


@dataclass
class PathsSchema:
    root_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING
    data_dir: str = MISSING
    cells_dir: str = MISSING


@dataclass
class DataSchema:
    name: str = MISSING
    root: str = MISSING
    download: bool = False
    n_val: int = 5000
    n_eval: int = 1000
    split_seed: int = 0


def _schema_of(cls: type, name: str) -> type:
    """A structured-config dataclass with the fields, types and defaults of the core dataclass ``cls``
    (tuples become lists, the sequence type OmegaConf stores; a nested dataclass becomes a nested schema),
    so the schema cannot drift from it."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        optional = typing.get_origin(typ) is typing.Union and type(None) in typing.get_args(typ)
        inner = next(a for a in typing.get_args(typ) if a is not type(None)) if optional else typ
        if dataclasses.is_dataclass(inner):
            sub = _schema_of(inner, name + inner.__name__)
            fields.append((f.name, sub, field(default_factory=sub)))
        elif typing.get_origin(inner) is tuple:
            typ = List[typing.get_args(inner)[0]]   # type: ignore[valid-type]
            typ = Optional[typ] if optional else typ
            fields.append((f.name, typ, field(default_factory=lambda d=default: None if d is None else list(d))))
        elif isinstance(default, (dict, list)):
            fields.append((f.name, typ, field(default_factory=lambda f=f: f.default_factory())))
        else:
            fields.append((f.name, typ, field(default=default)))
    schema = dataclasses.make_dataclass(name, fields)
    schema.__module__ = __name__
    schema.__doc__ = f"The config schema of ``{cls.__module__}.{cls.__name__}`` (derived, not copied)."
    return schema


# The training recipe (``model.train``), derived from ``robustbench_lab.core.recipe.Recipe``.
TrainSchema = _schema_of(Recipe, "TrainSchema")


@dataclass
class ModelSchema:
    name: str = MISSING
    kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    train_seed: Optional[int] = None
    train: TrainSchema = field(default_factory=TrainSchema)
    # a model from outside the zoo (robustbench_lab.core.sources): any importable factory or class, called
    # with ``kwargs``; the harness wraps it with ``mean``/``std`` (null: no normalization) and ``num_classes``
    # (null: the dataset's). ``arch`` and ``threat_model`` feed the named sources' configs.
    _target_: Optional[str] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    num_classes: Optional[int] = None
    arch: Optional[str] = None
    threat_model: Optional[str] = None


@dataclass
class WandbLoggerSchema:
    name: str = "wandb"
    mode: str = "offline"
    project: str = "robustbench_lab"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class NoLoggerSchema:
    name: str = "none"
    group: Optional[str] = None   # run.py sets it in a multirun for whichever logger; unused here


# The ``linearize`` node (task=linearize), derived from the analysis' own options; docs: robustbench_lab/conf/linearize/default.yaml.
LinearizeSchema = _schema_of(LinearizeOptions, "LinearizeSchema")


@dataclass
class Config:
    """The primary config. Defaults live in robustbench_lab/conf/config.yaml; these are the types."""

    data: DataSchema = MISSING
    model: ModelSchema = MISSING
    attack: Any = MISSING         # open: validated against the _target_'s constructor (app.build_attack)
    defense: Any = MISSING        # open: likewise (app.build_defense)
    logger: Any = MISSING         # typed by the chosen option's own schema (schema/logger/<name>)
    paths: PathsSchema = MISSING
    attacks: Optional[List[str]] = None
    curve: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    batch_size: int = 500
    progress: bool = True
    retrain: bool = False
    checks: str = "quick"
    resume: bool = True
    num_threads: Optional[int] = None
    task: str = "evaluate"        # evaluate | linearize (robustbench_lab/app/linearize.py)
    linearize: LinearizeSchema = field(default_factory=LinearizeSchema)


def register() -> None:
    """Store the schemas (idempotent: storing again replaces the same entries)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="schema/logger", name="wandb", node=WandbLoggerSchema)
    cs.store(group="schema/logger", name="none", node=NoLoggerSchema)


register()


def _typed_nodes(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, DictConfig, type]]:
    """(key, node, dataclass) for every node of ``node`` whose type is one of our schemas."""
    t = OmegaConf.get_type(node)
    if t is not None and dataclasses.is_dataclass(t) and t.__module__ == __name__:
        yield prefix, node, t
        for k in node.keys():
            if isinstance(k, str) and k != "hydra" and OmegaConf.is_dict(node._get_node(k)):
                yield from _typed_nodes(node[k], f"{prefix}{k}.")


def unknown_keys(cfg: DictConfig) -> list[tuple[str, list[str]]]:
    """Keys that no schema declares, as (full key, allowed keys); only ``+key=value`` can create them.

    Hydra's ``+`` (and ``++``) force-add a key even into a structured node, so ``+data.n_evl=5`` composes;
    this finds such keys so the run can refuse them instead of silently ignoring them.
    """
    out = []
    for prefix, node, t in _typed_nodes(cfg):
        declared = [f.name for f in dataclasses.fields(t)]
        for k in node.keys():
            if k not in declared and not (prefix == "" and k == "hydra"):
                out.append((f"{prefix}{k}", sorted(declared)))
    return out
