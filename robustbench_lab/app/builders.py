"""Objects from config nodes: attacks, defenses, models, and the checkpoint spec of a run's model.

The only place (with ``app.schema`` and ``app.validate``) where config nodes become core objects: the
core and the plug-ins never see a ``DictConfig``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from robustbench_lab.core import data as data_mod
from robustbench_lab.core import sources, zoo
from robustbench_lab.core.attack_base import MINIMIZATION, Attack
from robustbench_lab.core.cache import CheckpointCache, load_weights
from robustbench_lab.core.defense_base import Defense
from robustbench_lab.core.errors import ConfigError, check_bool
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.norms import Norm
from robustbench_lab.core.recipe import Recipe
from robustbench_lab.core.targets import check_target, check_target_class
from robustbench_lab.core.train import EpochCallback, get_or_train
from robustbench_lab.core.train import checkpoint_spec as train_checkpoint_spec

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def build_attack(cfg: DictConfig, key: str = "attack") -> tuple[Attack, float | None]:
    """Instantiate an attack from its config node; returns the attack and its epsilon (not an attack field)."""
    node = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(node, dict)
    eps = node.pop("eps", None)
    cfg_name = node.pop("name", None)
    # Targeted mode is the contract's (``attack.targeted``/``attack.target``), not an option of the class; an
    # untargeted method keeps its own ``target`` option (trust_region: best | worst).
    targeted = node.pop("targeted", False)
    target = node.pop("target", "random") if "targeted" in cfg else "random"
    if "_target_" not in node:
        raise ConfigError(f"{key}._target_", None, "the import path of an Attack class")
    try:
        atk = instantiate(node)
    except ConfigError:
        raise
    except Exception as e:  # hydra wraps constructor errors; surface ours, name the key for the rest
        cause = e.__cause__ if e.__cause__ is not None else e
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(key, OmegaConf.to_yaml(cfg).strip().replace("\n", ", "),
                          "the options of " + str(node.get("_target_")), f"could not build the attack: {cause}") from e
    if not isinstance(atk, Attack):
        raise ConfigError(f"{key}._target_", node["_target_"], "an Attack subclass")
    if cfg_name:
        atk.name = str(cfg_name)   # the config's name labels results (e.g. cw_linf is PGD on the CW margin)
    check_bool(f"{key}.targeted", targeted)
    if targeted:
        if not atk.targetable:
            raise ConfigError(f"{key}.targeted", targeted, "false",
                              f"{atk.name} is an untargeted method; attacks that take a target: "
                              + ", ".join(targetable_attacks()))
        atk.set_target(check_target(target, f"{key}.target"))
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ConfigError(f"{key}.eps", eps, "a number >= 0 (input space, [0, 1] pixels), or null for "
                              "minimization attacks")
        if atk.norm is Norm.LINF and eps > 1:
            raise ConfigError(f"{key}.eps", eps, "0 <= eps <= 1 for the L-inf norm on [0, 1] inputs")
        eps = float(eps)
    elif atk.family != MINIMIZATION:
        raise ConfigError(f"{key}.eps", eps, "a number >= 0", f"{atk.name} is a fixed-epsilon attack")
    return atk, eps


def targetable_attacks() -> list[str]:
    """Names of the attack configs whose class takes a target (``Attack.targetable``)."""
    names = []
    for p in sorted((CONF_DIR / "attack").glob("*.yaml")):
        path = OmegaConf.load(p).get("_target_")
        try:
            if path and getattr(get_class(str(path)), "targetable", False):
                names.append(p.stem)
        except Exception:   # an unimportable class is reported when it is used, not here
            continue
    return names


def build_attacks(cfg: DictConfig) -> tuple[list[Attack], float | None, str]:
    """The attacks of a run: ``attack`` alone, or the cascade ``attacks=[a,b,...]`` (names of attack configs).

    A cascade shares one threat model: every member gets ``attack.norm`` and ``attack.eps``, and, in
    targeted mode, ``attack.targeted`` and ``attack.target`` (so a member that takes no target is an error).
    Each member runs only on the points still robust after the previous ones (the evaluator's robust mask).
    """
    names = cfg.get("attacks")
    if not names:
        atk, eps = build_attack(cfg.attack)
        return [atk], eps, str(cfg.attack.name)
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ConfigError("attacks", names, "a list of attack config names, e.g. attacks=[pgd,fgsm]")
    shared = targeted_options(cfg.attack)
    attacks: list[Attack] = []
    eps_out: float | None = None
    for i, name in enumerate(names):
        atk, eps_out = attack_from_name(name, cfg.attack.norm, cfg.attack.eps, key=f"attacks[{i}]", **shared)
        attacks.append(atk)
    return attacks, eps_out, "+".join(str(n) for n in names)


def targeted_options(node: Any) -> dict[str, Any]:
    """``{"targeted": True, "target": ...}`` from an attack node in targeted mode, else {}: the overrides
    that put another attack config (a cascade member, the curve attack) in the same mode."""
    if "targeted" not in node:
        return {}
    check_bool("attack.targeted", node.get("targeted"))
    return {"targeted": True, "target": node.get("target", "random")} if node.get("targeted") else {}


def check_target_classes(attacks: list[Attack], num_classes: int, key: str = "attack.target") -> None:
    """A ConfigError naming ``key`` when a targeted attack's class index is not a class of the model."""
    for atk in attacks:
        if atk.targeted:
            check_target_class(atk.target_spec, num_classes, key)  # type: ignore[arg-type]


def attack_from_name(name: str, norm: str, eps: float | None, key: str, **overrides: Any) -> tuple[Attack, float | None]:
    """The attack of ``robustbench_lab/conf/attack/<name>.yaml`` under the threat model (``norm``, ``eps``), with
    ``overrides`` of its options; ``key`` names it in errors (``attacks[1]``, ``checks.square``)."""
    available = sorted(p.stem for p in (CONF_DIR / "attack").glob("*.yaml"))
    if name not in available:
        raise ConfigError(key, name, available)
    node = OmegaConf.load(CONF_DIR / "attack" / f"{name}.yaml")
    node.norm = norm
    node.eps = eps
    for k, v in overrides.items():
        node[k] = v
    return build_attack(node, key=key)


def build_defense(cfg: DictConfig) -> Defense:
    node = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(node, dict)
    node.pop("name", None)
    try:
        d = instantiate(node, _convert_="all")   # plug-ins get plain dicts and lists, never a DictConfig
    except Exception as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError("defense", node.get("_target_"), "a Defense class and its options", str(cause)) from e
    if not isinstance(d, Defense):
        raise ConfigError("defense._target_", node.get("_target_"), "a Defense subclass")
    return d


def build_model(cfg: DictConfig, card: data_mod.DataCard) -> Classifier:
    """A freshly initialised model for the data of ``card``: the zoo model ``model.name`` with
    ``model.kwargs``, or, with ``model._target_``, any factory's network wrapped with ``model.mean`` /
    ``model.std`` (none: no normalization) and its logits checked against the data's classes."""
    target = cfg.model.get("_target_")
    if not target:
        return zoo.build_classifier(cfg.model.name, card, _plain(cfg.model.get("kwargs")))
    num_classes = int(cfg.model.get("num_classes") or card.num_classes)
    net = sources.call_factory(sources.locate(target), dict(_plain(cfg.model.get("kwargs"))),
                               {"num_classes": num_classes, "in_channels": card.channels})
    mean, std = (_plain(cfg.model.get(k)) if cfg.model.get(k) is not None else None for k in ("mean", "std"))
    return sources.wrap(net, torch.zeros(2, card.channels, *card.image_size), mean, std, num_classes,
                        str(cfg.model.name), key="model._target_", value=target, norm_key="model.mean/std")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else (node or {})


def train_seed(cfg: DictConfig) -> int:
    """The seed that determines the trained weights: ``model.train_seed`` if set, else the run's ``seed``."""
    ts = cfg.model.get("train_seed")
    return int(cfg.seed if ts is None else ts)


def checkpoint_spec(cfg: DictConfig, recipe: Recipe, defense: Defense) -> dict[str, Any]:
    """The run's checkpoint spec (``core.train.checkpoint_spec``) from its config."""
    kwargs = dict(_plain(cfg.model.get("kwargs")))
    if cfg.model.get("_target_"):   # an imported architecture: its import path decides the weights too
        kwargs = {"_target_": cfg.model._target_, **kwargs}
    return train_checkpoint_spec(cfg.model.name, kwargs, cfg.data.name, int(cfg.data.n_val),
                                 int(cfg.data.split_seed), recipe, defense.training_procedure(), train_seed(cfg))


def load_model(cfg: DictConfig, device: torch.device, defense: Defense, recipe: Recipe,
               splits: data_mod.Splits, on_epoch: EpochCallback | None = None) -> tuple[Classifier, dict[str, Any]]:
    """The run's trained model: ``model.checkpoint`` if given, else the checkpoint cache, which takes the
    package's shipped checkpoint when it is the one asked for (trained when absent, or with ``retrain=true``).
    Every task loads through here, so they share one cache entry for the same model, data split, recipe,
    training-time defense and seed. Returns the model (on ``device``, eval mode) and what to record.
    ``on_epoch`` gets every training epoch's record when the model is trained here (``get_or_train``)."""
    if cfg.model.get("checkpoint"):
        with torch.random.fork_rng(devices=[]):   # the weights come from the file: leave the global stream
            model = build_model(cfg, splits.card)
        load_weights(model, Path(cfg.model.checkpoint), what="model.checkpoint")
        return model.to(device).eval(), {"checkpoint": str(cfg.model.checkpoint), "cache_hit": None}
    spec = checkpoint_spec(cfg, recipe, defense)
    torch.manual_seed(spec["seed"])
    model = build_model(cfg, splits.card)   # fresh init under the training seed
    cache = CheckpointCache(Path(cfg.paths.cache_dir) / "checkpoints")
    meta = get_or_train(model, spec, splits, recipe, cache, device, spec["seed"], defense.training_procedure(),
                        progress=bool(cfg.get("progress", True)), retrain=bool(cfg.get("retrain", False)),
                        on_epoch=on_epoch)
    return model.to(device).eval(), {
        "checkpoint": str(cache.weights_path(meta["key"])), "cache_hit": meta["cache_hit"],
        "checkpoint_source": meta.get("source", "cache" if meta["cache_hit"] else "trained"),
        "checkpoint_test_accuracy": meta.get("test_accuracy"), "train_seconds": meta.get("train_seconds")}


def check_model_config(cfg: DictConfig) -> None:
    """Build the model (and load ``model.checkpoint`` into it) before any data is read, so an option the
    architecture does not take, or a file that does not fit the model card, fails at once."""
    model = build_model(cfg, data_mod.get_card(cfg.data.name))
    if cfg.model.get("checkpoint"):
        load_weights(model, Path(cfg.model.checkpoint), what="model.checkpoint")
