"""The ``defense=acl`` entry point: validates the config and holds the training procedure."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from defenses.acl.procedure import ACLProcedure
from defenses.acl.settings import (PROTOCOLS, TRANSFER_BN, VARIANTS, DownstreamConfig, PretrainConfig,
                                   from_mapping, plain)
from robustbench_lab.core.defense_base import Defense
from robustbench_lab.core.errors import ConfigError, check_choice, check_number


class ACL(Defense):
    """Adversarial contrastive pre-training + a downstream protocol (a training procedure; identity transform).

    ``variant``: none | simclr | a2a | a2s | ds. ``protocol``: slf | alf | aff. ``temperature``: NT-Xent's
    (0.5). ``proj_dims``: the projection head's layer widths (null: [d, d], d the encoder's feature width;
    the paper's 512-512-512 on ResNet-18). ``transfer_bn``: auto (pgd, or normal for simclr) | normal | pgd.
    ``pretrain`` / ``downstream``: ``PretrainConfig`` / ``DownstreamConfig`` fields. The fine-tuning recipe is
    the run's ``model.train``.
    """

    name = "acl"

    def __init__(self, *, variant: str = "ds", protocol: str = "aff", temperature: float = 0.5,
                 proj_dims: Sequence[int] | None = None, transfer_bn: str = "auto",
                 pretrain: Mapping[str, Any] | None = None, downstream: Mapping[str, Any] | None = None) -> None:
        check_choice("defense.variant", variant, VARIANTS)
        check_choice("defense.protocol", protocol, PROTOCOLS)
        check_number("defense.temperature", temperature, low=0, low_open=True)
        proj_dims = plain(proj_dims)
        if proj_dims is not None and (not isinstance(proj_dims, list) or not proj_dims or
                                      not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                              for d in proj_dims)):
            raise ConfigError("defense.proj_dims", proj_dims, "a non-empty list of positive integers, or null "
                              "([d, d] with d the encoder's feature width)")
        check_choice("defense.transfer_bn", transfer_bn, TRANSFER_BN)
        self.procedure = ACLProcedure(variant, protocol, float(temperature), proj_dims, transfer_bn,
                                      from_mapping(PretrainConfig, pretrain, "defense.pretrain"),
                                      from_mapping(DownstreamConfig, downstream, "defense.downstream"))

    def training_procedure(self) -> ACLProcedure:
        return self.procedure

    def describe(self) -> dict[str, Any]:
        # the spec only: metrics.json must not differ between a fresh and a cached checkpoint; the training
        # history (selected epoch, validation robust accuracy, pre-training loss) is in the checkpoint sidecar
        return self.procedure.spec()
