"""TR vs CW at matched quality (median L2 against gradient evaluations, read at equal norm) and time ratios
from interleaved repetitions, for ``benchmarks/attacks.py``."""

from __future__ import annotations

from pathlib import Path
import json

import numpy as np
import torch

from benchmarks.attack_runs import EPS_LINF, external, ours


# -- TR vs CW at matched quality --------------------------------------------------------------------------
TR_LADDER = (1, 2, 3, 5, 8, 12, 20, 50, 100)           # iterations
CW_LADDER = ((1, 10), (1, 30), (2, 30), (3, 50), (5, 50), (9, 100))   # (binary-search steps, Adam steps)


def curve_point(model, attack_name, overrides, x, y):
    res, _ = ours(attack_name, overrides, model, x, y, None)
    norms = torch.where(res.fooled, res.l2, torch.full_like(res.l2, float("inf")))
    return {"grad_evals_per_example": res.n_backward / x.shape[0], "median_l2": float(norms.median()),
            "success_rate": float(res.fooled.float().mean()), "seconds": res.seconds}


def tr_cw_curves(model, x, y):
    """Median L2 (over all points, +inf where not broken) against gradient evaluations per example, for TR-L2
    (first order) at each iteration cap in ``TR_LADDER`` and CW-L2 at each budget in ``CW_LADDER``."""
    rows = []
    for it in TR_LADDER:
        r = curve_point(model, "trust_region", ["attack.norm=l2", f"attack.iterations={it}"], x, y)
        rows.append({"attack": "TR-L2", "budget": f"{it} it", "n": x.shape[0], **r})
        print(json.dumps(rows[-1]), flush=True)
    for bs, steps in CW_LADDER:
        r = curve_point(model, "cw", [f"attack.binary_search_steps={bs}", f"attack.steps={steps}"], x, y)
        rows.append({"attack": "CW-L2", "budget": f"{bs} x {steps}", "n": x.shape[0], **r})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def evals_at_norm(points, norm):
    """Gradient evaluations at which a curve first reaches median ``norm``: linear interpolation in
    log(evals) between the last budget above ``norm`` and the first at or below it; None if never."""
    pts = sorted((p["grad_evals_per_example"], p["median_l2"]) for p in points)
    prev = None
    for e, m in pts:
        if m <= norm:
            if prev is None or not np.isfinite(prev[1]):
                return e
            (e0, m0) = prev
            t = (m0 - norm) / (m0 - m) if m0 != m else 1.0
            return float(np.exp(np.log(e0) + t * (np.log(e) - np.log(e0))))
        prev = (e, m)
    return None


def equal_norm_ratio(curves):
    """(norm, CW evals, TR evals, ratio) at CW's best median: how many times fewer gradient evaluations TR
    needs for the median CW reaches with its largest budget."""
    tr = [p for p in curves if p["attack"] == "TR-L2"]
    cw = [p for p in curves if p["attack"] == "CW-L2"]
    if not tr or not cw:
        return None
    best = min(cw, key=lambda p: p["median_l2"])
    norm = best["median_l2"]
    e_cw = evals_at_norm(cw, norm)
    e_tr = evals_at_norm(tr, norm)
    if e_cw is None or e_tr is None or not np.isfinite(norm):
        return None
    return {"median_l2": norm, "cw_evals": e_cw, "tr_evals": e_tr, "ratio": e_cw / e_tr}


def interleaved_ratios(model, x, y, repeats):
    """Time ratios from interleaved repetitions (A, B, A, B, ...) on the same points: each ratio is the
    median over repetitions of time(B) / time(A), so a load that changes slowly cancels out."""
    pairs = {
        "CW-L2 (9 x 100) / TR-L2 (order 1, default)": (("trust_region", ["attack.norm=l2"]), ("cw", [])),
        "PGD-Linf-20 ours / torchattacks": (("pgd", ["attack.norm=linf", "attack.steps=20"]), "torchattacks"),
    }
    out = {}
    for label, (a_spec, b_spec) in pairs.items():
        ratios = []
        for _ in range(repeats):
            ta_ = ours(a_spec[0], a_spec[1], model, x, y, EPS_LINF if a_spec[0] == "pgd" else None)[0].seconds
            if b_spec == "torchattacks":
                try:
                    import torchattacks as ta
                except ImportError:
                    break
                torch.manual_seed(0)
                _, tb, _, _ = external(lambda m, xx, yy: ta.PGD(m, eps=EPS_LINF, alpha=2.5 * EPS_LINF / 20, steps=20,
                                                               random_start=True)(xx, yy), model, x, y)
                ratios.append(ta_ / tb)     # ours / theirs
            else:
                tb = ours(b_spec[0], b_spec[1], model, x, y, None)[0].seconds
                ratios.append(tb / ta_)
        if ratios:
            out[label] = {"median": float(np.median(ratios)), "all": ratios, "n": x.shape[0]}
            print(label, out[label], flush=True)
    return out


def plot_curves(curves, path: Path):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, marker in (("TR-L2", "o"), ("CW-L2", "s")):
        pts = [(c["grad_evals_per_example"], c["median_l2"]) for c in curves
               if c["attack"] == name and np.isfinite(c["median_l2"])]
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=f"{name[:2]} (first order)" if name == "TR-L2" else "CW")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # major ticks only: minor labels collide
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("Gradient evaluations per example", fontsize=10)
    ax.set_ylabel("Median L2 perturbation", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


