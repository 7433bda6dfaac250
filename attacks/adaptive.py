"""Adaptive evaluation modes (Athalye, Carlini, Wagner 2018; Tramer et al. 2020): wrappers around any
attack, for defenses whose gradients are not informative.

* ``BPDA``: Backward Pass Differentiable Approximation. Runs the base attack with every BPDA-capable module
  of the model (e.g. ``defenses.jumprelu.activation.JumpReLU``) back-propagating through a smooth
  surrogate; the forward pass, and therefore the success the harness recomputes, is the real defended model.
* ``Transfer``: gray-box transfer. Crafts with the base attack on the model's undefended source
  (``model.undefended``) and returns those inputs; the harness scores them on the defended model.

Wrappers are model-free like every attack: Hydra builds the nested ``base`` node first and passes the
attack object. The wrapper takes the base's norm and family, so it is scored like its base.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import nn

from robustbench_lab.core.attack_base import Attack, CountingModel
from robustbench_lab.core.errors import ConfigError, check_choice, check_number
from robustbench_lab.core.norms import Norm

log = logging.getLogger(__name__)

SURROGATES = ("relu", "sigmoid")   # the smooth backward passes a BPDA-capable module may offer


def _check_base(base: Any) -> Attack:
    if not isinstance(base, Attack):
        raise ConfigError("attack.base", base, "an attack config node with a _target_ (e.g. attacks.pgd.PGD)")
    return base


class _Wrapper(Attack):
    """Shared plumbing: the wrapper's norm is the base's; family (fixed-eps/minimization) follows the base."""

    def __init__(self, *, base: Attack, norm: str | Norm | None = None) -> None:
        base = _check_base(base)
        super().__init__(norm=norm if norm is not None else base.norm)
        if self.norm is not base.norm:
            raise ConfigError("attack.norm", self.norm.value, [base.norm.value],
                              f"the wrapper's norm must be its base attack's ({base.name}); set attack.base.norm "
                              "too (the shipped configs interpolate it)")
        self.base = base
        self.name = f"{base.name}_{type(self).name}"   # the config's name, if any, replaces it
        self.family = base.family   # type: ignore[misc]  # instance value: the template scores like the base

    @property
    def stream_name(self) -> str:
        """The base attack's streams: the wrapped attack replays the base's random draws (like for like)."""
        return self.base.stream_name

    def config(self) -> dict[str, Any]:
        out = {k: (v.value if isinstance(v, Norm) else v) for k, v in vars(self).items()
               if not k.startswith("_") and k not in ("base", "family", "name")}
        out["base"] = {"class": f"{type(self.base).__module__}.{type(self.base).__qualname__}",
                       "name": self.base.name, **self.base.config()}
        return out


def bpda_modules(model: nn.Module) -> list[nn.Module]:
    """Modules of ``model`` that support BPDA (they declare ``BPDA_SURROGATES`` and have a ``bpda`` field)."""
    return [m for m in model.modules() if hasattr(m, "BPDA_SURROGATES") and hasattr(m, "bpda")]


@contextlib.contextmanager
def bpda_mode(model: nn.Module, surrogate: str, tau: float | None = None) -> Iterator[list[nn.Module]]:
    """Switch every BPDA-capable module of ``model`` to ``surrogate`` (and ``tau`` if given); restore after."""
    mods = bpda_modules(model)
    saved = [(m.bpda, getattr(m, "tau", None)) for m in mods]
    try:
        for m in mods:
            if surrogate not in m.BPDA_SURROGATES:
                raise ConfigError("attack.surrogate", surrogate, m.BPDA_SURROGATES,
                                  f"{type(m).__name__} does not offer this surrogate")
            m.bpda = surrogate
            if tau is not None:
                m.tau = float(tau)
        yield mods
    finally:
        for m, (b, t) in zip(mods, saved):
            m.bpda = b
            if t is not None:
                m.tau = t


class BPDA(_Wrapper):
    """Run ``base`` with gradients through a smooth surrogate of every BPDA-capable module.

    Inputs ``x`` (B, C, H, W) in [0, 1]. ``surrogate``: ``'relu'`` (JumpReLU back-propagates 1[x > 0]) or
    ``'sigmoid'`` (derivative of x * sigmoid((x - k) / tau)); ``tau`` overrides the modules' temperature.
    Forward passes are unchanged, so the base attack's iterate selection and the harness's success check
    use the real defended model. On a model without BPDA-capable modules this is the base attack itself.
    Cost: the base attack's.
    """

    name = "bpda"

    def __init__(self, *, base: Attack, norm: str | Norm | None = None, surrogate: str = "relu",
                 tau: float | None = None) -> None:
        super().__init__(base=base, norm=norm)
        self.surrogate = check_choice("attack.surrogate", surrogate, SURROGATES)
        check_number("attack.tau", tau, low=0, low_open=True, allow_none=True,
                     hint="null keeps the modules' own temperature")
        self.tau = float(tau) if tau is not None else None

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator) -> torch.Tensor:
        with bpda_mode(model, self.surrogate, self.tau) as mods:
            if not mods:
                log.debug("%s: no BPDA-capable module in the model; running %s unchanged", self.name, self.base.name)
            return self.base.run(model, x, y, eps, generator)


def source_model(model: nn.Module) -> nn.Module | None:
    """The undefended source of ``model`` (looking through the attack template's counting proxy)."""
    inner = model.model if isinstance(model, CountingModel) else model
    return getattr(inner, "undefended", None)


class Transfer(_Wrapper):
    """Gray-box transfer: craft with ``base`` on ``model.undefended``, return those inputs.

    The harness then clips them and scores them on the defended model. The base attack runs through its
    own template on the source (eval mode, its own clipping); its forward/backward passes on the source are
    added to this attack's counts, so the cost columns show what crafting cost. A model without an
    ``undefended`` source is an error (a defense transform must keep it, as
    ``defenses.jumprelu.retrofit.retrofit`` does).
    """

    name = "transfer"
    requires_source_model = True   # the attack-contract tests skip it on plain models

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator) -> torch.Tensor:
        source = source_model(model)
        if source is None:
            inner = model.model if isinstance(model, CountingModel) else model
            raise ValueError(f"{self.name}: the model ({type(inner).__name__}) has no 'undefended' source model to "
                             "craft on; transfer attacks need a defense transform that keeps the original "
                             "(e.g. defense=jumprelu), or use the base attack directly")
        res = self.base(source, x, y, eps=eps, generator=generator)
        if isinstance(model, CountingModel):
            model.n_forward += res.n_forward
            model.n_backward += res.n_backward
        return res.x_adv
