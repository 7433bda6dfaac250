"""ACL fine-tuning: the downstream protocols (SLF, ALF, AFF) on the core training loop, with the epoch kept
by validation accuracy (robust or clean)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from attacks.pgd import PGD
from defenses.acl.contrastive_model import find_head
from defenses.acl.settings import DownstreamConfig
from defenses.adv_training import AdversarialTrainingProcedure
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.evaluator import attack_points
from robustbench_lab.core.model import predict
from robustbench_lab.core.recipe import Recipe
from robustbench_lab.core.train import StandardTraining, TrainingProcedure, train_classifier


def selection_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
                       seed: int, batch_size: int = 500) -> tuple[float, float]:
    """(clean, PGD robust) accuracy of ``model`` on float ``x`` (N, C, H, W) in [0, 1], every point attacked
    (L-inf PGD-CE with a random start); fixed random starts per call (``seed``)."""
    n = x.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    atk = PGD(norm="linf", steps=steps, step_size=step, random_start=True)
    out = attack_points(model, atk, x, y, eps, gen, batch_size, mask=torch.ones(n, dtype=torch.bool, device=x.device))
    return int(out.clean_correct.sum()) / n, int(out.robust.sum()) / n


def finetune(model: nn.Module, splits: data_mod.Splits, recipe: Recipe, protocol: str, cfg: DownstreamConfig,
             device: torch.device, seed: int, progress: bool = False) -> dict[str, Any]:
    """Fine-tune ``model`` (a Classifier) in place with ``protocol`` and the run's ``recipe``; keep the epoch
    selected on validation data. Returns a history (per epoch: train loss, validation clean and robust
    accuracy; ``selected_epoch``)."""
    n_sel = splits.x_val.shape[0] if cfg.select_n == 0 else min(cfg.select_n, splits.x_val.shape[0])
    if cfg.select_by != "last" and n_sel == 0:
        raise ConfigError("data.n_val", splits.x_val.shape[0], "> 0 (or defense.downstream.select_by=last)",
                          "ACL selects the fine-tuned epoch on validation data")
    xv = data_mod.to_float(splits.x_val[:n_sel]).to(device)
    yv = splits.y_val[:n_sel].to(device)
    _, head = find_head(model)
    linear = protocol in ("slf", "alf")
    grads = {p: p.requires_grad for p in model.parameters()}
    if linear:   # frozen encoder: only the head learns
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
    procedure: TrainingProcedure = (
        StandardTraining(recipe.label_smoothing) if protocol == "slf" else
        AdversarialTrainingProcedure("trades", PGD(norm="linf", steps=cfg.steps, step_size=cfg.step_size), cfg.eps,
                                     cfg.beta, cfg.trades_init_std))
    best: dict[str, Any] = {"score": -math.inf, "state": None, "epoch": 0}

    def set_modes(_: int) -> None:
        model.train()
        if linear:   # BN of a frozen encoder keeps its pre-trained statistics
            model.eval()
            head.train()

    def select(epoch: int, _: float) -> dict[str, float]:
        model.eval()
        if cfg.select_by == "robust" or (n_sel and epoch == recipe.epochs - 1):
            clean, rob = selection_accuracy(model, xv, yv, cfg.sel_eps, cfg.sel_step, cfg.select_steps, seed + 2)
        else:
            clean = float((predict(model, xv) == yv).float().mean()) if n_sel else float("nan")
            rob = float("nan")
        score = {"robust": rob, "clean": clean, "last": float(epoch)}[cfg.select_by]
        if score > best["score"]:   # strict: the first best epoch on ties
            best.update(score=score, state=copy.deepcopy(model.state_dict()), epoch=epoch + 1)
        return {"val_accuracy": clean, "val_robust_accuracy": rob}

    try:
        hist = train_classifier(model, splits, recipe, device, seed, procedure,
                                [p for p in model.parameters() if p.requires_grad], on_epoch_start=set_modes,
                                on_epoch_end=select, columns=("val_accuracy", "val_robust_accuracy"),
                                desc=f"ACL {protocol} fine-tuning", progress=progress)
    finally:
        for p, r in grads.items():
            p.requires_grad_(r)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return {**hist, "selected_epoch": best["epoch"], "protocol": protocol}
