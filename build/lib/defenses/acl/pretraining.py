"""ACL pre-training: the variants' contrastive losses, the warm-up cosine schedule, and the pre-training
stage on the core training loop (``robustbench_lab.core.train.run_epochs``)."""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch

from defenses.acl.augment import augment_settings, simclr_augment
from defenses.acl.contrastive_model import ContrastiveModel
from defenses.acl.dual_bn import bn_branch
from defenses.acl.lars import LARS
from defenses.acl.ntxent import contrastive_pgd, nt_xent
from defenses.acl.settings import VARIANTS, PretrainConfig
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.train import PerStepLR, run_epochs


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step ``step`` (1-based): linear warm-up from lr / warmup to lr over
    ``warmup`` steps, then cosine decay to ``min_lr`` at ``total`` (the authors' per-step schedule)."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    span = max(total - warmup, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


def contrastive_loss(cmodel: ContrastiveModel, v1: torch.Tensor, v2: torch.Tensor, variant: str,
                     cfg: PretrainConfig, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """The pre-training loss of ``variant`` for two views (B, C, H, W) of a batch; ``cmodel`` in train mode."""
    n = v1.shape[0]
    attack = dict(eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps, random_start=cfg.random_start,
                  temperature=temperature, generator=generator)
    if variant == "simclr":
        with bn_branch(cmodel, "normal"):
            z = cmodel(torch.cat([v1, v2]))
        return nt_xent(z[:n], z[n:], temperature)
    if variant == "a2a":
        a1, a2 = contrastive_pgd(cmodel, v1, v2, views="both", **attack)
        with bn_branch(cmodel, "pgd"):
            z = cmodel(torch.cat([a1, a2]))
        return nt_xent(z[:n], z[n:], temperature)
    if variant == "a2s":
        _, a2 = contrastive_pgd(cmodel, v1, v2, views="second", **attack)
        with bn_branch(cmodel, "normal"):
            z1 = cmodel(v1)
        with bn_branch(cmodel, "pgd"):
            z2 = cmodel(a2)
        return nt_xent(z1, z2, temperature)
    if variant == "ds":
        a1, a2 = contrastive_pgd(cmodel, v1, v2, views="both", **attack)
        with bn_branch(cmodel, "normal"):
            z = cmodel(torch.cat([v1, v2]))
        with bn_branch(cmodel, "pgd"):
            za = cmodel(torch.cat([a1, a2]))
        return 0.5 * nt_xent(z[:n], z[n:], temperature) + 0.5 * nt_xent(za[:n], za[n:], temperature)
    raise ConfigError("defense.variant", variant, [v for v in VARIANTS if v != "none"])


def pretrain_optimizer(params: list[torch.Tensor], cfg: PretrainConfig) -> torch.optim.Optimizer:
    """LARS (the authors') or plain SGD with momentum, per ``cfg.optimizer``."""
    if cfg.optimizer == "lars":
        return LARS(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.eta)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def pretrain(cmodel: ContrastiveModel, x_train: torch.Tensor, card: data_mod.DataCard, cfg: PretrainConfig,
             variant: str, temperature: float, device: torch.device, seed: int,
             progress: bool = False) -> dict[str, Any]:
    """Pre-train ``cmodel`` in place on ``x_train`` (N, C, H, W) uint8 or [0, 1] float (labels unused).

    Batches of ``cfg.batch_size`` images (the last incomplete batch is dropped: every step contrasts the same
    number of negatives), two augmented views each. Returns a history (per epoch: mean loss, the last
    step's learning rate, seconds).
    """
    x = x_train[:cfg.max_train] if cfg.max_train > 0 else x_train
    n = x.shape[0]
    bs = min(cfg.batch_size, n)
    if bs < 2:
        raise ConfigError("defense.pretrain.max_train", cfg.max_train, "at least 2 training points")
    steps_per_epoch = n // bs
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    order_g = torch.Generator().manual_seed(int(seed))
    dev_g = torch.Generator(device=device).manual_seed(int(seed) + 1)   # augmentation and attack starts
    aug = augment_settings(cfg, card)
    cmodel.to(device)
    opt = pretrain_optimizer([p for p in cmodel.parameters() if p.requires_grad], cfg)

    def lr_at(step: int) -> float:
        return warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr)

    def batches(_: int) -> Iterator[tuple[torch.Tensor]]:
        perm = torch.randperm(n, generator=order_g)
        for i in range(steps_per_epoch):
            yield (data_mod.to_float(x[perm[i * bs:(i + 1) * bs]]).to(device, non_blocking=True),)

    def loss(xb: torch.Tensor) -> torch.Tensor:
        v1, v2 = simclr_augment(xb, dev_g, **aug), simclr_augment(xb, dev_g, **aug)
        return contrastive_loss(cmodel, v1, v2, variant, cfg, temperature, dev_g)

    hist = run_epochs(loss, batches, opt, cfg.epochs, steps_per_epoch=steps_per_epoch, scheduler=PerStepLR(opt, lr_at),
                      on_epoch_start=lambda _: cmodel.train(),
                      on_epoch_end=lambda epoch, _: {"lr": lr_at((epoch + 1) * steps_per_epoch)},
                      columns=("lr",), desc=f"ACL {variant} pre-training", progress=progress)
    cmodel.eval()
    return {"epoch": hist["epoch"], "loss": hist["train_loss"], "lr": hist["lr"], "seconds": hist["seconds"]}
