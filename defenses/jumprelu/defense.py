"""JumpReLU retrofitting (Erichson, Yao, Mahoney, "JumpReLU: A Retrofit Defense Strategy for Adversarial
Attacks", arXiv 1904.03750, ICPRAM 2020). Written from the paper and docs/methods.md section 3.

Every ``nn.ReLU`` of an already trained model becomes JumpReLU_k(x) = x if x > k else 0, one shared jump k,
weights unchanged, no retraining. The jump trades clean accuracy for (apparent) robustness and is tuned on
validation data: ``jump='auto'`` takes the largest k of a grid whose clean validation accuracy is within
``max_accuracy_drop`` of the k = 0 (original) model.

The jump's autograd derivative is 1[x > k]: no gradient flows through the discontinuity, which can mask
gradients (Athalye et al. 2018). For adaptive evaluation every JumpReLU has a BPDA mode (forward unchanged,
backward through a smooth surrogate), switched on by the ``attacks.adaptive.BPDA`` attack wrapper.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core import data as data_mod
from robustbench_lab.core.attack_base import MINIMIZATION, Attack
from robustbench_lab.core.defense_base import Defense
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.model import eval_frozen, predict
from robustbench_lab.core.norms import Norm, l2

log = logging.getLogger(__name__)

SURROGATES = ("relu", "sigmoid")
# Default jump grid for the default data (Fashion-MNIST, BatchNorm ResNets): pre-activations after BatchNorm
# have roughly unit scale, and measured on the cached ResNet-20 the clean validation accuracy stays within
# 1 point of k = 0 up to k ~ 0.4 and falls to ~chance-level by k ~ 1 (see the defense's trade-off table).
DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))   # 0, 0.05, ..., 1.0


# -------------------------------------------------------------------------------------------- the module
class _JumpBPDA(torch.autograd.Function):
    """Forward: the exact JumpReLU. Backward: the derivative of a smooth surrogate (BPDA, Athalye et al.)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, jump: float, surrogate: str, tau: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.jump, ctx.surrogate, ctx.tau = jump, surrogate, tau
        return torch.where(x > jump, x, torch.zeros_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        if ctx.surrogate == "relu":
            d = (x > 0).to(grad.dtype)                                   # d/dx relu(x)
        else:
            s = torch.sigmoid((x - ctx.jump) / ctx.tau)
            d = s + x * s * (1 - s) / ctx.tau                            # d/dx [x * sigmoid((x - k) / tau)]
        return grad * d, None, None, None


class JumpReLU(nn.Module):
    """JumpReLU_k(x) = x if x > k else 0, elementwise; any input shape. k = 0 is exactly ReLU.

    ``bpda``: None (default) differentiates the real function (derivative 1[x > k]); ``'relu'`` keeps the
    forward and back-propagates 1[x > 0]; ``'sigmoid'`` back-propagates the derivative of
    x * sigmoid((x - k) / tau). Unlike the official code (jump active in eval mode only), the jump is
    applied in both modes: the harness evaluates and attacks in eval mode anyway, and a module that behaves
    the same in both modes is less surprising.
    """

    BPDA_SURROGATES = SURROGATES   # marks the module as BPDA-capable (attacks.adaptive.BPDA looks for it)

    def __init__(self, jump: float = 0.0, bpda: str | None = None, tau: float = 0.1) -> None:
        super().__init__()
        self.jump = _check_jump(jump, "jump")
        self.bpda = _check_surrogate(bpda)
        self.tau = _check_tau(tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bpda is None:
            return torch.where(x > self.jump, x, torch.zeros_like(x))
        return _JumpBPDA.apply(x, self.jump, self.bpda, self.tau)

    def extra_repr(self) -> str:
        return f"jump={self.jump:g}" + (f", bpda={self.bpda!r}, tau={self.tau:g}" if self.bpda else "")


def _check_jump(jump: Any, key: str) -> float:
    if isinstance(jump, bool) or not isinstance(jump, (int, float)) or not (jump >= 0 and math.isfinite(jump)):
        raise ConfigError(f"defense.{key}", jump, "a finite number >= 0 (pre-activation units)")
    return float(jump)


def _check_surrogate(bpda: Any) -> str | None:
    if bpda is not None and bpda not in SURROGATES:
        raise ConfigError("attack.surrogate", bpda, (None,) + SURROGATES)
    return bpda


def _check_tau(tau: Any) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (tau > 0 and math.isfinite(tau)):
        raise ConfigError("attack.tau", tau, "a finite number > 0 (temperature of the sigmoid surrogate)")
    return float(tau)


# ------------------------------------------------------------------------------------------- retrofitting
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
    jump = _check_jump(jump, "jump")
    for m in jump_modules(model):
        m.jump = jump


def retrofit(model: nn.Module, jump: float) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.ReLU`` module replaced by ``JumpReLU(jump)``.

    Weights, buffers and modes are copied unchanged; ``model`` itself is not modified and is kept as
    ``defended.undefended``. A ReLU instance shared by several parents maps to one shared JumpReLU.
    Functional ``relu`` calls cannot be retrofitted: a model without any ``nn.ReLU`` module is an error.
    """
    jump = _check_jump(jump, "jump")
    defended = copy.deepcopy(model)
    new: dict[int, JumpReLU] = {}
    for parent in list(defended.modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, cname, new.setdefault(id(child), JumpReLU(jump)))
    if not new:
        raise ValueError(f"JumpReLU retrofit: {type(model).__name__} has no nn.ReLU module to replace "
                         "(functional relu calls cannot be retrofitted; use nn.ReLU modules)")
    return keep_undefended(defended, model)


def _check_tradeoff_attacks(spec: Mapping[str, Any] | None) -> dict[str, tuple[Attack, float | None]]:
    """``{label: {attack: <Attack>, eps: null | number}}`` -> ``{label: (attack, eps)}``, validated."""
    out: dict[str, tuple[Attack, float | None]] = {}
    for label, item in (spec or {}).items():
        key = f"defense.tradeoff_attacks.{label}"
        if not isinstance(item, Mapping) or set(item) - {"attack", "eps"} or "attack" not in item:
            raise ConfigError(key, item, "{attack: <attack config node with _target_>, eps: null | number}")
        atk, eps = item["attack"], item.get("eps")
        if not isinstance(atk, Attack):
            raise ConfigError(f"{key}.attack", atk, "an attack config node (_target_)")
        if eps is None and atk.family != MINIMIZATION:
            raise ConfigError(f"{key}.eps", eps, "a number >= 0", f"{atk.name} is a fixed-epsilon attack")
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0):
            raise ConfigError(f"{key}.eps", eps, "null (minimization attacks) or a number >= 0 (input space)")
        out[str(label)] = (atk, float(eps) if eps is not None else None)
    return out


# ------------------------------------------------------------------------------------------------ tuning
def zero_gradient_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Share of points whose cross-entropy input gradient is exactly zero (the shattered-gradient symptom)."""
    zero = 0
    with eval_frozen(model, warn_train=False):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xb), y[i:i + batch_size], reduction="sum"), xb)
            zero += int((l2(g) <= 1e-12).sum())
    return zero / max(x.shape[0], 1)


def attack_strength(model: nn.Module, attack: Attack, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                    generator: torch.Generator, batch_size: int = 500) -> dict[str, float]:
    """Attack the points of ``x`` (N, C, H, W) in [0, 1] that ``model`` classifies correctly.

    Returns the robust accuracy over all N points (at ``eps``; for a minimization attack with ``eps=None``,
    "not fooled at any size"), the success rate among clean-correct points, and for minimization attacks
    the median minimal perturbation norm over clean-correct points (+inf for points never fooled, so the
    median is honest when the attack fails often).
    """
    ok = predict(model, x) == y
    idx = ok.nonzero().squeeze(1)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    norms = torch.full((x.shape[0],), float("inf"), device=x.device)
    for i in range(0, idx.numel(), batch_size):
        b = idx[i:i + batch_size]
        res = attack(model, x[b], y[b], eps=eps, generator=generator)
        fooled[b] = res.success
        norms[b] = torch.where(res.fooled, res.norms, torch.full_like(res.norms, float("inf")))
    n_ok = int(ok.sum())
    out = {"subset_clean_accuracy": float(ok.float().mean()),
           "robust_accuracy": float((ok & ~fooled).float().mean()),
           "attack_success_rate": float(fooled[ok].float().mean()) if n_ok else float("nan")}
    if attack.family == MINIMIZATION:
        out[f"median_min_{attack.norm.value}"] = float(norms[ok].median()) if n_ok else float("nan")
    return out


def choose_jump(grid: Sequence[float], accuracies: Sequence[float], reference: float, max_drop: float) -> float:
    """The largest k whose accuracy is at most ``max_drop`` below ``reference`` (the k = 0 accuracy)."""
    ok = [k for k, a in zip(grid, accuracies) if reference - a <= max_drop + 1e-12]
    return max(ok) if ok else 0.0


class JumpReLUDefense(Defense):
    """Retrofit every ReLU of the trained model with JumpReLU(k).

    ``jump``: a number (pre-activation units, after BatchNorm where the model has it), or ``'auto'``: for
    every k of ``grid`` (k = 0 always included) measure the clean accuracy on the validation split (its
    first ``n_val`` points; 0 = all), take the largest k whose drop from k = 0 is at most
    ``max_accuracy_drop`` (absolute). With 'auto' the whole trade-off is recorded: per k the validation
    accuracy, the share of exactly-zero input gradients, and the strength of ``tradeoff_attack`` (any attack
    object; default DeepFool-L2: median minimal L2 and, at ``tradeoff_eps`` if given, robust accuracy) on
    the first ``tradeoff_n`` validation points -> ``jumprelu_tradeoff.csv`` and ``jumprelu_tradeoff.png``.
    The attack measure is the *white-box* one of the paper; with a plain attack it shows apparent
    robustness, including any gradient masking (set ``tradeoff_attack`` to a BPDA wrapper to see through it).

    ``reuse_tuning``: the tuning (minutes per model: one attack per k) is stored as JSON under
    ``<paths.cache_dir>/jumprelu/<key>.json``, the key a hash of the model's weights, the validation points,
    the grid, the tolerance, the trade-off attacks and their settings, the seed and the device type, so the
    cells of a sweep that share a model tune once. Set ``false`` to always re-measure.
    """

    name = "jumprelu"

    def __init__(self, *, jump: float | str = "auto", grid: Sequence[float] = DEFAULT_GRID,
                 max_accuracy_drop: float = 0.01, n_val: int = 0, tradeoff_attack: Attack | None = None,
                 tradeoff_eps: float | None = None, tradeoff_attacks: Mapping[str, Any] | None = None,
                 tradeoff_n: int = 100, batch_size: int = 500, reuse_tuning: bool = True) -> None:
        if not isinstance(reuse_tuning, bool):
            raise ConfigError("defense.reuse_tuning", reuse_tuning, [True, False])
        self.reuse_tuning = reuse_tuning
        if isinstance(jump, str):
            if jump != "auto":
                raise ConfigError("defense.jump", jump, "'auto' or a number >= 0")
            self.jump: float | str = "auto"
        else:
            self.jump = _check_jump(jump, "jump")
        try:
            grid_l = sorted({float(k) for k in grid})
        except (TypeError, ValueError):
            raise ConfigError("defense.grid", grid, "a list of numbers >= 0") from None
        if not grid_l:
            raise ConfigError("defense.grid", grid, "a non-empty list of numbers >= 0")
        for k in grid_l:
            _check_jump(k, "grid")
        self.grid = [0.0] + [k for k in grid_l if k != 0.0]
        if isinstance(max_accuracy_drop, bool) or not isinstance(max_accuracy_drop, (int, float)) or \
                not 0 <= max_accuracy_drop <= 1:
            raise ConfigError("defense.max_accuracy_drop", max_accuracy_drop, "a number in [0, 1] (absolute accuracy)")
        self.max_accuracy_drop = float(max_accuracy_drop)
        for key, v, lo in (("n_val", n_val, 0), ("tradeoff_n", tradeoff_n, 1), ("batch_size", batch_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"defense.{key}", v, f"an integer >= {lo}")
        self.n_val, self.tradeoff_n, self.batch_size = int(n_val), int(tradeoff_n), int(batch_size)
        if tradeoff_attack is not None and not isinstance(tradeoff_attack, Attack):
            raise ConfigError("defense.tradeoff_attack", tradeoff_attack, "an attack config node (_target_) or null")
        if tradeoff_eps is not None and (isinstance(tradeoff_eps, bool) or not isinstance(tradeoff_eps, (int, float))
                                         or not tradeoff_eps >= 0):
            raise ConfigError("defense.tradeoff_eps", tradeoff_eps, "null or a number >= 0 (input space)")
        if tradeoff_attack is not None and tradeoff_eps is None and tradeoff_attack.family != MINIMIZATION:
            raise ConfigError("defense.tradeoff_eps", tradeoff_eps, "a number >= 0",
                              f"{tradeoff_attack.name} is a fixed-epsilon attack")
        self.tradeoff_attack = tradeoff_attack
        self.tradeoff_eps = float(tradeoff_eps) if tradeoff_eps is not None else None
        self.tradeoff_attacks = _check_tradeoff_attacks(tradeoff_attacks)
        self.chosen: float | None = None if self.jump == "auto" else float(self.jump)
        self.tradeoff: pd.DataFrame | None = None

    # -- the transform ------------------------------------------------------------------------------------
    def transform(self, model: nn.Module, context: dict[str, Any]) -> nn.Module:
        if self.jump != "auto":
            return retrofit(model, float(self.jump))
        splits = context.get("splits")
        if splits is None or splits.x_val.shape[0] == 0:
            raise ConfigError("defense.jump", "auto", "a number, or 'auto' with validation data",
                              "jump=auto tunes on the validation split: set data.n_val > 0")
        device = context.get("device") or next(model.parameters()).device
        n = splits.x_val.shape[0] if self.n_val == 0 else min(self.n_val, splits.x_val.shape[0])
        x_val = data_mod.to_float(splits.x_val[:n]).to(device)
        y_val = splits.y_val[:n].to(device)
        seed = int(context.get("seed", 0))
        cached = None
        if self.reuse_tuning and context.get("cache_dir") is not None:
            cached = Path(context["cache_dir"]) / "jumprelu" / f"{self.tuning_key(model, x_val, y_val, seed)}.json"
        table = self._load_tuning(cached) if cached is not None else None
        if table is None:
            table = self.tune(model, x_val, y_val, seed=seed)
            if cached is not None:
                from robustbench_lab.core.cache import atomic_write_bytes
                atomic_write_bytes(cached, json.dumps({"chosen": self.chosen, "columns": list(table.columns), "table": {
                    c: table[c].tolist() for c in table.columns}}).encode())   # exact floats (repr round-trips)
        writer = context.get("writer")
        if writer is not None:
            writer.write_csv("jumprelu_tradeoff.csv", table)
            plot_tradeoff(writer.path("jumprelu_tradeoff.png"), table, self.max_accuracy_drop)
        return retrofit(model, float(self.chosen))   # type: ignore[arg-type]

    def tuning_key(self, model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, seed: int) -> str:
        """Hash of everything the tuning result depends on (see the class docstring)."""
        from robustbench_lab.core.cache import content_key
        h = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        data = hashlib.sha256(x_val.detach().cpu().contiguous().numpy().tobytes())
        data.update(y_val.detach().cpu().contiguous().numpy().tobytes())
        return content_key({
            "kind": "jumprelu_tuning", "version": 1, "model": h.hexdigest(), "val": data.hexdigest(),
            "n_val": int(x_val.shape[0]), "grid": self.grid, "max_accuracy_drop": self.max_accuracy_drop,
            "tradeoff_n": self.tradeoff_n, "batch_size": self.batch_size, "seed": seed,
            "device": x_val.device.type,
            "tradeoff_attack": self.tradeoff_attack.config() if self.tradeoff_attack is not None else None,
            "tradeoff_eps": self.tradeoff_eps,
            "tradeoff_attacks": {label: {"config": atk.config(), "eps": eps}
                                 for label, (atk, eps) in self.tradeoff_attacks.items()}})

    def _load_tuning(self, path: Path) -> pd.DataFrame | None:
        """A stored tuning (JSON only, nothing unpickled), adopted as if measured; None if absent or unreadable."""
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            table = pd.DataFrame({c: d["table"][c] for c in d["columns"]}, columns=d["columns"])
            chosen = float(d["chosen"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("jumprelu: stored tuning %s unreadable (%s); tuning again", path, e)
            return None
        self.chosen, self.tradeoff = chosen, table
        log.info("jumprelu: reused the tuning stored in %s (k=%g; defense.reuse_tuning=false re-measures)",
                 path, chosen)
        return table

    def tune(self, model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, seed: int = 0) -> pd.DataFrame:
        """Measure the trade-off on validation data (N, C, H, W) in [0, 1] and set ``self.chosen``."""
        probe = retrofit(model, 0.0)
        nt = min(self.tradeoff_n, x_val.shape[0])
        xs, ys = x_val[:nt], y_val[:nt]
        rows = []
        for k in self.grid:
            set_jump(probe, k)
            acc = float((predict(probe, x_val, self.batch_size) == y_val).float().mean())
            row: dict[str, Any] = {"k": k, "val_accuracy": acc,
                                   "zero_grad_fraction": zero_gradient_fraction(probe, xs, ys, self.batch_size)}
            if self.tradeoff_attack is not None:
                gen = torch.Generator(device=x_val.device).manual_seed(seed)   # same randomness for every k
                row.update(attack_strength(probe, self.tradeoff_attack, xs, ys, self.tradeoff_eps, gen,
                                           self.batch_size))
            for label, (atk, eps) in self.tradeoff_attacks.items():
                gen = torch.Generator(device=x_val.device).manual_seed(seed)
                res = attack_strength(probe, atk, xs, ys, eps, gen, self.batch_size)
                row.update({f"{label}_{key}": v for key, v in res.items() if key != "subset_clean_accuracy"})
            rows.append(row)
            log.info("jumprelu k=%g: validation accuracy %.4f %s", k, acc,
                     {key: round(v, 4) for key, v in row.items() if key not in ("k", "val_accuracy")})
        table = pd.DataFrame(rows)
        ref = float(table.loc[table["k"] == 0.0, "val_accuracy"].iloc[0])
        self.chosen = choose_jump(table["k"].tolist(), table["val_accuracy"].tolist(), ref, self.max_accuracy_drop)
        table["accuracy_drop"] = ref - table["val_accuracy"]
        table["admissible"] = table["accuracy_drop"] <= self.max_accuracy_drop + 1e-12
        table["chosen"] = table["k"] == self.chosen
        table.insert(1, "n_val", x_val.shape[0])
        table.insert(2, "tradeoff_n", nt)
        if self.tradeoff_attack is not None:
            table["tradeoff_attack"] = self.tradeoff_attack.name
            table["tradeoff_eps"] = self.tradeoff_eps
        self.tradeoff = table
        log.info("jumprelu: chose k=%g (largest with validation accuracy drop <= %g)", self.chosen,
                 self.max_accuracy_drop)
        return table

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"jump": self.chosen, "jump_mode": "auto" if self.jump == "auto" else "fixed"}
        if self.tradeoff is not None:
            t = self.tradeoff
            out.update({
                "grid": self.grid, "max_accuracy_drop": self.max_accuracy_drop, "n_val": int(t["n_val"].iloc[0]),
                "val_accuracy_k0": float(t.loc[t["k"] == 0.0, "val_accuracy"].iloc[0]),
                "val_accuracy_chosen": float(t.loc[t["chosen"], "val_accuracy"].iloc[0]),
                "tradeoff_attack": self.tradeoff_attack.name if self.tradeoff_attack is not None else None,
                "tradeoff_attack_config": self.tradeoff_attack.config() if self.tradeoff_attack is not None else None,
                "tradeoff_eps": self.tradeoff_eps,
                "tradeoff_attacks": {label: {"attack": atk.name, "eps": eps, "config": atk.config()}
                                     for label, (atk, eps) in self.tradeoff_attacks.items()},
                "tradeoff": t.drop(columns=[c for c in ("tradeoff_attack", "tradeoff_eps") if c in t]).to_dict("records"),
                "tradeoff_files": ["jumprelu_tradeoff.csv", "jumprelu_tradeoff.png"],
            })
        return out


def plot_tradeoff(path, table: pd.DataFrame, max_drop: float) -> None:
    """Two panels against k: accuracies (clean validation accuracy and every robust accuracy measured) and
    median minimal perturbation norms (every minimization attack measured); the chosen k marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm_cols = [c for c in table.columns if "median_min_" in c]
    minimizers = {c.split("median_min_")[0] for c in norm_cols}      # "<label>_" prefixes (and "" unlabelled)
    # robust accuracy of a minimization attack run without eps means "never fooled": not an accuracy at a budget
    acc_cols = [c for c in table.columns if c.endswith("robust_accuracy") and c[:-len("robust_accuracy")] not in minimizers]
    fig, axes = plt.subplots(1, 2 if norm_cols else 1, figsize=(10.4 if norm_cols else 5.2, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot(table["k"], table["val_accuracy"], marker="o", ms=3, color="k", label="clean val accuracy")
    ref = float(table.loc[table["k"] == 0.0, "val_accuracy"].iloc[0])
    ax.axhline(ref - max_drop, color="k", ls=":", lw=1, label=f"k=0 accuracy - {max_drop:g}")
    for i, c in enumerate(acc_cols):
        ax.plot(table["k"], table[c], marker="s", ms=3, color=f"C{i}", label=c)
    chosen = table.loc[table["chosen"], "k"]
    for a in axes[0]:
        if len(chosen):
            a.axvline(float(chosen.iloc[0]), color="grey", ls="--", lw=1)
        a.set_xlabel("jump k (pre-activation units)")
        a.grid(alpha=0.3)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, loc="best")
    ax.set_title("JumpReLU: accuracy vs k" + (f" (chosen k = {float(chosen.iloc[0]):g})" if len(chosen) else ""),
                 fontsize=9)
    if norm_cols:
        ax2 = axes[0, 1]
        for i, c in enumerate(norm_cols):
            ax2.plot(table["k"], table[c].replace([np.inf], np.nan), marker="^", ms=3, color=f"C{i + len(acc_cols)}",
                     label=c)
        ax2.set_ylabel("median minimal perturbation")
        ax2.set_yscale("log")
        ax2.legend(fontsize=6, loc="best")
        ax2.set_title("median minimal norm vs k (larger = apparently more robust;\nnot drawn where < half fooled)",
                      fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
