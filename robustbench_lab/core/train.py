"""Training loop, recipes, and the train-or-load-from-cache entry point."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustbench_lab.core import data as data_mod
from robustbench_lab.core.cache import CheckpointCache, content_key
from robustbench_lab.core.defense_base import StandardTraining, TrainingProcedure
from robustbench_lab.core.model import predict
from robustbench_lab.core.recipe import Recipe

log = logging.getLogger(__name__)

TRAIN_CODE_VERSION = 1   # bump when training code changes trained weights, to invalidate old cache entries


def _scheduler(opt: torch.optim.Optimizer, r: Recipe, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    if r.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=max(total, 1),
                                                   pct_start=r.warmup_frac, anneal_strategy="cos",
                                                   div_factor=10.0, final_div_factor=100.0)
    if r.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    if r.schedule == "step":
        ms = [int(m * total) for m in r.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=ms, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def train(model: nn.Module, splits: data_mod.Splits, recipe: Recipe, device: torch.device,
          seed: int, procedure: TrainingProcedure | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``model`` (a Classifier on [0, 1] inputs) in place. Returns a history dict.

    Randomness (initial order, augmentation, any attack inside the procedure) comes from one generator
    seeded with ``seed``; weight initialisation is done by the caller under the same seed.
    """
    procedure = procedure or StandardTraining(recipe.label_smoothing)
    x_tr, y_tr = splits.x_train, splits.y_train
    if recipe.max_train > 0:
        x_tr, y_tr = x_tr[:recipe.max_train], y_tr[:recipe.max_train]
    g = torch.Generator().manual_seed(int(seed))
    dev_g = torch.Generator(device=device).manual_seed(int(seed) + 1)
    # Optional procedure hooks: ``prepare(model, splits, device)`` builds per-training state (neural guidance
    # fits its targets and sizes its head), ``parameters()`` are extra trainable tensors (that head) that share
    # the model's optimizer and schedule but are not part of the model (nor of its checkpoint).
    if callable(getattr(procedure, "prepare", None)):
        procedure.prepare(model, splits, device)   # type: ignore[attr-defined]
    params = [p for p in model.parameters() if p.requires_grad]
    if callable(getattr(procedure, "parameters", None)):
        params += [p for p in procedure.parameters() if p.requires_grad]   # type: ignore[attr-defined]
    if recipe.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                                                     nesterov=recipe.nesterov and recipe.momentum > 0,
                                                     weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(x_tr.shape[0] / recipe.batch_size)
    sched = _scheduler(opt, recipe, steps_per_epoch * recipe.epochs)
    history: dict[str, Any] = {"epoch": [], "train_loss": [], "val_accuracy": [], "seconds": []}
    model.to(device)
    t0 = time.time()
    for epoch in range(recipe.epochs):
        model.train()
        total, n = 0.0, 0
        bar = tqdm(data_mod.batches(x_tr, y_tr, recipe.batch_size, shuffle=True, generator=g),
                   total=steps_per_epoch, desc=f"train epoch {epoch + 1}/{recipe.epochs}",
                   disable=not progress, leave=False, mininterval=2.0)
        for xb, yb in bar:
            xb = data_mod.to_float(xb)
            if recipe.augment:
                xb = data_mod.augment(xb, splits.card, g)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = procedure.loss(model, xb, yb, dev_g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * yb.shape[0]
            n += yb.shape[0]
            bar.set_postfix(loss=f"{total / n:.3f}", refresh=False)
        val_acc = accuracy(model, splits.x_val, splits.y_val, device) if splits.x_val.shape[0] else float("nan")
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(total / max(n, 1))
        history["val_accuracy"].append(val_acc)
        history["seconds"].append(time.time() - t0)
        log.info("epoch %d/%d: train loss %.4f, val accuracy %.4f (%.0fs)", epoch + 1, recipe.epochs,
                 total / max(n, 1), val_acc, time.time() - t0)
    model.eval()
    return history


def accuracy(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, device: torch.device,
             batch_size: int = 1000) -> float:
    if x_uint8.shape[0] == 0:
        return float("nan")
    correct = 0
    for i in range(0, x_uint8.shape[0], batch_size):
        xb = data_mod.to_float(x_uint8[i:i + batch_size]).to(device)
        correct += int((predict(model, xb) == y[i:i + batch_size].to(device)).sum())
    return correct / x_uint8.shape[0]


def checkpoint_spec(model: str, model_kwargs: dict[str, Any], data: str, n_val: int, split_seed: int,
                    recipe: Recipe, procedure: TrainingProcedure | None, seed: int) -> dict[str, Any]:
    """Everything that decides a trained model's weights: its checkpoint key is the hash of this."""
    return {
        "version": TRAIN_CODE_VERSION,
        "model": {"name": model, "kwargs": dict(model_kwargs or {})},
        "data": {"name": data, "n_val": int(n_val), "split_seed": int(split_seed)},
        "recipe": {k: v for k, v in vars(recipe).items()},
        "training": procedure.spec() if procedure is not None else {"procedure": "standard"},
        "seed": int(seed),
    }


def get_or_train(model: nn.Module, spec: dict[str, Any], splits: data_mod.Splits, recipe: Recipe,
                 cache: CheckpointCache, device: torch.device, seed: int,
                 procedure: TrainingProcedure | None = None, progress: bool = True) -> dict[str, Any]:
    """Load the checkpoint for ``spec`` from the cache, or train and store it. Returns the cache metadata.

    Training of one key is serialized across processes by a file lock: a second job waiting on the lock
    finds the finished checkpoint and loads it instead of training again.
    """
    key = content_key(spec)
    meta = cache.load(key, model, spec)
    if meta is not None:
        log.info("loaded cached checkpoint %s", cache.weights_path(key))
        model.to(device).eval()
        return {**meta, "cache_hit": True}
    with cache.lock(key):
        meta = cache.load(key, model, spec)
        if meta is not None:
            model.to(device).eval()
            return {**meta, "cache_hit": True}
        log.info("training %s (checkpoint key %s)", spec.get("model", {}).get("name", "model"), key)
        fit = getattr(procedure, "fit", None)
        if callable(fit):   # a procedure with its own schedule (ACL: cached pre-training, then fine-tuning)
            hist = fit(model, splits, recipe, device, seed, cache=cache, spec=spec, progress=progress)
        else:
            hist = train(model, splits, recipe, device, seed, procedure, progress)
        test_acc = accuracy(model, splits.x_test, splits.y_test, device)
        extra = {"history": hist, "test_accuracy": test_acc, "train_seconds": hist["seconds"][-1] if hist["seconds"] else 0.0}
        cache.save(key, model.cpu(), spec, extra)
        model.to(device).eval()
        log.info("trained: test accuracy %.4f; checkpoint %s", test_acc, cache.weights_path(key))
        return {"key": key, "spec": spec, **extra, "cache_hit": False}
