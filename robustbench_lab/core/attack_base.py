"""The attack contract shared by every attack.

An attack object holds only hyperparameters (keyword-only, from config), so it can be built before any
model exists. Model, inputs, labels, epsilon and a ``torch.Generator`` come at call time. One fixed
``__call__`` does the shared work; subclasses implement only ``run``:

1. validate inputs (shapes, [0, 1] box, epsilon);
2. put the model in eval mode with frozen parameters (restored afterwards);
3. hand the method per-example random streams (``core.rng.ExampleRandom``, keyed by the generator's seed,
   each example's id and the attack's ``stream_name``), so an example's result does not depend on the batch
   it is in or on the attacks that ran before; run the method on a counting proxy of the model (forward/backward passes per example are counted);
4. record how far the method's own output left the box (and, for fixed-epsilon attacks, the epsilon ball):
   the audit reports any violation as a bug in the attack; then clip the batch into them;
5. recompute success with a fresh forward pass on exactly the returned tensor: an attack's own success
   flag is never trusted.

Targeted mode (``set_target``, for attacks with ``targetable = True``): the template picks each example's
target class (``core.targets``) from one clean forward pass that is not counted, hands it to ``run`` as the
keyword ``target`` (B,), and success then means "predicted as the target" on the returned tensor.

Two families, as in Foolbox: fixed-epsilon attacks (FGSM, PGD) return a point inside the ball; minimization
attacks (trust-region, CW, DeepFool) return the smallest adversarial they found, so a single run is scored
at every epsilon (``AttackResult.success_at``).
"""

from __future__ import annotations

import abc
import dataclasses
import time
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn

from robustbench_lab.core.errors import ConfigError, check_choice, check_number
from robustbench_lab.core.model import eval_frozen
from robustbench_lab.core.norms import Norm, l1, l2, linf, norm_of, project
from robustbench_lab.core.rng import streams_for
from robustbench_lab.core.targets import TARGET_STREAM, TargetSpec, check_target, choose_targets


class AttackFamily(str, Enum):
    """What an attack returns, hence how the template clips and scores it. A ``str`` enum: tables and
    metrics.json keep the plain values ``"fixed_eps"`` / ``"minimization"``."""

    FIXED_EPS = "fixed_eps"        # a point inside the epsilon ball; scored at that epsilon
    MINIMIZATION = "minimization"  # the smallest adversarial found; scored at any epsilon


# Short names for the two families (modules outside the attack contract import these).
FIXED_EPS = AttackFamily.FIXED_EPS
MINIMIZATION = AttackFamily.MINIMIZATION


@dataclasses.dataclass
class AttackResult:
    """What an attack returns for a batch of B examples.

    ``x_adv``: (B, C, H, W) the returned inputs, inside the box (and the epsilon ball for fixed-epsilon
    attacks); ``success``: (B,) bool, recomputed on ``x_adv`` (misclassified, and for a minimization attack
    called with an epsilon, within it); ``adv_pred``: (B,) predictions on ``x_adv``; ``l2`` / ``linf`` / ``l1``:
    (B,) norms of ``x_adv - x``; ``n_forward`` / ``n_backward``: passes the method spent, summed over examples
    (the verification pass is not counted); ``seconds``: wall time of the method.
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    adv_pred: torch.Tensor
    l2: torch.Tensor
    linf: torch.Tensor
    fooled: torch.Tensor
    norm: Norm
    n_forward: int
    n_backward: int
    seconds: float
    n_nan: int = 0
    n_hvp: int = 0                     # Hessian-vector products (second-order methods), summed over examples
    raw_ball_violation: float = 0.0    # how far the method's own output left the epsilon ball (fixed-eps) ...
    raw_box_violation: float = 0.0     # ... and the box, before the template clipped it: > 1e-6 is a bug
    n_projected: int = 0               # points the template had to move
    l1: torch.Tensor | None = None     # (B,); the template always fills it (a default keeps older callers valid)
    target: torch.Tensor | None = None # (B,) targeted mode: each example's target class (``fooled``: predicted as it)

    @property
    def norms(self) -> torch.Tensor:
        return {Norm.LINF: self.linf, Norm.L2: self.l2, Norm.L1: self.l1}[self.norm]

    def success_at(self, eps: float) -> torch.Tensor:
        """Success at budget ``eps``: fooled with a perturbation of norm at most eps (plus float slack)."""
        return self.fooled & (self.norms <= eps * (1 + 1e-6) + 1e-7)


class CountingModel(nn.Module):
    """Proxy that counts per-example forward passes and backward passes through the model's output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.n_forward = 0
        self.n_backward = 0
        self.n_hvp = 0

    def count_hvp(self, n: int) -> None:
        """Second-order methods call this once per batch of ``n`` Hessian-vector products."""
        self.n_hvp += int(n)

    def _count_backward(self, n: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            self.n_backward += n
            return grad
        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        n = x.shape[0]
        self.n_forward += n
        if out.requires_grad:
            out.register_hook(self._count_backward(n))
        return out

    @property
    def num_classes(self) -> int:
        return getattr(self.model, "num_classes", 0)


class Attack(abc.ABC):
    """Base class. Subclasses set ``name`` and ``family`` and implement ``run``."""

    name: ClassVar[str] = "attack"
    family: ClassVar[AttackFamily] = AttackFamily.FIXED_EPS
    supported_norms: ClassVar[tuple[Norm, ...]] = (Norm.LINF, Norm.L2)
    targetable: ClassVar[bool] = False       # True: ``run`` accepts ``target=`` (B,) and pushes towards it
    target_spec: TargetSpec | None = None    # set by ``set_target``; None: untargeted

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.family = AttackFamily(cls.family)   # a subclass written with the plain string still gets the enum

    def __init__(self, *, norm: str | Norm = "linf") -> None:
        self.norm = Norm.parse(norm)
        check_choice("attack.norm", self.norm.value, [n.value for n in self.supported_norms],
                     f"{self.name} does not support this norm")

    # -- the method -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator) -> torch.Tensor:
        """Return adversarial inputs for ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,).

        ``model`` is in eval mode with frozen parameters and counts its passes; only use ``generator``
        for randomness. It is a ``core.rng.ExampleRandom``: draw per-example values with its ``uniform`` /
        ``normal`` / ``integers`` / ``signs`` (``take(rows)`` for a subset of the batch), which keeps each
        example's result independent of batching; as a plain ``torch.Generator`` it gives batch-level draws.
        """

    @property
    def targeted(self) -> bool:
        return self.target_spec is not None

    def set_target(self, target: TargetSpec | None) -> "Attack":
        """Targeted mode towards ``target`` (``random``, ``least_likely`` or a class index; see
        ``core.targets``), or untargeted with None. Returns the attack itself."""
        if target is None:
            self.target_spec = None
            return self
        if not self.targetable:
            raise ConfigError("attack.targeted", True, "false",
                              f"{self.name} is an untargeted method (its class sets targetable = False)")
        self.target_spec = check_target(target)
        return self

    @property
    def stream_name(self) -> str:
        """What names this attack's random streams (with the seed and the example id): the attack's name,
        so a repeated attack replays its draws whatever ran before it."""
        return self.name

    def config(self) -> dict[str, Any]:
        """Hyperparameters, for the results (``target_spec`` only in targeted mode)."""
        return {k: (v.value if isinstance(v, Norm) else v) for k, v in vars(self).items()
                if not k.startswith("_") and not (k == "target_spec" and v is None)}

    # -- the fixed template -----------------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | None = None,
                 generator: torch.Generator | None = None, ids: torch.Tensor | None = None) -> AttackResult:
        """Attack ``x`` (B, C, H, W) with labels ``y`` (B,). ``generator``'s seed (default 0) and ``ids`` (B,),
        the examples' indices in their dataset (default 0..B-1, or those of a ``generator`` that already is
        an ``ExampleRandom``), key the per-example random streams."""
        lower, upper = getattr(model, "bounds", (0.0, 1.0))
        self._validate(x, y, eps, lower, upper)
        target_streams = streams_for(generator, x.shape[0], x.device, TARGET_STREAM, ids) if self.targeted else None
        generator = streams_for(generator, x.shape[0], x.device, self.stream_name, ids)
        x = x.detach()
        y = y.detach()
        with eval_frozen(model):
            counting = CountingModel(model)
            kwargs = {}
            target = None
            if target_streams is not None:
                with torch.no_grad():
                    target = choose_targets(model(x), y, self.target_spec, target_streams)  # type: ignore[arg-type]
                kwargs["target"] = target
            t0 = time.perf_counter()
            x_adv = self.run(counting, x, y, eps, generator, **kwargs).detach()
            seconds = time.perf_counter() - t0
            if x_adv.shape != x.shape:
                raise RuntimeError(f"{self.name}.run returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}")
            nan = ~torch.isfinite(x_adv.reshape(x.shape[0], -1)).all(1)
            n_nan = int(nan.sum())
            if n_nan:
                x_adv = torch.where(nan.view(-1, *[1] * (x.dim() - 1)), x, x_adv)
            raw = x_adv
            if self.family == AttackFamily.FIXED_EPS:
                x_adv = project(x_adv, x, float(eps), self.norm, lower, upper)  # type: ignore[arg-type]
                ball = float((norm_of(raw - x, self.norm) - float(eps)).max().clamp_min(0)) if x.numel() else 0.0
            else:
                x_adv = x_adv.clamp(lower, upper)
                ball = 0.0
            box = float(torch.maximum(lower - raw, raw - upper).max().clamp_min(0)) if x.numel() else 0.0
            moved = int(((x_adv - raw).reshape(x.shape[0], -1).abs().amax(1) > 1e-6).sum()) if x.numel() else 0
            with torch.no_grad():
                adv_pred = model(x_adv).argmax(1)
        # Targeted: predicted as the target (an example labelled as its target can never succeed).
        fooled = reached(adv_pred, y, target)
        delta = x_adv - x
        res = AttackResult(x_adv=x_adv, success=fooled.clone(), adv_pred=adv_pred, l2=l2(delta), linf=linf(delta),
                           fooled=fooled, norm=self.norm, n_forward=counting.n_forward,
                           n_backward=counting.n_backward, seconds=seconds, n_nan=n_nan, n_hvp=counting.n_hvp,
                           raw_ball_violation=ball, raw_box_violation=box, n_projected=moved, l1=l1(delta),
                           target=target)
        if self.family == AttackFamily.MINIMIZATION and eps is not None:
            res.success = res.success_at(float(eps))
        return res

    def _validate(self, x: torch.Tensor, y: torch.Tensor, eps: float | None, lower: float, upper: float) -> None:
        if x.dim() != 4:
            raise ValueError(f"{self.name}: inputs must have shape (B, C, H, W), got {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"{self.name}: labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if x.numel() and (x.min() < lower - 1e-6 or x.max() > upper + 1e-6):
            raise ValueError(f"{self.name}: inputs must lie in the model's bounds [{lower}, {upper}], got values in "
                             f"[{float(x.min()):.4g}, {float(x.max()):.4g}] (normalization belongs inside the model)")
        if eps is None:
            if self.family == AttackFamily.FIXED_EPS:
                raise ConfigError("attack.eps", eps, "a number >= 0", f"{self.name} is a fixed-epsilon attack")
        else:
            check_number("attack.eps", eps, low=0, hint="epsilon is in input space ([0, 1] pixels)")


def reached(pred: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: the attack's goal holds for predictions ``pred`` (B,): misclassified (untargeted), or
    predicted as ``target`` (B,) (targeted; never where the target is the label)."""
    return pred != y if target is None else (pred == target) & (target != y)


def correct_indices(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    target: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (K,) of the rows of ``x`` (B, C, H, W) whose goal does not hold yet: classified as ``y``
    (untargeted), or, with ``target`` (B,), not predicted as their target and labelled otherwise. A
    minimization attack moves only these and returns the others unchanged. One forward pass (counted
    inside ``run``)."""
    with torch.no_grad():
        pred = model(x).argmax(1)
    keep = pred == y if target is None else (pred != target) & (target != y)
    return keep.nonzero().squeeze(1)


def attacked_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The rows a minimization attack moves (``correct_indices``) as (idx (K,), x[idx], y[idx], target[idx] or
    None)."""
    idx = correct_indices(model, x, y, target)
    return idx, x[idx], y[idx], None if target is None else target[idx]


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example CW margin max_{j != y} z_j - z_y (positive once misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.amax(1) - z_y


def norm_of_delta(x_adv: torch.Tensor, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    return norm_of(x_adv - x, norm)
