"""The evaluator owns the robust mask: the cascade over attacks and the per-example worst case.

A point is robust only if it is classified correctly and every attack fails on it (RobustBench/AutoAttack).
Each attack runs only on the points still robust; robust accuracy is over all evaluated points.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from robustbench_lab.core.attack_base import Attack, AttackFamily, AttackResult
from robustbench_lab.core.model import predict
from robustbench_lab.core.norms import Norm, l1, l2, linf
from robustbench_lab.core.progress import SILENT, Progress

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Evaluation:
    """Per-example table (one row per example x attack) and the worst-case adversarial batch."""

    table: pd.DataFrame
    x_adv: torch.Tensor            # per example: the adversarial that broke it (see ``ensemble``), else the clean input
    clean_pred: torch.Tensor
    robust: torch.Tensor           # (N,) bool, the final robust mask
    attack_seconds: dict[str, float]
    attack_counts: dict[str, dict[str, Any]]
    n_nan: int
    ensemble: str | None = None    # minimal-norm ensemble: the norm column ("l2"/"linf"/"l1") the smallest is taken in

    def per_example(self) -> pd.DataFrame:
        """One row per example: the worst case over attacks (a cascade: the first attack that broke it; a
        minimal-norm ensemble: the member with the smallest successful perturbation)."""
        t = self.table
        hits = t[t["success"]]
        if self.ensemble:
            hits = hits.sort_values([self.ensemble, "attack_order"], kind="stable")
        first = hits.drop_duplicates("index", keep="first").set_index("index")
        base = t.drop_duplicates("index", keep="first").set_index("index")[["label", "clean_pred", "clean_correct"]]
        out = base.copy()
        out["robust"] = self.robust.cpu().numpy()
        out["broken_by"] = first["attack"].reindex(out.index)
        for c in ("adv_pred", "l2", "linf", "rel_l2", "rel_linf", "l1", "rel_l1"):
            if c in first:   # the L1 columns exist where an attack's norm is L1
                out[c] = first[c].reindex(out.index)
        if "target" in t:    # targeted runs: the target of the attack that broke the point, else of the first
            aimed = t[t["attacked"]].drop_duplicates("index", keep="first").set_index("index")["target"]
            out["target"] = first["target"].reindex(out.index).fillna(aimed.reindex(out.index)).astype("Int64")
        return out.reset_index()


@dataclasses.dataclass
class AttackOutcome:
    """One attack on a set of N points, batch by batch (``attack_points``). Points not attacked keep their
    clean input in ``x_adv``, ``success`` False, and zero norms."""

    clean_correct: torch.Tensor   # (N,) bool
    attacked: torch.Tensor        # (N,) bool
    success: torch.Tensor         # (N,) bool, the template's recomputed success
    fooled: torch.Tensor          # (N,) bool, misclassified at the returned point (at any size)
    x_adv: torch.Tensor           # (N, C, H, W)
    adv_pred: torch.Tensor        # (N,) predictions at x_adv (clean prediction where not attacked)
    l2: torch.Tensor              # (N,)
    linf: torch.Tensor            # (N,)
    n_forward: int
    n_backward: int
    n_nan: int
    n_hvp: int = 0
    raw_ball_violation: float = 0.0   # the largest over batches (see AttackResult)
    raw_box_violation: float = 0.0
    n_projected: int = 0
    l1: torch.Tensor | None = None    # (N,)
    target: torch.Tensor | None = None  # (N,) int64, targeted attacks: each attacked point's target, -1 elsewhere

    @property
    def robust(self) -> torch.Tensor:
        """Clean-correct and not fooled: the per-example robustness under this attack."""
        return self.clean_correct & ~self.success


def attack_points(model: nn.Module, attack: Attack, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                  generator: torch.Generator, batch_size: int = 500, mask: torch.Tensor | None = None,
                  clean_correct: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                  progress: Progress = SILENT) -> AttackOutcome:
    """Attack the points of ``x`` (N, C, H, W) in [0, 1] selected by ``mask`` (default: the points ``model``
    classifies correctly) in batches of ``batch_size``, in index order. The one loop behind every robust
    accuracy the harness reports (the evaluator's cascade, the sanity checks, defenses' own measurements).
    ``ids`` (N,): the points' dataset indices (default 0..N-1), which key each point's random stream with
    ``generator``'s seed, so the outcome of a point does not depend on ``batch_size`` or on ``mask``.
    ``progress``: a bar over the attacked points (points done, broken so far); silent by default.
    """
    n = x.shape[0]
    if clean_correct is None:
        clean_correct = predict(model, x, batch_size) == y
    todo = (clean_correct if mask is None else mask).nonzero().squeeze(1)
    ids = torch.arange(n, device=x.device) if ids is None else torch.as_tensor(ids, device=x.device)
    attacked = torch.zeros(n, dtype=torch.bool, device=x.device)
    success = torch.zeros_like(attacked)
    fooled = torch.zeros_like(attacked)
    x_adv = x.clone()
    adv_pred = torch.zeros(n, dtype=torch.long, device=x.device)
    norms = {k: torch.zeros(n, device=x.device) for k in ("l2", "linf", "l1")}
    target = torch.full((n,), -1, dtype=torch.long, device=x.device) if attack.targeted else None
    nf = nb = n_nan = n_hvp = n_projected = 0
    ball = box = 0.0
    bar = progress.bar(todo.numel(), attack.name)   # closes itself when the last batch is counted
    for i in range(0, todo.numel(), batch_size):
        b = todo[i:i + batch_size]
        res: AttackResult = attack(model, x[b], y[b], eps=eps, generator=generator, ids=ids[b])
        bar.update(b.numel(), broken=int(res.success.sum()))
        nf += res.n_forward
        nb += res.n_backward
        n_nan += res.n_nan
        n_hvp += res.n_hvp
        n_projected += res.n_projected
        ball, box = max(ball, res.raw_ball_violation), max(box, res.raw_box_violation)
        attacked[b] = True
        success[b] = res.success
        fooled[b] = res.fooled
        x_adv[b] = res.x_adv
        adv_pred[b] = res.adv_pred
        norms["l2"][b] = res.l2
        norms["linf"][b] = res.linf
        norms["l1"][b] = res.l1
        if target is not None and res.target is not None:
            target[b] = res.target
    return AttackOutcome(clean_correct, attacked, success, fooled, x_adv, adv_pred, norms["l2"], norms["linf"],
                         nf, nb, n_nan, n_hvp, ball, box, n_projected, norms["l1"], target)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Sequence[Attack],
             eps: float | None, generator: torch.Generator, batch_size: int = 500,
             indices: Sequence[int] | None = None, progress: Progress = SILENT) -> Evaluation:
    """Run ``attacks`` on ``x`` (N, C, H, W) in [0, 1], labels ``y`` (N,).

    Fixed-epsilon attacks (and mixed lists) run as a cascade: each on the points still robust. When every
    attack is a minimization attack they form an ensemble, as AttackBench and Foolbox score one: each member
    runs on every clean-correct point and each example keeps its smallest adversarial over members (at most
    ``eps`` when one is given; ``eps=None`` scores misclassification alone, so the per-example minimal norms
    give the whole robust-accuracy-vs-epsilon curve). ``indices`` are the examples' ids in their dataset.
    ``progress``: a bar per attack over its batches (silent by default).
    """
    n = x.shape[0]
    dev = x.device
    ids = np.asarray(indices if indices is not None else range(n))
    clean_pred = predict(model, x, batch_size)
    clean_correct = clean_pred == y
    robust = clean_correct.clone()
    x_worst = x.clone()
    x_norm_l2 = l2(x).clamp_min(1e-12)
    x_norm_linf = linf(x).clamp_min(1e-12)
    frames = []
    seconds: dict[str, float] = {}
    counts: dict[str, dict[str, int]] = {}
    n_nan = 0
    ensemble = bool(attacks) and all(AttackFamily(a.family) == AttackFamily.MINIMIZATION for a in attacks)
    norm_col = attacks[-1].norm.value if ensemble else None
    with_l1 = any(a.norm is Norm.L1 for a in attacks)
    with_target = any(a.targeted for a in attacks)
    best = torch.full((n,), float("inf"), device=dev)   # ensemble: the smallest successful norm so far
    for order, atk in enumerate(attacks):
        t0 = time.perf_counter()
        out = attack_points(model, atk, x, y, eps, generator, batch_size, clean_correct=clean_correct,
                            mask=clean_correct if ensemble else robust, ids=torch.as_tensor(ids, device=dev),
                            progress=progress)
        n_nan += out.n_nan
        if ensemble:
            size = {"linf": out.linf, "l2": out.l2, "l1": out.l1}[norm_col]
            better = out.success & (size < best)
            best = torch.where(better, size, best)
        else:
            better = out.success
        x_worst[better] = out.x_adv[better]
        robust &= ~out.success
        attacked = out.attacked.cpu().numpy()
        success = out.success.cpu().numpy()
        adv_pred = torch.where(out.attacked, out.adv_pred, clean_pred).cpu().numpy()
        cols = {k: np.where(attacked, v.cpu().numpy(), np.nan) for k, v in
                (("l2", out.l2), ("linf", out.linf), ("rel_l2", out.l2 / x_norm_l2), ("rel_linf", out.linf / x_norm_linf))}
        if with_l1:
            cols["l1"] = np.where(attacked, out.l1.cpu().numpy(), np.nan)
            cols["rel_l1"] = np.where(attacked, (out.l1 / l1(x).clamp_min(1e-12)).cpu().numpy(), np.nan)
        if with_target:   # the class each attacked point was pushed to (missing where not attacked or untargeted)
            aimed = out.target.cpu().numpy() if out.target is not None else np.full(n, -1)
            cols["target"] = pd.Series(np.where(attacked & (aimed >= 0), aimed, np.nan)).astype("Int64").array
        nf, nb = out.n_forward, out.n_backward
        seconds[atk.name] = time.perf_counter() - t0
        counts[atk.name] = {"forward": nf, "backward": nb, "hvp": out.n_hvp, "attacked": int(attacked.sum()),
                            "raw_ball_violation": out.raw_ball_violation, "raw_box_violation": out.raw_box_violation,
                            "n_projected": out.n_projected}
        frames.append(pd.DataFrame({
            "index": ids, "label": y.cpu().numpy(), "clean_pred": clean_pred.cpu().numpy(),
            "clean_correct": clean_correct.cpu().numpy(), "attack": atk.name, "attack_order": order,
            "family": AttackFamily(atk.family).value,
            "norm": atk.norm.value, "attacked": attacked, "adv_pred": adv_pred, "success": success, **cols,
        }))
        log.info("%s: attacked %d points, %d broken, %.1fs", atk.name, int(attacked.sum()), int(success.sum()),
                 seconds[atk.name])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return Evaluation(table, x_worst, clean_pred, robust, seconds, counts, n_nan, norm_col)


def robust_accuracy_curve(norms_if_fooled: np.ndarray, clean_correct: np.ndarray,
                          eps_grid: Sequence[float]) -> pd.DataFrame:
    """Robust accuracy at every epsilon from per-example minimal norms (1 - CDF), over all points.

    ``norms_if_fooled`` holds each example's minimal adversarial norm, +inf where no adversarial was found
    (and for clean-misclassified points it is irrelevant: they count as non-robust at every epsilon).
    """
    norms = np.where(clean_correct, norms_if_fooled, -np.inf)
    rows = [{"eps": float(e), "robust_accuracy": float(np.mean(norms > e * (1 + 1e-6) + 1e-7))} for e in eps_grid]
    return pd.DataFrame(rows)


def summarize(ev: Evaluation, attacks: Sequence[Attack], eps: float | None) -> dict[str, Any]:
    """The headline metrics of an evaluation (see docs/metrics.md for definitions)."""
    n = int(ev.robust.numel())
    cc = ev.table.drop_duplicates("index")["clean_correct"].to_numpy()
    pe = ev.per_example()
    broken = pe[pe["broken_by"].notna()]
    n_cc = int(cc.sum())
    grads = sum(c["backward"] for c in ev.attack_counts.values())
    fwds = sum(c["forward"] for c in ev.attack_counts.values())
    hvps = sum(c.get("hvp", 0) for c in ev.attack_counts.values())
    n_attacked = max((c["attacked"] for c in ev.attack_counts.values()), default=0)
    # the trust-region paper's relative perturbation: averaged over all evaluated points, 0 for points
    # misclassified before the attack; defined only when every clean-correct point was broken
    every_broken = len(broken) == n_cc
    paper = {f"paper_rel_{k}": float(broken[f"rel_{k}"].sum() / n) if n and every_broken else float("nan")
             for k in ("l2", "linf")}
    # L1 metrics only where an attack measured in L1 ran (the table then has its columns)
    nan = float("nan")
    by_l1 = {"median_l1": float(broken["l1"].median()) if len(broken) else nan,
             "mean_l1": float(broken["l1"].mean()) if len(broken) else nan,
             "mean_rel_l1": float(broken["rel_l1"].mean()) if len(broken) else nan} if "l1" in pe else {}
    return {
        "n_examples": n,
        **targeted_summary(ev, attacks),
        "clean_accuracy": float(cc.mean()) if n else float("nan"),
        "robust_accuracy": float(ev.robust.float().mean()) if n else float("nan"),
        "attack_success_rate": float(len(broken) / n_cc) if n_cc else float("nan"),
        "median_l2": float(broken["l2"].median()) if len(broken) else float("nan"),
        "median_linf": float(broken["linf"].median()) if len(broken) else float("nan"),
        "mean_l2": float(broken["l2"].mean()) if len(broken) else float("nan"),
        "mean_linf": float(broken["linf"].mean()) if len(broken) else float("nan"),
        "mean_rel_l2": float(broken["rel_l2"].mean()) if len(broken) else float("nan"),
        "mean_rel_linf": float(broken["rel_linf"].mean()) if len(broken) else float("nan"),
        **by_l1,
        "grad_evals_per_example": float(grads / n_attacked) if n_attacked else 0.0,
        "forward_evals_per_example": float(fwds / n_attacked) if n_attacked else 0.0,
        "hvp_per_example": float(hvps / n_attacked) if n_attacked else 0.0,
        **paper,
        "attack_seconds": float(sum(ev.attack_seconds.values())),
        "nan_count": int(ev.n_nan),
    }


def target_label(attacks: Sequence[Attack]) -> str | None:
    """The run's target spec as written (``random``, ``least_likely``, a class index; several joined by
    ``+`` when the attacks differ), or None when no attack is targeted."""
    specs = list(dict.fromkeys(str(a.target_spec) for a in attacks if a.targeted))
    return "+".join(specs) if specs else None


def targeted_summary(ev: Evaluation, attacks: Sequence[Attack]) -> dict[str, Any]:
    """Targeted runs only (else {}): the mode, the target spec, and the targeted success rate, the share of
    the attacked points predicted as their target at the kept adversarial (points labelled as their target
    are attacked and never succeed); ``n_target_is_label`` counts those."""
    spec = target_label(attacks)
    if spec is None:
        return {}
    pe = ev.per_example()
    attacked = ev.table.groupby("index", sort=False)["attacked"].any().reindex(pe["index"]).to_numpy(bool)
    n_att = int(attacked.sum())
    broken = pe["broken_by"].notna().to_numpy() & attacked
    same = (pe["target"].to_numpy(dtype=float, na_value=np.nan) == pe["label"].to_numpy()) & attacked
    return {"targeted": True, "target": spec,
            "targeted_success_rate": float(broken.sum() / n_att) if n_att else float("nan"),
            "n_target_is_label": int(same.sum())}
