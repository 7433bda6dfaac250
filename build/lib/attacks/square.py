"""Square attack (Andriushchenko, Croce, Flammarion, Hein 2020): score-based black-box, L-inf and L2, through
``pyautoattack.square``."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from attacks.autoattack import LogMixin, pyaa_call, pyaa_norm
from robustbench_lab.core.attack_base import Attack, AttackFamily
from robustbench_lab.core.errors import check_bool, check_choice, check_number
from robustbench_lab.core.norms import Norm

LOSSES = ("margin", "ce")


class Square(LogMixin, Attack):
    """Random search over square-shaped updates, using only the model's scores (no gradients).

    Inputs (B, C, H, W) in [0, 1]; returns (B, C, H, W) inside the eps ball and the box. L-inf: start from
    vertical stripes of +-eps, then each query changes one random square (side ~ sqrt(p * H * W)) to +-eps
    per channel, kept if the margin loss decreases. L2: the analogous centred square updates that keep the
    total L2 norm at eps. ``p_init`` (paper: 0.8 for L-inf, 0.1 in its L2 experiments; AutoAttack uses 0.8
    for both) sets the initial fraction of pixels changed; the fraction is halved on a fixed schedule. With
    ``rescale_schedule=True`` the schedule (written for 10000 queries) is compressed to ``n_queries``, which
    is what a small budget needs. ``n_queries`` is the budget per restart and example: one forward pass per
    query, on the examples not yet fooled (plus a few bookkeeping passes per restart); ``n_backward`` is 0.
    ``n_restarts`` re-runs the search from a new random start on the points still robust.
    The default of 1000 queries breaks an undefended Fashion-MNIST CNN at eps 0.1 in a few dozen queries per
    point and keeps a 500-point CPU evaluation to minutes; use 5000 (AutoAttack's value) for a final number.

    Randomness is seeded from the call's generator; torch's global RNG is restored afterwards. With
    ``verbose=True`` the package's progress prints are captured in ``last_log`` / ``log``.
    """

    name = "square"
    family = AttackFamily.FIXED_EPS
    supported_norms: ClassVar[tuple[Norm, ...]] = (Norm.LINF, Norm.L2)
    gradient_free: ClassVar[bool] = True   # score-based: the contract expects n_backward == 0

    def __init__(self, *, norm: str = "linf", n_queries: int = 1000, p_init: float = 0.8, n_restarts: int = 1,
                 loss: str = "margin", rescale_schedule: bool = True, verbose: bool = False) -> None:
        super().__init__(norm=norm)
        check_number("attack.n_queries", n_queries, low=1, integer=True)
        check_number("attack.n_restarts", n_restarts, low=1, integer=True)
        check_number("attack.p_init", p_init, low=0, low_open=True, high=1)
        check_choice("attack.loss", loss, LOSSES)
        check_bool("attack.rescale_schedule", rescale_schedule)
        check_bool("attack.verbose", verbose)
        self.n_queries = int(n_queries)
        self.p_init = float(p_init)
        self.n_restarts = int(n_restarts)
        self.loss = loss
        self.rescale_schedule = bool(rescale_schedule)
        self.verbose = bool(verbose)
        self._logs: list[str] = []

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator) -> torch.Tensor:
        assert eps is not None
        if x.shape[0] == 0:
            return x.clone()
        from pyautoattack.square import SquareAttack

        with pyaa_call(model, generator, "pyautoattack.square") as (seed, lines):
            sq = SquareAttack(model, norm=pyaa_norm(self.norm), n_queries=self.n_queries, eps=float(eps),
                              p_init=self.p_init, n_restarts=self.n_restarts, seed=seed, verbose=self.verbose,
                              loss=self.loss, resc_schedule=self.rescale_schedule, device=x.device)
            with torch.no_grad():
                x_adv = sq.perturb(x, y)
        self._record_log(f"== square norm={self.norm.value} eps={float(eps):g} n={x.shape[0]} "
                         f"n_queries={self.n_queries} seed={seed}", lines)
        return x_adv.detach()
