"""The pre-trained encoder's cache entry: keyed on the run's model, data split and seed and the pre-training
settings only, so runs that differ downstream (protocol, fine-tuning recipe, selection) pre-train once."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from defenses.acl.contrastive_model import ContrastiveModel, check_head
from defenses.acl.pretraining import pretrain
from defenses.acl.settings import ACL_CODE_VERSION, PretrainConfig
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.cache import CheckpointCache, content_key
from robustbench_lab.core.train import load_or_build

log = logging.getLogger(__name__)


def encoder_key_spec(run_spec: Mapping[str, Any] | None, pretrain_spec: dict[str, Any]) -> dict[str, Any]:
    """The cache spec of the pre-trained encoder: the run's model, data split and seed (from its checkpoint
    spec ``run_spec``) and the pre-training settings; nothing of the fine-tuning."""
    rs = dict(run_spec or {})
    return {"stage": "acl_pretrain", "version": rs.get("version"), "acl_version": ACL_CODE_VERSION,
            "model": rs.get("model"), "data": rs.get("data"), "seed": rs.get("seed"), "pretrain": pretrain_spec}


def get_or_pretrain(model: nn.Module, splits: data_mod.Splits, device: torch.device, seed: int,
                    cache: CheckpointCache | None, key_spec: dict[str, Any], *, variant: str, temperature: float,
                    proj_dims: Sequence[int] | None, cfg: PretrainConfig,
                    progress: bool) -> tuple[ContrastiveModel, dict[str, Any]]:
    """The pre-trained contrastive model for ``model``'s architecture: from the cache, or pre-trained now
    (and stored when there is a cache). Returns it (on ``device``) and its info (key, cache_hit, history)."""
    check_head(model, data_mod.to_float(splits.x_train[:2]).to(next(model.parameters()).device))
    with torch.random.fork_rng(devices=[]):   # the projection head's init, without touching the caller's RNG
        torch.manual_seed(int(seed) + 7)
        cmodel = ContrastiveModel(model, proj_dims)
    if cmodel.n_dual == 0:
        log.warning("ACL: %s has no BatchNorm; the normal and pgd branches are one and the same network",
                    getattr(model, "name", "the model"))
    key = content_key(key_spec)

    def build() -> dict[str, Any]:
        return {"history": pretrain(cmodel, splits.x_train, splits.card, cfg, variant, temperature, device, seed,
                                    progress)}

    if cache is None:
        return cmodel, {"key": key, "cache_hit": False, **build()}
    meta, hit = load_or_build(cache, key, cmodel, key_spec, build)
    log.info("ACL: %s the pre-trained encoder %s", "loaded" if hit else "stored", cache.weights_path(key))
    return cmodel.to(device), {"key": key, "cache_hit": hit, "history": meta.get("history")}
