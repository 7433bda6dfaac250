"""``task=linearize``: the linearization analysis of a trained ResNet (Rothauge et al., arXiv 1905.13386).

``run_linearize(cfg, run_dir)`` is called by ``robustbench_lab.app.execute.run_task`` when ``task=linearize``. Data flow:
validate the ``linearize`` node (before any data is read) -> model from the same checkpoint cache as an
evaluation (trained if absent; BatchNorm in eval mode, parameters frozen) -> test images (the first
``n_images`` correctly classified points of the ``data.n_eval`` subset) -> the analyses of
``robustbench_lab.linearization.analyses`` -> tables, plots, ``summary.md`` and ``metrics.json`` (last,
through ``ResultWriter``: a directory with ``metrics.json`` holds complete results). The cell store of
``app.execute`` restores a finished run like an evaluation cell (the files are listed in ``result_files``).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from robustbench_lab.app.builders import build_attack, build_defense, build_model, check_model_config, load_model
from robustbench_lab.app.tracking import make_tracker
from robustbench_lab.app.validate import validate
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.attack_base import Attack
from robustbench_lab.core.defense_base import Defense
from robustbench_lab.core.device import resolve_device
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.model import eval_frozen, predict
from robustbench_lab.core.norms import Norm
from robustbench_lab.core.results import ResultWriter
from robustbench_lab.core.recipe import Recipe
from robustbench_lab.linearization.analyses.context import Context, Images, check_units
from robustbench_lab.linearization.analyses.runner import run_all, summary_markdown
from robustbench_lab.linearization.operators import TorchJacobian
from robustbench_lab.linearization.options import BACKENDS, LinearizeOptions

log = logging.getLogger(__name__)

def parse_options(cfg: DictConfig) -> LinearizeOptions:
    """The ``linearize`` node's values, checked (its keys and types are checked at composition)."""
    return LinearizeOptions.from_dict(OmegaConf.to_container(cfg.linearize, resolve=True))


def operator_factory(backend: str) -> Callable[..., Any]:
    """``make(fn, x0, batch_size, dtype)`` -> a Jacobian operator (``n_in``, ``n_out``, ``jvp``, ``vjp``).

    The JAX backend is imported only when asked for, so a machine without jax runs the torch backend.
    """
    if backend == "torch":
        return TorchJacobian
    try:
        import jax  # noqa: F401
    except ImportError as e:
        raise ConfigError("linearize.backend", backend, BACKENDS,
                          "jax is not installed here; use linearize.backend=torch or install jax (pip install jax)"
                          ) from e
    # the one lazy project import: jax is heavy and optional, and only this backend needs it
    from robustbench_lab.linearization.jax_backend import JaxJacobian
    return JaxJacobian


def build_perturbation_attack(cfg: DictConfig) -> tuple[Attack, float | None]:
    """The attack that makes the adversarial perturbations: an L2 Attack node, built like ``attack``."""
    node = cfg.linearize.perturbation.get("attack")
    if node is None or not OmegaConf.is_dict(node):
        raise ConfigError("linearize.perturbation.attack", node, "an attack node with _target_ (as in "
                          "robustbench_lab/conf/attack/*.yaml), norm l2")
    atk, eps = build_attack(node, key="linearize.perturbation.attack")
    if atk.norm is not Norm.L2:
        raise ConfigError("linearize.perturbation.attack.norm", atk.norm.value, ["l2"],
                          "random and adversarial perturbations are compared at equal L2 norm")
    return atk, eps


def _training_defense(cfg: DictConfig) -> Defense:
    """The defense node decides the checkpoint (its training procedure); a model transform is refused."""
    defense = build_defense(cfg.defense)
    if type(defense).transform is not Defense.transform:
        raise ConfigError("defense", cfg.defense.get("name"), "none or a training-time defense (adv_training, "
                          "trades)", "task=linearize analyses the trained network as is; a model transform "
                          "such as jumprelu would not be applied")
    return defense


def run_linearize(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the analyses of ``cfg.linearize.analyses`` and write their results into ``run_dir``.

    Returns the metrics (also written as ``metrics.json``, last). Raises ``ConfigError`` for a bad value,
    before any data is read.
    """

    t_start = time.time()
    run_dir = Path(run_dir)
    validate(cfg)
    opts = parse_options(cfg)
    make_op = operator_factory(opts.backend)
    device = resolve_device(cfg.device)
    defense = _training_defense(cfg)
    recipe = Recipe.from_config(cfg.model.get("train"))
    attack: tuple[Attack, float | None] | None = None
    if {"propagation", "energy"} & set(opts.analyses):
        attack = build_perturbation_attack(cfg)
    if int(cfg.data.n_eval) < opts.images_needed:
        raise ConfigError("data.n_eval", int(cfg.data.n_eval), f"an integer >= {opts.images_needed}",
                          "the images of the linearization are drawn from the evaluation subset")
    # the architecture must have residual units: checked on a fresh build, before any data is read
    card = data_mod.get_card(cfg.data.name)
    probe = build_model(cfg, card)
    check_units(probe.net, opts, cfg.model.name)

    tracker = make_tracker(cfg.get("logger"))
    tracker.start(config=OmegaConf.to_container(cfg, resolve=True), run_dir=run_dir,
                  name=f"linearize-{cfg.model.name}-{cfg.data.name}-s{cfg.seed}",
                  group=cfg.logger.get("group") if cfg.get("logger") else None,
                  tags=["task:linearize", f"model:{cfg.model.name}", f"data:{cfg.data.name}",
                        f"defense:{cfg.defense.name}"], job_type="linearize")
    exit_code = 1
    try:
        metrics = _run(cfg, run_dir, opts, make_op, device, defense, recipe, attack, tracker, t_start)
        exit_code = 0
        return metrics
    finally:
        tracker.finish(exit_code)


def _run(cfg: DictConfig, run_dir: Path, opts: LinearizeOptions, make_op: Callable[..., Any], device: torch.device,
         defense: Defense, recipe: Recipe, attack: tuple[Attack, float | None] | None, tracker: Any,
         t_start: float) -> dict[str, Any]:

    torch.manual_seed(int(cfg.seed))
    check_model_config(cfg)   # before the data: a file that does not fit the model card fails at once
    splits = data_mod.load_splits(cfg.data.name, cfg.data.root, bool(cfg.data.download), int(cfg.data.n_val),
                                  int(cfg.data.n_eval), int(cfg.data.split_seed))
    model, ckpt_info = load_model(cfg, device, defense, recipe, splits, on_epoch=tracker.log_epoch)
    writer = ResultWriter(run_dir)

    x_all = data_mod.to_float(splits.x_eval).to(device)
    y_all = splits.y_eval.to(device)
    pred = predict(model, x_all, batch_size=int(cfg.batch_size))
    correct = (pred == y_all).nonzero().flatten()
    if correct.numel() < opts.images_needed:
        raise ConfigError("data.n_eval", int(cfg.data.n_eval), f"enough points for {opts.images_needed} "
                          f"correctly classified images", f"only {correct.numel()} of the subset are correct")
    sel = correct[:opts.images_needed]
    images = Images(x=x_all[sel], y=y_all[sel], index=splits.eval_indices[sel.cpu()].tolist())

    with eval_frozen(model, warn_train=False):   # BatchNorm on running statistics; no parameter gradients
        ctx = Context(model=model, opts=opts, images=images, writer=writer, make_op=make_op,
                         seed=int(cfg.seed), label=f"{cfg.model.name} / {cfg.data.name}")
        results = run_all(ctx, attack)

    metrics: dict[str, Any] = {
        "task": "linearize", "dataset": cfg.data.name, "model": cfg.model.name, "defense": cfg.defense.name,
        "attack": attack[0].name if attack else None, "norm": "l2", "eps": attack[1] if attack else None,
        "block": ctx.block_type, "boundary": "+".join(opts.boundaries), "backend": opts.backend,
        "method": opts.method, "k": opts.k, "tol": opts.tol, "dtype": opts.dtype,
        "analyses": list(opts.analyses), "n_images": len(images.index), "image_indices": images.index,
        "n_units": len(ctx.all_units), "n_units_analysed": len(ctx.units), "units": [u.name for u in ctx.units],
        "clean_accuracy": float((pred == y_all).float().mean()), "n_examples": int(y_all.numel()),
        **results.metrics, "seed": int(cfg.seed), "device": str(device), **ckpt_info,
        "torch_version": torch.__version__, "python": platform.python_version(), "pid": os.getpid(),
        "started_at": t_start,
    }
    # what app.execute returns (a sweeper's objective): the adversarial/random jump at the last unit
    metrics["objective"] = metrics.get("propagation/adv_over_random_last", float("nan"))
    metrics["seconds"] = time.time() - t_start
    metrics["finished_at"] = time.time()
    writer.write_text("summary.md", summary_markdown(metrics, results.sections))
    metrics["result_files"] = sorted(writer.files)
    final = writer.commit(metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for name, df in results.tables.items():
        tracker.log_table(name, df)
    for name in metrics["result_files"]:
        if name.endswith(".png"):
            tracker.log_image(name[:-4], run_dir / name)
    log.info("results: %s", final.parent)
    return metrics
