"""Evaluation-sanity checks, applied to every run (``checks=quick|full|none``).

The field's checklist (Carlini et al. 2019, "On Evaluating Adversarial Robustness"; AutoAttack's flags),
automated. The level is a ``CheckLevel``, parsed once where ``run_checks`` receives it. Each check has a name, a documentation page ``docs/checks/<name>.md`` ("raised when / what it
means / what to do"), a value recorded in ``metrics.json`` under ``checks``, and a visible warning when it
fires. Checks that need extra attacks run them at a small budget on a subset of the evaluated points; the
extra attacks are built from the same attack configs as everything else (``robustbench_lab/conf/attack``).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from enum import Enum
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from attacks.adaptive import BPDA, Transfer, bpda_modules
from robustbench_lab.app.builders import attack_from_name
from robustbench_lab.core.analyses import input_gradients, zero_gradient_mask
from robustbench_lab.core.attack_base import Attack, AttackFamily, reached
from robustbench_lab.core.errors import check_choice
from robustbench_lab.core.evaluator import attack_points
from robustbench_lab.core.model import eval_frozen, predict
from robustbench_lab.core.norms import Norm, l2, linf
from robustbench_lab.core.progress import SILENT, Progress
from robustbench_lab.core.targets import TargetSpec

log = logging.getLogger(__name__)


class CheckLevel(str, Enum):
    """How much of the checklist runs (config key ``checks``); a ``str`` enum, so it compares equal to the
    config's spelling."""

    NONE = "none"      # the audit of the returned points only
    QUICK = "quick"    # every check, on a small subset at a small budget
    FULL = "full"      # every check, on more points at a larger budget

    @classmethod
    def parse(cls, value: "str | CheckLevel", key: str = "checks") -> "CheckLevel":
        if isinstance(value, cls):
            return value
        return cls(check_choice(key, value, LEVELS))


LEVELS = tuple(level.value for level in CheckLevel)   # the config's spellings
DOCS = "docs/checks"

BUDGETS = {  # points checked, square queries, attack-step multiplier
    CheckLevel.QUICK: {"n": 64, "square_queries": 200, "steps": 10},
    CheckLevel.FULL: {"n": 500, "square_queries": 2000, "steps": 50},
}

LARGE_EPS = {Norm.LINF: 0.5, Norm.L2: None}   # L2: set from the input dimension (see eps_monotonicity)


@dataclasses.dataclass
class CheckResult:
    name: str
    fired: bool
    value: Any
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"fired": self.fired, "value": self.value, "message": self.message,
                "doc": f"{DOCS}/{self.name}.md"}


def _attack(name: str, norm: Norm, target: TargetSpec | None = None, **over: Any) -> Attack:
    """A probe from its attack config; with ``target``, in the run's targeted mode (towards that spec)."""
    # eps 0 is a placeholder: the checks pass their epsilon at call time
    return attack_from_name(name, norm.value, 0.0, key=f"checks.{name}", **over)[0].set_target(target)


def skipped(name: str, why: str) -> CheckResult:
    """A check that does not apply to this run: recorded as such, with the reason, never as a pass."""
    return CheckResult(name, False, {"skipped": why}, f"skipped: {why}")


def _robust_accuracy(model: nn.Module, atk: Attack, x: torch.Tensor, y: torch.Tensor, eps: float,
                     gen: torch.Generator, bs: int) -> float:
    """Robust accuracy (clean-correct and not fooled, over all points) of ``x`` under ``atk`` at ``eps``.

    Clean correctness is measured again for every probe: on a randomized model it differs call to call."""
    return float(attack_points(model, atk, x, y, eps, gen, bs).robust.float().mean())


def zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threshold: float = 0.01) -> CheckResult:
    g = input_gradients(model, x, y)
    gn = l2(g)
    frac = float(zero_gradient_mask(g).float().mean())
    return CheckResult("zero_gradients", frac > threshold, {"fraction_zero": frac, "median_grad_norm": float(gn.median())},
                       f"{100 * frac:.1f}% of clean points have an exactly zero input gradient" if frac > threshold
                       else f"input gradients are non-zero on {100 * (1 - frac):.1f}% of clean points")


def softmax_output(model: nn.Module, x: torch.Tensor) -> CheckResult:
    with torch.no_grad(), eval_frozen(model, warn_train=False):
        z = model(x)
    probs_like = bool((z >= -1e-6).all() and (z <= 1 + 1e-6).all() and
                      torch.allclose(z.sum(1), torch.ones(z.shape[0], device=z.device), atol=1e-4))
    return CheckResult("softmax_output", probs_like, {"min": float(z.min()), "max": float(z.max()),
                                                      "row_sum_mean": float(z.sum(1).mean())},
                       "the model returns probabilities (rows in [0,1] summing to 1), not logits" if probs_like
                       else "the model returns logits")


def randomized_output(model: nn.Module, x: torch.Tensor, repeats: int = 3) -> CheckResult:
    with torch.no_grad(), eval_frozen(model, warn_train=False):
        outs = [model(x) for _ in range(repeats)]
    diff = max(float((o - outs[0]).abs().max()) for o in outs[1:])
    fired = diff > 1e-5
    return CheckResult("randomized_output", fired, {"max_abs_diff": diff},
                       f"repeated forward passes disagree (max |diff| {diff:.3g}): the model is randomized" if fired
                       else "repeated forward passes agree")


RAW_TOLERANCE = 1e-6   # how far an attack's own output may leave the ball or the box (float rounding)


def audit(x: torch.Tensor, x_adv: torch.Tensor, norm: Norm, eps: float | None, n_nan: int,
          is_fixed_eps: bool, raw: dict[str, dict[str, Any]] | None = None,
          table: pd.DataFrame | None = None) -> CheckResult:
    """The final audit line (AutoAttack's): the largest perturbation per norm, NaN count, value range of the
    scored adversarials; and, per attack, how far the method's own output left the ball and the box before
    the template clipped it (``raw``: the evaluation's per-attack counts). Anything beyond float rounding
    there is a bug in that attack, which clipping would otherwise hide. In a targeted run (``table`` with a
    ``target`` column) it also checks the records: every success must be predicted as its target, which is
    not its label."""
    d = x_adv - x
    v = {"max_linf": float(linf(d).max()) if d.numel() else 0.0, "max_l2": float(l2(d).max()) if d.numel() else 0.0,
         "nan_count": int(n_nan), "min_value": float(x_adv.min()) if d.numel() else 0.0,
         "max_value": float(x_adv.max()) if d.numel() else 0.0}
    over = eps is not None and is_fixed_eps and (v["max_linf" if norm is Norm.LINF else "max_l2"] > eps * (1 + 1e-5) + 1e-6)
    box = v["min_value"] < 0 or v["max_value"] > 1
    v["raw_output"] = {name: {k: c.get(k, 0) for k in ("raw_ball_violation", "raw_box_violation", "n_projected")}
                       for name, c in (raw or {}).items()}
    buggy = {name: r for name, r in v["raw_output"].items()
             if max(r["raw_ball_violation"], r["raw_box_violation"]) > RAW_TOLERANCE}
    wrong = _targeted_records(table)
    if wrong is not None:
        v["targeted_successes_not_at_target"] = wrong
    fired = bool(over or box or n_nan or buggy or wrong)
    msg = (f"max perturbation: L-inf {v['max_linf']:.4g}, L2 {v['max_l2']:.4g}; NaN: {n_nan}; adversarial "
           f"values in [{v['min_value']:.3g}, {v['max_value']:.3g}]")
    if wrong is not None:
        msg += (f"; targeted: {wrong} recorded successes not predicted as their target" if wrong else
                "; targeted: every recorded success is predicted as its target")
    for name, r in buggy.items():
        msg += (f"; BUG in attack {name}: its output left the {'ball' if r['raw_ball_violation'] > RAW_TOLERANCE else 'box'}"
                f" by up to {max(r['raw_ball_violation'], r['raw_box_violation']):.3g} ({r['n_projected']} points "
                f"moved back by the harness)")
    return CheckResult("audit", fired, v, msg)


def _targeted_records(table: pd.DataFrame | None) -> int | None:
    """Targeted runs: how many rows of the per-example table count as a success although the recorded
    prediction is not the recorded target (or the target is the label); None for untargeted runs."""
    if table is None or "target" not in table:
        return None
    hits = table[table["success"].astype(bool)]
    target = hits["target"].to_numpy(dtype=float, na_value=np.nan)
    ok = (hits["adv_pred"].to_numpy() == target) & (target != hits["label"].to_numpy())
    return int((~ok).sum())


def attack_kind(atk: Attack) -> str:
    """'black_box' (gradient-free), 'bpda', 'transfer' or 'white_box': what a cascade entry can testify to."""
    if isinstance(atk, BPDA):
        return "bpda"
    if isinstance(atk, Transfer):
        return "transfer"
    if getattr(atk, "gradient_free", False):
        return "black_box"
    return "white_box"


def cascade_evidence(attacks: Sequence[Attack], table: pd.DataFrame | None, n: int) -> dict[str, Any]:
    """What the run's own cascade says, on all ``n`` evaluated points (AutoAttack's square check, generalized).

    In a cascade each attack only attacks the points every earlier attack left robust, so a point broken by a
    black-box, BPDA or transfer attack that a white-box attack had already attacked is a point the white-box
    attacks missed. Returns ``white_box_mask`` (N,) bool (robust after the white-box attacks alone; None without
    any) and, per kind, how many such points it broke (``<kind>_extra``) and the fraction of all points.
    """
    out: dict[str, Any] = {"white_box_mask": None}
    if table is None or table.empty or not any(attack_kind(a) == "white_box" for a in attacks):
        return out
    names = [a.name for a in attacks]
    kinds = [attack_kind(a) for a in attacks]
    wb_attacked = np.zeros(n, bool)
    wb_broken = np.zeros(n, bool)
    clean = None
    for name, kind in zip(names, kinds):
        t = table[table["attack"] == name].sort_values("index", kind="stable")
        if len(t) != n:   # an attack listed twice or a table of another shape: no per-point evidence
            return {"white_box_mask": None}
        attacked, success = t["attacked"].to_numpy(bool), t["success"].to_numpy(bool)
        clean = t["clean_correct"].to_numpy(bool) if clean is None else clean
        if kind == "white_box":
            wb_attacked |= attacked
            wb_broken |= success
        else:
            extra = int((success & wb_attacked).sum())
            out[f"{kind}_extra"] = out.get(f"{kind}_extra", 0) + extra
    out["white_box_mask"] = clean & ~wb_broken
    for kind in ("black_box", "bpda", "transfer"):
        if f"{kind}_extra" in out:
            out[f"{kind}_extra_fraction"] = out[f"{kind}_extra"] / max(n, 1)
    return out


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Sequence[Attack], eps: float | None,
               main_robust: torch.Tensor, x_adv: torch.Tensor, n_nan: int, level: CheckLevel | str,
               generator: torch.Generator, batch_size: int = 500,
               table: pd.DataFrame | None = None, raw: dict[str, dict[str, Any]] | None = None,
               progress: Progress = SILENT) -> list[CheckResult]:
    """Run the checks at ``level`` on the evaluated points ``x`` (N, C, H, W), ``y`` (N,).

    ``main_robust`` is the evaluation's robust mask, ``x_adv`` its worst-case adversarial batch, ``table`` its
    per-example table (one row per example x attack), ``raw`` its per-attack counts (raw-output figures for the
    audit). The white-box baseline the black-box, transfer and BPDA
    checks compare against is the run's white-box attacks alone: a cascade that already contains Square or
    BPDA must not hide the gap between them and the white-box attacks. ``progress``: a bar with one step per
    check (none at level ``none``, where only the audit runs).
    """
    level = CheckLevel.parse(level)
    norm = attacks[0].norm
    results: list[CheckResult] = []
    bar = progress.bar(0 if level is CheckLevel.NONE else planned_checks(model, eps), "checks", unit="check")

    def add(r: CheckResult) -> None:
        results.append(r)
        bar.update(1, fired=int(r.fired))

    add(audit(x, x_adv, norm, eps, n_nan, all(a.family == AttackFamily.FIXED_EPS for a in attacks), raw, table))
    if level is CheckLevel.NONE:
        return results
    b = BUDGETS[level]
    n = min(b["n"], x.shape[0])
    xs, ys, rob = x[:n], y[:n], main_robust[:n]
    add(zero_gradients(model, xs, ys))
    add(softmax_output(model, xs))
    add(randomized_output(model, xs))
    if eps is None or eps == 0:
        return results
    # Targeted runs: the probes attack in the run's mode, so "robust" means the same thing for all of them.
    # Random targets are drawn with the checks' seed, other targets than the run's: then the probes are
    # compared with each other only, not with the run's own attacks.
    spec = next((a.target_spec for a in attacks if a.targeted), None)
    vs_run = spec != "random"
    main_ra = float(rob.float().mean())
    cas = cascade_evidence(attacks, table, x.shape[0])
    wb_mask = cas.pop("white_box_mask")
    main_white = float(torch.as_tensor(wb_mask[:n]).float().mean()) if wb_mask is not None and vs_run else None
    not_run = "" if vs_run else "; the run's attacks aimed at other random targets, not compared"
    bs = batch_size
    # iterative vs single step
    fgsm_ra = _robust_accuracy(model, _attack("fgsm", norm, spec), xs, ys, eps, generator, bs)
    pgd = _attack("pgd", norm, spec, steps=b["steps"])
    pgd_ra = _robust_accuracy(model, pgd, xs, ys, eps, generator, bs)
    fired = fgsm_ra < pgd_ra - 0.01 or (vs_run and fgsm_ra < main_ra - 0.01)
    add(CheckResult("single_step_stronger", fired,
                    {"fgsm": fgsm_ra, "pgd": pgd_ra, "main": main_ra if vs_run else None},
                    f"robust accuracy on {n} points: FGSM {fgsm_ra:.3f}, PGD-{b['steps']} {pgd_ra:.3f}"
                    + (f", run's attacks {main_ra:.3f}" if vs_run else not_run)))
    # convergence: more steps and restarts
    pgd_more = _attack("pgd", norm, spec, steps=2 * b["steps"], restarts=2)
    more_ra = _robust_accuracy(model, pgd_more, xs, ys, eps, generator, bs)
    if vs_run:
        fired = more_ra < min(pgd_ra, main_ra) - 0.02
        add(CheckResult("not_converged", fired, {"pgd": pgd_ra, "pgd_2x_steps_2_restarts": more_ra, "main": main_ra},
                        f"PGD with 2x steps and 2 restarts: {more_ra:.3f} vs {min(pgd_ra, main_ra):.3f}"))
    else:   # it judges the run's attacks, which aimed elsewhere: a probe-only comparison would judge the probe
        add(skipped("not_converged", "the run's attacks aimed at random targets drawn with the run's seed, the "
                                     "probes at others (drawn with the checks' seed), so the probes cannot tell "
                                     "whether the run's attacks converged"))
    # black box
    square = _attack("square", norm, spec, n_queries=b["square_queries"])
    sq_ra = _robust_accuracy(model, square, xs, ys, eps, generator, bs)
    white = min(pgd_ra, more_ra) if main_white is None else min(pgd_ra, more_ra, main_white)
    fired, value, msg = _stronger("black_box", "square", sq_ra, white, cas)
    add(CheckResult("blackbox_stronger", fired, value,
                    f"Square ({b['square_queries']} queries) {sq_ra:.3f} vs best white-box {white:.3f}"
                    + msg))
    # transfer from the undefended model, when there is one
    source = getattr(model, "undefended", None)
    if source is not None:
        # crafted on the source, scored on the defended model: the outcome's own success is the source's
        ok = predict(model, xs) == ys
        crafted = attack_points(source, pgd, xs, ys, eps, generator, bs, clean_correct=ok)
        tr_rob = ok.clone()
        # re-verified on the defended model: misclassified, or, targeted, predicted as the crafted-for target
        tr_rob[ok] = ~reached(predict(model, crafted.x_adv[ok], bs), ys[ok],
                              None if crafted.target is None else crafted.target[ok])
        tr_ra = float(tr_rob.float().mean())
        fired, value, msg = _stronger("transfer", "transfer", tr_ra, white, cas)
        add(CheckResult("transfer_stronger", fired, value,
                        f"PGD crafted on the undefended model: {tr_ra:.3f} vs white-box {white:.3f}" + msg))
    # BPDA, when the model has modules with a smooth backward surrogate (e.g. JumpReLU)
    if bpda_modules(model) and spec is not None:
        add(skipped("bpda_stronger", "the BPDA wrapper runs its base attack untargeted, so it has no probe "
                                     "comparable with this targeted run"))
    elif bpda_modules(model):
        surrogate = bpda_modules(model)[0].BPDA_SURROGATES[0]
        bpda = BPDA(base=_attack("pgd", norm, steps=b["steps"]), surrogate=surrogate)
        # BPDA draws its base's streams: PGD's random starts, replayed point by point (like for like)
        bp_ra = _robust_accuracy(model, bpda, xs, ys, eps, generator, bs)
        fired, value, msg = _stronger("bpda", "bpda", bp_ra, white, cas)
        add(CheckResult("bpda_stronger", fired, value,
                        f"PGD-{b['steps']} through BPDA ({surrogate} surrogate): {bp_ra:.3f} vs white-box "
                        f"{white:.3f}" + msg))
    # monotonicity in epsilon and reaching zero
    large = LARGE_EPS[norm] if norm is Norm.LINF else 0.5 * float(xs[0].numel()) ** 0.5
    grid = sorted({eps * f for f in (0.5, 1.0, 2.0)} | {large})
    ras = [_robust_accuracy(model, _attack("pgd", norm, spec, steps=b["steps"]), xs, ys, e, generator, bs)
           for e in grid]
    nonmono = any(ras[i + 1] > ras[i] + 0.02 for i in range(len(ras) - 1))
    not_zero = ras[-1] > 0.05
    add(CheckResult("eps_monotonicity", nonmono or not_zero, {"eps": grid, "robust_accuracy": ras},
                    f"PGD robust accuracy at eps {[round(e, 4) for e in grid]}: {[round(r, 3) for r in ras]}"
                    + ("; not decreasing" if nonmono else "") +
                    (f"; not ~0 at eps {large:.3g}" if not_zero else "")))
    return results


def planned_checks(model: nn.Module, eps: float | None) -> int:
    """How many checks ``run_checks`` runs on ``model`` at level quick or full, the audit included."""
    if eps is None or eps == 0:
        return 4
    return 8 + (getattr(model, "undefended", None) is not None) + bool(bpda_modules(model))


def _stronger(kind: str, label: str, probe_ra: float, white: float, cas: dict[str, Any]) -> tuple[bool, dict, str]:
    """Fired when the check's probe beats the white-box baseline by > 1 point, or when the run's own cascade
    shows attacks of ``kind`` breaking > 1% of the evaluated points that its white-box attacks had left robust."""
    value: dict[str, Any] = {label: probe_ra, "white_box": white}
    msg = ""
    if f"{kind}_extra" in cas:
        extra, frac = cas[f"{kind}_extra"], cas[f"{kind}_extra_fraction"]
        value["cascade_extra_broken"] = extra
        value["cascade_extra_fraction"] = frac
        msg = f"; in the run's cascade it broke {extra} points ({frac:.1%}) the white-box attacks left robust"
    fired = probe_ra < white - 0.01 or value.get("cascade_extra_fraction", 0.0) > 0.01
    return fired, value, msg


def report(results: Sequence[CheckResult]) -> dict[str, Any]:
    """Record for metrics.json, and visible warnings for fired checks."""
    for r in results:
        if r.fired:
            msg = f"sanity check '{r.name}' fired: {r.message} (see {DOCS}/{r.name}.md)"
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
    audit_line = next((r.message for r in results if r.name == "audit"), "")
    log.info("audit: %s", audit_line)
    return {"checks": {r.name: r.as_dict() for r in results},
            "checks_fired": [r.name for r in results if r.fired], "audit": audit_line}
