"""ACL's training procedure: pre-train (or load the cached encoder), transfer it into the classifier,
fine-tune. Its ``spec()`` enters the checkpoint key."""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch
from torch import nn

from defenses.acl.contrastive_model import load_pretrained
from defenses.acl.encoder_cache import encoder_key_spec, get_or_pretrain
from defenses.acl.finetuning import finetune
from defenses.acl.settings import ACL_CODE_VERSION, DownstreamConfig, PretrainConfig
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.cache import CheckpointCache
from robustbench_lab.core.defense_base import TrainingProcedure
from robustbench_lab.core.recipe import Recipe


class ACLProcedure(TrainingProcedure):
    """A training procedure whose ``fit`` is the whole two-stage training (``get_or_train`` calls it); it has
    no per-batch ``loss`` of its own (fine-tuning builds its loss from the protocol)."""

    def __init__(self, variant: str, protocol: str, temperature: float, proj_dims: list[int] | None,
                 transfer_bn: str, pretrain: PretrainConfig, downstream: DownstreamConfig) -> None:
        self.variant, self.protocol = variant, protocol
        self.temperature = float(temperature)
        self.proj_dims = proj_dims
        self.transfer_bn = transfer_bn
        self.pretrain_cfg, self.downstream = pretrain, downstream
        self.last_fit: dict[str, Any] | None = None

    @property
    def branch(self) -> str:
        """The BN set carried into the classifier: the adversarial branch's, except for SimCLR (never trains
        its pgd set)."""
        if self.transfer_bn != "auto":
            return self.transfer_bn
        return "normal" if self.variant == "simclr" else "pgd"

    def pretrain_spec(self) -> dict[str, Any]:
        if self.variant == "none":
            return {"variant": "none"}
        return {"variant": self.variant, "temperature": self.temperature, "proj_dims": self.proj_dims,
                **self.pretrain_cfg.spec()}

    def spec(self) -> dict[str, Any]:
        return {"procedure": "acl", "acl_version": ACL_CODE_VERSION, "pretrain": self.pretrain_spec(),
                "downstream": {"protocol": self.protocol,
                               "transfer_bn": self.branch if self.variant != "none" else None,
                               **self.downstream.spec()}}

    def encoder_key_spec(self, run_spec: Mapping[str, Any] | None) -> dict[str, Any]:
        """The cache spec of this procedure's pre-trained encoder for the run of checkpoint spec ``run_spec``."""
        return encoder_key_spec(run_spec, self.pretrain_spec())

    def fit(self, model: nn.Module, splits: data_mod.Splits, recipe: Recipe, device: torch.device, seed: int, *,
            cache: CheckpointCache | None = None, spec: Mapping[str, Any] | None = None,
            progress: bool = False) -> dict[str, Any]:
        """Pre-train (or load the cached encoder), initialise ``model`` from it, fine-tune. In place.

        Returns the history ``get_or_train`` stores with the checkpoint: the fine-tuning history, with
        ``seconds`` counted from the start of ``fit`` (pre-training included when it ran here), and the
        pre-training's (``pretrain``)."""
        t0 = time.time()
        model.to(device)
        pre: dict[str, Any] = {"key": None, "cache_hit": None, "history": None}
        if self.variant != "none":
            cmodel, pre = get_or_pretrain(model, splits, device, seed, cache, self.encoder_key_spec(spec),
                                          variant=self.variant, temperature=self.temperature,
                                          proj_dims=self.proj_dims, cfg=self.pretrain_cfg, progress=progress)
            load_pretrained(model, cmodel, self.branch)
            del cmodel
        t_ft = time.time() - t0
        hist = finetune(model, splits, recipe, self.protocol, self.downstream, device, seed, progress)
        hist["seconds"] = [t_ft + s for s in hist["seconds"]]
        hist["pretrain"] = {**pre, "seconds": t_ft}
        hist["variant"], hist["transfer_bn"] = self.variant, (self.branch if self.variant != "none" else None)
        self.last_fit = hist
        return hist
