"""``JumpReLUDefense``: the JumpReLU retrofit as a defense transform, with the jump fixed or tuned on the
validation split (the package docstring describes the method)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from defenses.jumprelu.activation import check_jump
from defenses.jumprelu.measure import attack_strength, preactivation_quantiles, zero_gradient_fraction
from defenses.jumprelu.plot import plot_tradeoff
from defenses.jumprelu.retrofit import retrofit, set_jump
from defenses.jumprelu.tuning import (DEFAULT_GRID, check_tradeoff_attacks, choose_jump, load_tuning, store_tuning,
                                      tuning_key)
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.attack_base import Attack, AttackFamily
from robustbench_lab.core.defense_base import Defense
from robustbench_lab.core.errors import ConfigError, check_bool, check_number
from robustbench_lab.core.model import predict

log = logging.getLogger(__name__)

PREACTIVATION_POINTS = 500   # enough for stable quantiles; the first ReLU of a CNN sees ~10^4 values per image


class JumpReLUDefense(Defense):
    """Retrofit every ReLU of the trained model with JumpReLU(k).

    ``jump``: a number (pre-activation units, after BatchNorm where the model has it), or ``'auto'``: for
    every k of ``grid`` (k = 0 always included) measure the clean accuracy on the validation split (its
    first ``n_val`` points; 0 = all), take the largest k whose drop from k = 0 is at most
    ``max_accuracy_drop`` (absolute). With 'auto' the whole trade-off is recorded: per k the validation
    accuracy, the share of exactly-zero input gradients, and the strength of ``tradeoff_attack`` (any attack
    object; default DeepFool-L2: median minimal L2 and, at ``tradeoff_eps`` if given, robust accuracy) on
    the first ``tradeoff_n`` validation points -> ``jumprelu_tradeoff.csv`` and ``jumprelu_tradeoff.png``.
    Every robust accuracy comes with its 95% Wilson interval and every median with its distribution-free
    95% interval (``<column>_ci_low``, ``<column>_ci_high``) and the number of points behind it
    (``<column>_n``); ``describe()`` adds the positive pre-activation quantiles per ReLU (the scale of k).
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
        self.reuse_tuning = check_bool("defense.reuse_tuning", reuse_tuning)
        if isinstance(jump, str):
            if jump != "auto":
                raise ConfigError("defense.jump", jump, "'auto' or a number >= 0")
            self.jump: float | str = "auto"
        else:
            self.jump = check_jump(jump, "jump")
        if isinstance(grid, str) or not isinstance(grid, Iterable):
            raise ConfigError("defense.grid", grid, "a list of numbers >= 0")
        grid_l = sorted({check_jump(k, "grid") for k in grid})
        if not grid_l:
            raise ConfigError("defense.grid", grid, "a non-empty list of numbers >= 0")
        self.grid = [0.0] + [k for k in grid_l if k != 0.0]
        self.max_accuracy_drop = float(check_number("defense.max_accuracy_drop", max_accuracy_drop, low=0, high=1,
                                                    hint="an absolute drop in accuracy"))
        for key, v, lo in (("n_val", n_val, 0), ("tradeoff_n", tradeoff_n, 1), ("batch_size", batch_size, 1)):
            check_number(f"defense.{key}", v, low=lo, integer=True)
        self.n_val, self.tradeoff_n, self.batch_size = int(n_val), int(tradeoff_n), int(batch_size)
        if tradeoff_attack is not None and not isinstance(tradeoff_attack, Attack):
            raise ConfigError("defense.tradeoff_attack", tradeoff_attack, "an attack config node (_target_) or null")
        check_number("defense.tradeoff_eps", tradeoff_eps, low=0, allow_none=True,
                     hint="epsilon is in input space")
        if tradeoff_attack is not None and tradeoff_eps is None and \
                tradeoff_attack.family != AttackFamily.MINIMIZATION:
            raise ConfigError("defense.tradeoff_eps", tradeoff_eps, "a number >= 0",
                              f"{tradeoff_attack.name} is a fixed-epsilon attack")
        self.tradeoff_attack = tradeoff_attack
        self.tradeoff_eps = float(tradeoff_eps) if tradeoff_eps is not None else None
        self.tradeoff_attacks = check_tradeoff_attacks(tradeoff_attacks)
        self.chosen: float | None = None if self.jump == "auto" else float(self.jump)
        self.tradeoff: pd.DataFrame | None = None
        self.preactivation: list[dict[str, Any]] | None = None

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
        # the scale the grid has to span, recorded even when the tuning is reused (one forward pass)
        self.preactivation = preactivation_quantiles(model, x_val[:PREACTIVATION_POINTS], self.batch_size)
        log.info("jumprelu: positive pre-activation quantiles per ReLU on %d validation points: %s",
                 min(n, PREACTIVATION_POINTS), [{k: (round(v, 3) if isinstance(v, float) else v)
                                                 for k, v in row.items()} for row in self.preactivation])
        cached = None
        if self.reuse_tuning and context.get("cache_dir") is not None:
            cached = Path(context["cache_dir"]) / "jumprelu" / f"{self.tuning_key(model, x_val, y_val, seed)}.json"
        table = self._load_tuning(cached) if cached is not None else None
        if table is None:
            table = self.tune(model, x_val, y_val, seed=seed)
            if cached is not None:
                store_tuning(cached, float(self.chosen), table)   # type: ignore[arg-type]
        writer = context.get("writer")
        if writer is not None:
            writer.write_csv("jumprelu_tradeoff.csv", table)
            plot_tradeoff(writer.path("jumprelu_tradeoff.png"), table, self.max_accuracy_drop)
        return retrofit(model, float(self.chosen))   # type: ignore[arg-type]

    def tuning_key(self, model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, seed: int) -> str:
        """Hash of everything the tuning result depends on (see the class docstring)."""
        return tuning_key(model, x_val, y_val, {
            "grid": self.grid, "max_accuracy_drop": self.max_accuracy_drop,
            "tradeoff_n": self.tradeoff_n, "batch_size": self.batch_size, "seed": seed,
            "tradeoff_attack": self.tradeoff_attack.config() if self.tradeoff_attack is not None else None,
            "tradeoff_eps": self.tradeoff_eps,
            "tradeoff_attacks": {label: {"config": atk.config(), "eps": eps}
                                 for label, (atk, eps) in self.tradeoff_attacks.items()}})

    def _load_tuning(self, path: Path) -> pd.DataFrame | None:
        """A stored tuning, adopted as if measured; None if absent or unreadable."""
        stored = load_tuning(path)
        if stored is None:
            return None
        chosen, table = stored
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
        if self.preactivation is not None:
            out["preactivation_quantiles"] = self.preactivation
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
