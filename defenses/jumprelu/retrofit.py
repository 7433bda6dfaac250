"""The model transform: a copy of a trained model with every ``nn.ReLU`` replaced by a ``JumpReLU``."""

from __future__ import annotations

import copy

from torch import nn

from defenses.jumprelu.activation import JumpReLU, check_jump
from robustbench_lab.core.errors import ConfigError


def keep_undefended(defended: nn.Module, source: nn.Module) -> nn.Module:
    """Make ``source`` reachable as ``defended.undefended`` (the project's convention for transfer attacks).

    Stored as a plain reference, not a registered submodule: the defended model's parameters, state dict
    and optimizer view stay its own (no duplicated weights, no hidden training of the source).
    """
    object.__setattr__(defended, "undefended", source)
    return defended


def jump_modules(model: nn.Module) -> list[JumpReLU]:
    return [m for m in model.modules() if isinstance(m, JumpReLU)]


def set_jump(model: nn.Module, jump: float) -> None:
    """Set the jump of every JumpReLU of ``model`` in place."""
    jump = check_jump(jump, "jump")
    for m in jump_modules(model):
        m.jump = jump


def retrofit(model: nn.Module, jump: float) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.ReLU`` module replaced by ``JumpReLU(jump)``.

    Weights, buffers and modes are copied unchanged; ``model`` itself is not modified and is kept as
    ``defended.undefended``. A ReLU instance shared by several parents maps to one shared JumpReLU.
    Functional ``relu`` calls cannot be retrofitted: a model without any ``nn.ReLU`` module is an error.
    """
    jump = check_jump(jump, "jump")
    defended = copy.deepcopy(model)
    new: dict[int, JumpReLU] = {}
    for parent in list(defended.modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, cname, new.setdefault(id(child), JumpReLU(jump)))
    if not new:
        acts = sorted({type(m).__name__ for m in model.modules()
                       if type(m).__module__.startswith("torch.nn.modules.activation")})
        raise ConfigError("defense", "jumprelu", "a model whose activations are nn.ReLU modules",
                          f"{type(model).__name__} has no nn.ReLU module to replace (its activations: "
                          f"{', '.join(acts) or 'none as modules'}; functional relu calls cannot be retrofitted)")
    return keep_undefended(defended, model)
