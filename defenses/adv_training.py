"""Adversarial training: PGD-AT (Madry et al. 2018), its fast single-step variant FGSM with a random start
(Wong, Rice, Kolter 2020), and TRADES (Zhang et al. 2019). A training procedure: it replaces the per-batch
training loss, and its ``spec()`` enters the checkpoint key, so adversarially trained weights never share a
cache entry with standard ones (or with each other across methods, attacks, epsilons or beta).

Written from the papers; the official Madry (``MadryLab/cifar10_challenge``) and TRADES
(``yaodongyu/TRADES``) code served as a reference for the published settings (see
``robustbench_lab/conf/experiment/adv_training_cifar10.yaml``).

Crafting mode: adversarial examples are crafted with the model in **eval mode** (BatchNorm on its running
statistics, dropout off), then the model goes back to train mode for the loss. This is the common PyTorch
practice (and the newer TRADES code): the attack sees the same function the model computes at test time,
and crafting does not pollute the BatchNorm running statistics with an extra forward pass per attack step.
(Madry's TensorFlow code crafted with the training-mode graph; the difference is small in practice.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core.attack_base import FIXED_EPS, Attack
from robustbench_lab.core.defense_base import Defense, TrainingProcedure
from robustbench_lab.core.errors import ConfigError, check_choice, check_number
from robustbench_lab.core.model import eval_frozen
from robustbench_lab.core.norms import Norm, normalize_grad, project

METHODS = ("pgd", "trades")


def _attack_spec(attack: Attack) -> dict[str, Any]:
    cls = type(attack)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", **attack.config()}


class AdversarialTrainingProcedure(TrainingProcedure):
    """The per-batch loss of adversarial training (a ``TrainingProcedure``: the standard loop's hooks).

    ``method='pgd'``: cross-entropy on ``attack``'s adversarial examples at ``eps`` (Madry's min-max; with
    ``attacks.fgsm.FGSM(random_start=True, step_scale=1.25)`` it is Wong et al.'s fast adversarial training).
    ``method='trades'``: CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximizing the KL term inside the eps
    ball by sign (L-inf) or normalized (L2) gradient steps from x + N(0, init_std^2), with the step count and
    step size of ``attack`` (a PGD-like attack: ``steps`` and ``step_size`` / ``rel_stepsize``).
    Inputs ``x`` (B, C, H, W) in the model's bounds, labels ``y`` (B,).
    """

    def __init__(self, method: str, attack: Attack, eps: float, beta: float = 6.0,
                 trades_init_std: float = 0.001) -> None:
        self.method = method
        self.attack = attack
        self.eps = float(eps)
        self.beta = float(beta)
        self.trades_init_std = float(trades_init_std)

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"procedure": "adversarial_training", "method": self.method, "eps": self.eps,
                               "norm": self.attack.norm.value, "attack": _attack_spec(self.attack),
                               "craft_mode": "eval"}
        if self.method == "trades":
            out.update({"beta": self.beta, "trades_init_std": self.trades_init_std})
        return out

    def craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Adversarial examples for the batch, crafted in eval mode (the caller's mode is restored)."""
        lower, upper = getattr(model, "bounds", (0.0, 1.0))
        with eval_frozen(model, warn_train=False):
            if self.method == "trades":
                x_adv = self._kl_ascent(model, x, generator)
            else:
                # the method alone (no verification pass: training needs no success flag); clip like the template
                x_adv = self.attack.run(model, x, y, self.eps, generator)
            return project(x_adv.detach(), x, self.eps, self.attack.norm, lower, upper)

    def _kl_ascent(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        steps = getattr(self.attack, "steps", None)
        step = getattr(self.attack, "step_size", None)
        if step is None and getattr(self.attack, "rel_stepsize", None) is not None:
            step = self.attack.rel_stepsize * self.eps   # type: ignore[attr-defined]
        if steps is None or step is None:
            raise ConfigError("defense.attack", self.attack.name, "a PGD-like attack (steps, step_size/rel_stepsize)",
                              "TRADES uses the attack's step count and step size for its KL ascent")
        lower, upper = getattr(model, "bounds", (0.0, 1.0))
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        xa = project(x + self.trades_init_std * noise, x, self.eps, self.attack.norm, lower, upper)
        for _ in range(int(steps)):
            xa.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(xa), dim=1), p_clean, reduction="sum")
            (g,) = torch.autograd.grad(kl, xa)
            with torch.no_grad():
                xa = project(xa + float(step) * normalize_grad(g, self.attack.norm), x, self.eps, self.attack.norm,
                             lower, upper)
        return xa.detach()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x_adv = self.craft(model, x, y, generator)
        if self.method == "pgd":
            return F.cross_entropy(model(x_adv), y)
        logits = model(x)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + self.beta * kl


class AdversarialTraining(Defense):
    """Train the model adversarially (a training procedure; the transform is the identity).

    ``method``: ``'pgd'`` (Madry PGD-AT, or fast FGSM-RS training when ``attack`` is FGSM with a random
    start) or ``'trades'``. ``attack``: the attack used in training, an attack config node like any other
    (built by Hydra); ``eps``: its budget (input space, [0, 1] pixels, in the attack's norm). ``beta``:
    TRADES's weight of the KL term (1/lambda; larger is more robust and less accurate).
    """

    name = "adv_training"

    def __init__(self, *, attack: Attack, eps: float, method: str = "pgd", beta: float = 6.0,
                 trades_init_std: float = 0.001) -> None:
        check_choice("defense.method", method, METHODS)
        if not isinstance(attack, Attack):
            raise ConfigError("defense.attack", attack, "an attack config node with a _target_ (e.g. attacks.pgd.PGD)")
        if attack.family != FIXED_EPS:
            raise ConfigError("defense.attack", attack.name, "a fixed-epsilon attack (pgd, fgsm)",
                              "training needs points inside the eps ball")
        linf = attack.norm is Norm.LINF
        check_number("defense.eps", eps, low=0, low_open=True, high=1 if linf else None,
                     hint="input space, [0, 1] pixels")
        check_number("defense.beta", beta, low=0)
        check_number("defense.trades_init_std", trades_init_std, low=0)
        self.procedure = AdversarialTrainingProcedure(method, attack, float(eps), float(beta), float(trades_init_std))

    def training_procedure(self) -> AdversarialTrainingProcedure:
        return self.procedure

    def describe(self) -> dict[str, Any]:
        return self.procedure.spec()
