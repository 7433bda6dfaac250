"""One evaluation run: config -> data -> model (trained or cached) -> defense -> attacks -> results.

``run(cfg, run_dir)`` is a plain function (no Hydra inside), so tests and other entry points can call it
with a composed config. ``run.py`` is the thin Hydra entry point around it.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import data as data_mod
from . import zoo
from .attack_base import MINIMIZATION, Attack
from .cache import CheckpointCache, load_weights
from .defense_base import Defense
from .errors import ConfigError
from .evaluator import evaluate, robust_accuracy_curve, summarize
from .model import Classifier
from .norms import Norm
from .results import ResultWriter, plot_curve, plot_examples, summary_markdown
from .tracking import make_tracker
from .train import Recipe, get_or_train

log = logging.getLogger(__name__)

FASHION_CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
CLASS_NAMES = {"fashion_mnist": FASHION_CLASSES, "mnist": [str(i) for i in range(10)],
               "cifar10": ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
               "svhn": [str(i) for i in range(10)]}
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
TRAIN_CODE_VERSION = 1   # bump when training code changes trained weights, to invalidate old cache entries


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu" or name == "mps" or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device", name, DEVICES, "CUDA is not available on this machine; use device=cpu or auto")
        return torch.device(name)
    raise ConfigError("device", name, DEVICES)


def build_attack(cfg: DictConfig, key: str = "attack") -> tuple[Attack, float | None]:
    """Instantiate an attack from its config node; returns the attack and its epsilon (not an attack field)."""
    node = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(node, dict)
    eps = node.pop("eps", None)
    cfg_name = node.pop("name", None)
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


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def build_attacks(cfg: DictConfig) -> tuple[list[Attack], float | None, str]:
    """The attacks of a run: ``attack`` alone, or the cascade ``attacks=[a,b,...]`` (names of attack configs).

    A cascade shares one threat model: every member gets ``attack.norm`` and ``attack.eps``. Each member
    runs only on the points still robust after the previous ones (the evaluator's robust mask).
    """
    names = cfg.get("attacks")
    if not names:
        atk, eps = build_attack(cfg.attack)
        return [atk], eps, str(cfg.attack.name)
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ConfigError("attacks", names, "a list of attack config names, e.g. attacks=[pgd,fgsm]")
    available = sorted(p.stem for p in (CONF_DIR / "attack").glob("*.yaml"))
    attacks: list[Attack] = []
    eps_out: float | None = None
    for i, name in enumerate(names):
        if name not in available:
            raise ConfigError(f"attacks[{i}]", name, available)
        node = OmegaConf.load(CONF_DIR / "attack" / f"{name}.yaml")
        node.norm = cfg.attack.norm
        node.eps = cfg.attack.eps
        atk, eps_out = build_attack(node, key=f"attacks[{i}]")
        attacks.append(atk)
    return attacks, eps_out, "+".join(str(n) for n in names)


def build_defense(cfg: DictConfig) -> Defense:
    node = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(node, dict)
    node.pop("name", None)
    try:
        d = instantiate(node)
    except Exception as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError("defense", node.get("_target_"), "a Defense class and its options", str(cause)) from e
    if not isinstance(d, Defense):
        raise ConfigError("defense._target_", node.get("_target_"), "a Defense subclass")
    return d


def build_model(cfg: DictConfig, card: data_mod.DataCard) -> Classifier:
    mcard = zoo.get_card(cfg.model.name)
    kwargs = dict(_plain(cfg.model.get("kwargs")))
    try:
        net = mcard.builder(card.channels, card.num_classes, card.image_size, **kwargs)
    except TypeError as e:   # an option the architecture does not take
        raise ConfigError("model.kwargs", kwargs, f"the options of model {mcard.name!r}", str(e)) from e
    mean = mcard.mean if mcard.mean is not None else card.mean
    std = mcard.std if mcard.std is not None else card.std
    return Classifier(net, mean, std, card.num_classes, mcard.bounds, name=mcard.name)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else (node or {})


def train_seed(cfg: DictConfig) -> int:
    """The seed that determines the trained weights: ``model.train_seed`` if set, else the run's ``seed``."""
    ts = cfg.model.get("train_seed")
    return int(cfg.seed if ts is None else ts)


def checkpoint_spec(cfg: DictConfig, recipe: Recipe, defense: Defense) -> dict[str, Any]:
    proc = defense.training_procedure()
    return {
        "version": TRAIN_CODE_VERSION,
        "model": {"name": cfg.model.name, "kwargs": _plain(cfg.model.get("kwargs"))},
        "data": {"name": cfg.data.name, "n_val": int(cfg.data.n_val), "split_seed": int(cfg.data.split_seed)},
        "recipe": {k: v for k, v in vars(recipe).items()},
        "training": proc.spec() if proc is not None else {"procedure": "standard"},
        "seed": train_seed(cfg),
    }


def validate(cfg: DictConfig) -> None:
    """Checks that need no data or model, so bad input fails before any work is done.

    Types and key names are checked at composition (``robustbench_lab.schema``); here: keys force-added
    with ``+`` that no schema declares, registered names, value ranges (the evaluation subset against the
    test-set size, read from the files' headers where the format has them), an explicit checkpoint file.
    """
    from .schema import unknown_keys
    for key, declared in unknown_keys(cfg):
        raise ConfigError(key, OmegaConf.select(cfg, key), declared, "unknown key (no schema declares it; a "
                          "'+key=value' override adds a key, it cannot rename one)")
    data_mod.check_split_args(cfg.data.name, cfg.data.root, cfg.data.get("n_val"), cfg.data.get("n_eval"),
                              cfg.data.get("split_seed"))
    zoo.get_card(cfg.model.name)
    ckpt = cfg.model.get("checkpoint")
    if ckpt and not Path(str(ckpt)).expanduser().is_file():
        raise ConfigError("model.checkpoint", ckpt, "null (train or use the cache) or the path of an existing "
                          "weights file (.safetensors, or a torch state dict loaded weights-only)")
    if not isinstance(cfg.seed, int):
        raise ConfigError("seed", cfg.seed, "an integer")
    bs = cfg.get("batch_size")
    if not isinstance(bs, int) or bs < 1:
        raise ConfigError("batch_size", bs, "an integer >= 1")
    Recipe.from_config(cfg.model.get("train"))
    from .checks import LEVELS
    if str(cfg.get("checks", "quick")) not in LEVELS:
        raise ConfigError("checks", cfg.get("checks"), LEVELS)


TASKS = ("evaluate", "linearize")


def task_of(cfg: DictConfig) -> str:
    """The run's ``task`` (evaluate when absent), checked against ``TASKS``."""
    task = cfg.get("task", "evaluate")
    if task not in TASKS:
        raise ConfigError("task", task, TASKS)
    return str(task)


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one evaluation (or, with ``task=linearize``, the linearization analysis) into ``run_dir``.
    Returns the metrics."""
    if task_of(cfg) == "linearize":
        from .linearization.app import run_linearize
        return run_linearize(cfg, Path(run_dir))
    t_start = time.time()
    run_dir = Path(run_dir)
    validate(cfg)
    device = resolve_device(cfg.device)
    attacks, eps, attack_label = build_attacks(cfg)
    defense = build_defense(cfg.defense)
    recipe = Recipe.from_config(cfg.model.get("train"))
    tracker = make_tracker(cfg.get("logger"))
    tracker.start(config=OmegaConf.to_container(cfg, resolve=True), run_dir=run_dir,
                  name=f"{attack_label}-{cfg.defense.name}-{cfg.model.name}-s{cfg.seed}",
                  group=cfg.logger.get("group") if cfg.get("logger") else None,
                  tags=[f"attack:{a.name}" for a in attacks] + [f"defense:{cfg.defense.name}", f"model:{cfg.model.name}",
                        f"data:{cfg.data.name}"])
    exit_code = 1
    try:
        metrics = _run(cfg, run_dir, device, attacks, attack_label, eps, defense, recipe, tracker, t_start)
        exit_code = 0
        return metrics
    finally:
        tracker.finish(exit_code)


def _run(cfg, run_dir, device, attacks, attack_label, eps, defense, recipe, tracker, t_start) -> dict[str, Any]:
    attack = attacks[-1]
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg, data_mod.get_card(cfg.data.name))
    ckpt_info: dict[str, Any] = {}
    if cfg.model.get("checkpoint"):   # before the data: a file that does not fit the model card fails at once
        load_weights(model, Path(cfg.model.checkpoint), what="model.checkpoint")
        ckpt_info = {"checkpoint": str(cfg.model.checkpoint), "cache_hit": None}
    splits = data_mod.load_splits(cfg.data.name, cfg.data.root, bool(cfg.data.download), int(cfg.data.n_val),
                                  int(cfg.data.n_eval), int(cfg.data.split_seed))
    if cfg.model.get("checkpoint"):
        model.to(device).eval()
    else:
        spec = checkpoint_spec(cfg, recipe, defense)
        torch.manual_seed(spec["seed"])
        model = build_model(cfg, splits.card)   # fresh init under the training seed
        cache = CheckpointCache(Path(cfg.paths.cache_dir) / "checkpoints")
        meta = get_or_train(model, spec, splits, recipe, cache, device, spec["seed"],
                            defense.training_procedure(), progress=bool(cfg.get("progress", True)))
        ckpt_info = {"checkpoint": str(cache.weights_path(meta["key"])), "cache_hit": meta["cache_hit"],
                     "checkpoint_test_accuracy": meta.get("test_accuracy"), "train_seconds": meta.get("train_seconds")}
    writer = ResultWriter(run_dir)
    defended = defense.transform(model, {"splits": splits, "device": device, "cfg": cfg, "run_dir": run_dir,
                                         "writer": writer, "seed": int(cfg.seed),
                                         "cache_dir": Path(cfg.paths.cache_dir)})
    defended.to(device).eval()

    x = data_mod.to_float(splits.x_eval).to(device)
    y = splits.y_eval.to(device)
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    ev = evaluate(defended, x, y, attacks, eps, gen, batch_size=int(cfg.batch_size),
                  indices=splits.eval_indices.tolist())
    summ = summarize(ev, attacks, eps)
    from .checks import report as checks_report, run_checks
    t_chk = time.time()
    check_gen = torch.Generator(device=device).manual_seed(int(cfg.seed) + 1_000_003)
    chk = checks_report(run_checks(defended, x, y, attacks, eps, ev.robust, ev.x_adv, ev.n_nan,
                                   str(cfg.get("checks", "quick")), check_gen, int(cfg.batch_size),
                                   table=ev.table))
    chk["checks_seconds"] = time.time() - t_chk
    metrics: dict[str, Any] = {
        "dataset": cfg.data.name, "model": cfg.model.name, "defense": cfg.defense.name, "attack": attack_label,
        "norm": attack.norm.value, "eps": eps, **summ, "seed": int(cfg.seed), "device": str(device),
        "attacks": [a.name for a in attacks], "attack_config": {a.name: a.config() for a in attacks},
        "per_attack": {a.name: {**ev.attack_counts[a.name], "seconds": ev.attack_seconds[a.name]} for a in attacks},
        "defense_config": defense.describe(), **ckpt_info,
        "torch_version": torch.__version__, "python": platform.python_version(),
        "pid": os.getpid(), "started_at": t_start, **chk,
    }

    table = ev.table
    writer.write_table("per_example", table)
    writer.write_json("eval_indices.json", {"dataset": cfg.data.name, "split": "test",
                                            "indices": splits.eval_indices.tolist()})
    extra_sections = []
    if all(a.family == MINIMIZATION for a in attacks):
        pe = ev.per_example()
        norms = np.where(pe["broken_by"].notna(), pe["linf" if attack.norm is Norm.LINF else "l2"], np.inf)
        finite = norms[np.isfinite(norms)]
        top = float(np.quantile(finite, 0.99)) * 1.1 if finite.size else 1.0
        grid = np.linspace(0, top, 41)
        curve = robust_accuracy_curve(norms, pe["clean_correct"].to_numpy(), grid)
        writer.write_csv("robust_accuracy_curve.csv", curve)
        plot_curve(writer.path("robust_accuracy_curve.png"), curve,
                   f"{attack_label} on {cfg.model.name}/{cfg.data.name}", f"epsilon ({attack.norm.value})")
        extra_sections.append("Robust accuracy vs epsilon (from minimal norms): robust_accuracy_curve.csv/.png")
    pe = ev.per_example()
    sel = np.array(pe.index[pe["broken_by"].notna()].to_numpy()[:8])
    if sel.size == 0:
        sel = np.arange(min(8, len(pe)))
    plot_examples(writer.path("examples.png"), x[sel].cpu(), ev.x_adv[sel].cpu(), pe["label"].to_numpy()[sel],
                  pe["clean_pred"].to_numpy()[sel],
                  np.where(pe["broken_by"].notna(), pe["adv_pred"], pe["clean_pred"]).astype(int)[sel],
                  CLASS_NAMES.get(cfg.data.name))
    metrics["seconds"] = time.time() - t_start
    metrics["finished_at"] = time.time()
    writer.write_text("summary.md", summary_markdown(metrics, extra_sections))
    for name in ("examples.png", "robust_accuracy_curve.png"):
        if name in writer.files:
            pass
    final = writer.commit(metrics)
    tracker.log_metrics({f"clean/accuracy": metrics["clean_accuracy"], "robust/accuracy": metrics["robust_accuracy"],
                         **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
    tracker.log_table("per_example", table)
    for name in ("examples.png", "robust_accuracy_curve.png"):
        if (run_dir / name).is_file():
            tracker.log_image(name.split(".")[0], run_dir / name)
    log.info("results: %s", final.parent)
    return metrics


def execute(cfg: DictConfig, run_dir: Path, multirun: bool = False, overrides: list[str] | None = None) -> float:
    """Run one cell with resumption and failure capture. Returns robust accuracy (NaN for a failed cell);
    for ``task=linearize``, the run's ``objective`` (robustbench_lab.linearization.app).

    A cell already finished (same config key in ``paths.cells_dir``) is restored into ``run_dir`` unless
    ``resume=false``. A failure writes ``failed.json`` into ``run_dir``; in a multirun it is logged and the
    sweep goes on, in a single run it is raised (non-zero exit).
    """
    import json
    import traceback

    from .cache import atomic_write_text
    from .cells import CellStore, cell_key

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    log.info("output directory: %s", run_dir)
    task = task_of(cfg)
    key = cell_key(cfg)
    store = CellStore(cfg.paths.cells_dir)
    if cfg.get("resume", True) and store.done(key):
        m = store.restore(key, run_dir)   # None: the stored cell was damaged and is removed; recompute it
        if m is not None:
            log.info("cell %s already finished: restored its results (resume=false recomputes)", key)
            if task == "linearize":
                print(f"[cell {key} done before] linearization | results in {run_dir}")
                return float(m.get("objective", float("nan")))
            print(f"[cell {key} done before] robust accuracy {m['robust_accuracy']:.4f} | results in {run_dir}")
            return float(m["robust_accuracy"])
    try:
        metrics = run(cfg, run_dir)
    except Exception as e:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "failed.json", json.dumps({
            "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
            "overrides": " ".join(overrides or []), "cell": key}, indent=2))
        if multirun:
            log.error("job failed (%s: %s); the sweep goes on. Details: %s", type(e).__name__, e, run_dir / "failed.json")
            return float("nan")
        raise
    store.put(key, run_dir, cfg)
    if task == "linearize":
        print(f"linearization of {metrics['model']} ({metrics['n_units']} units, boundary {metrics['boundary']}) | "
              f"results in {run_dir}")
        return float(metrics.get("objective", float("nan")))
    print(f"clean accuracy {metrics['clean_accuracy']:.4f} | robust accuracy {metrics['robust_accuracy']:.4f} "
          f"({metrics['attack']}, {metrics['norm']}, eps={metrics['eps']}) | results in {run_dir}")
    return float(metrics["robust_accuracy"])
