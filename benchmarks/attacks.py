"""Attack benchmark: our attacks against torchattacks and foolbox on the default model, in one run.

    .venv/bin/python benchmarks/attacks.py [--n 500] [--device auto] [--out docs/benchmarks.md]

Uses the default model (ResNet-20 on Fashion-MNIST; trained and cached by `python run.py` if needed) and
the first ``--n`` clean-correct evaluation points. For every attack: success rate (among those points),
median / mean L2 and L-inf of the successful perturbations, mean relative L2, forward and backward passes
per example (counted the same way for every library, through a counting proxy of the model), and seconds.
Ratios asked by the targets are computed from numbers measured in this same run:

* TR-L2 vs our CW-L2: median L2 ratio and speed-up;
* our PGD vs torchattacks' PGD (same eps, step, steps, random start): time ratio and robust accuracies;
* each of our attacks vs the bare cost of its passes: a plain autograd loop replaying exactly the passes
  the attack made (every forward pass with its batch size, a backward pass where the attack made one),
  recorded by a tracing proxy ("bookkeeping overhead").

Every row states its budget (iterations, restarts, binary-search steps). TR runs at its configured default
(100 iterations) and at the benchmark's 1000 (it leaves the loop per example on success, so the cap only
costs on points that resist). A peer's minimization attack counts only its real successes: where Foolbox
reports failure it returns an unusable point (for CW an all-zero image), which is replaced by the clean input.

TR vs CW at matched quality: both run at a ladder of budgets on the same points (``--curve-n``), giving
median L2 (over all points, +inf where the attack failed) against gradient evaluations per example; the
ratio is read at equal norm (the evaluations CW needs for its best median, over those TR needs for the same
median, interpolated on TR's curve). Time ratios come from interleaved repetitions (``--repeats``) on a
subset, so a busy machine slows both sides alike; single-row seconds are stated with the machine's load.

Writes a Markdown table with machine and versions into ``--out`` and the raw numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ROBUSTBENCH_LAB_ROOT", str(ROOT))

from robustbench_lab.core import data as data_mod  # noqa: E402
from robustbench_lab.core.model import predict  # noqa: E402
from benchmarks.attack_runs import (EPS_L2, EPS_LINF, Tracer, bare_cost, external, foolbox_call,  # noqa: E402
                                   load_default_model, ours, stats)
from benchmarks.matched_budget import (CW_LADDER, TR_LADDER, equal_norm_ratio, interleaved_ratios,  # noqa: E402
                                       plot_curves, tr_cw_curves)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--only", default="", help="comma-separated subset of row names (quick looks)")
    ap.add_argument("--curve-n", type=int, default=200, help="points for the TR-vs-CW budget curves (0: skip)")
    ap.add_argument("--time-n", type=int, default=50, help="points for the interleaved timing ratios (0: skip)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per timing ratio")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    model, splits = load_default_model(device)
    x_all = data_mod.to_float(splits.x_test[:4000]).to(device)
    y_all = splits.y_test[:4000].to(device)
    ok = predict(model, x_all) == y_all
    x, y = x_all[ok][:a.n], y_all[ok][:a.n]
    n = x.shape[0]
    rows = []
    only = set(filter(None, a.only.split(",")))

    def add(row_name, lib, attack, norm, eps, x_adv, sec, nf, nb, bare=None, budget=""):
        if only and row_name not in only:
            return
        r = {"row": row_name, "library": lib, "attack": attack, "budget": budget, "norm": norm, "eps": eps, "n": n,
             "load_avg": os.getloadavg()[0],
             **stats(x, x_adv, y, model, eps, norm), "forward_per_example": nf / n,
             "grad_evals_per_example": nb / n, "seconds": sec}
        if bare is not None:
            r["bare_seconds"] = bare
            r["overhead_ratio"] = sec / bare if bare > 0 else float("nan")
        rows.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)

    def run_ours(row_name, name, overrides, norm, eps, budget):
        if only and row_name not in only:
            return
        tracer = Tracer(model)
        res, atk = ours(name, overrides, tracer, x, y, eps)
        calls = tracer.calls[:-1]          # the last pass is the template's verification (not timed in seconds)
        bare = bare_cost(model, x, y, calls)
        add(row_name, "robustbench_lab", name, norm, eps, res.x_adv, res.seconds, res.n_forward, res.n_backward, bare,
            budget)

    # --- minimization attacks, L2 -------------------------------------------------------------------------
    tr_budget = "{} it, 9 candidate classes, stop at success"
    run_ours("TR-L2 (order 1, default)", "trust_region", ["attack.norm=l2"], "l2", None, tr_budget.format(100))
    run_ours("TR-L2 (order 1)", "trust_region", ["attack.norm=l2", "attack.iterations=1000"], "l2", None,
             tr_budget.format(1000))
    run_ours("TR-L2 (order 2)", "trust_region", ["attack.norm=l2", "attack.order=2", "attack.iterations=1000"], "l2", None,
             tr_budget.format(1000) + ", 5 CG steps")
    run_ours("TR-Linf (order 1, default)", "trust_region", ["attack.norm=linf"], "linf", None, tr_budget.format(100))
    run_ours("TR-Linf (order 1)", "trust_region", ["attack.norm=linf", "attack.iterations=1000"], "linf", None,
             tr_budget.format(1000))
    run_ours("CW-L2 (9 x 100)", "cw", [], "l2", None, "9 binary-search steps x 100 Adam steps, abort early")
    run_ours("DeepFool-L2", "deepfool", ["attack.norm=l2"], "l2", None, "50 it, 10 candidates, overshoot 0.02")
    run_ours("DeepFool-Linf", "deepfool", ["attack.norm=linf"], "linf", None, "50 it, 10 candidates, overshoot 0.02")
    # --- fixed budget ------------------------------------------------------------------------------------
    run_ours("PGD-Linf-20", "pgd", ["attack.norm=linf", "attack.steps=20"], "linf", EPS_LINF, "20 steps, 1 restart")
    run_ours("PGD-L2-20", "pgd", ["attack.norm=l2", "attack.steps=20"], "l2", EPS_L2, "20 steps, 1 restart")
    run_ours("AutoAttack-Linf (standard)", "autoattack", ["attack.norm=linf"], "linf", EPS_LINF,
             "standard: APGD-CE, APGD-T (9 targets), FAB-T, Square 5000")

    # --- peers ---------------------------------------------------------------------------------------------
    try:
        import torchattacks as ta
        step = 2.5 * EPS_LINF / 20
        if not only or "torchattacks PGD-Linf-20" in only:
            torch.manual_seed(0)
            xa, sec, nf, nb = external(lambda m, xx, yy: ta.PGD(m, eps=EPS_LINF, alpha=step, steps=20,
                                                                  random_start=True)(xx, yy), model, x, y)
            add("torchattacks PGD-Linf-20", "torchattacks", "PGD", "linf", EPS_LINF, xa, sec, nf, nb,
                budget="20 steps, 1 restart")
        if not only or "torchattacks PGD-L2-20" in only:
            torch.manual_seed(0)
            xa, sec, nf, nb = external(lambda m, xx, yy: ta.PGDL2(m, eps=EPS_L2, alpha=2.5 * EPS_L2 / 20, steps=20,
                                                                    random_start=True)(xx, yy), model, x, y)
            add("torchattacks PGD-L2-20", "torchattacks", "PGDL2", "l2", EPS_L2, xa, sec, nf, nb,
                budget="20 steps, 1 restart")
        if not only or "torchattacks CW-L2 (c=1, 100 steps, no search)" in only:
            xa, sec, nf, nb = external(lambda m, xx, yy: ta.CW(m, c=1, kappa=0, steps=100, lr=0.01)(xx, yy),
                                       model, x, y)
            add("torchattacks CW-L2 (c=1, 100 steps, no search)", "torchattacks", "CW", "l2", None, xa, sec, nf, nb,
                budget="c = 1, 100 Adam steps, no binary search")
        if not only or "torchattacks DeepFool-L2" in only:
            xa, sec, nf, nb = external(lambda m, xx, yy: ta.DeepFool(m, steps=50, overshoot=0.02)(xx, yy), model, x, y)
            add("torchattacks DeepFool-L2", "torchattacks", "DeepFool", "l2", None, xa, sec, nf, nb,
                budget="50 it, overshoot 0.02")
    except ImportError:
        print("torchattacks not installed: skipping its rows", file=sys.stderr)
    try:
        import foolbox as fb

        for row_name, atk_, norm, eps, budget in [
            ("foolbox CW-L2 (9 x 100)", fb.attacks.L2CarliniWagnerAttack(binary_search_steps=9, steps=100, stepsize=0.01,
                                                                          confidence=0, initial_const=1e-3,
                                                                          abort_early=True), "l2", None,
             "9 binary-search steps x 100 Adam steps, abort early"),
            ("foolbox DeepFool-L2", fb.attacks.L2DeepFoolAttack(steps=50, candidates=10, overshoot=0.02), "l2", None,
             "50 it, 10 candidates, overshoot 0.02"),
            ("foolbox DeepFool-Linf", fb.attacks.LinfDeepFoolAttack(steps=50, candidates=10, overshoot=0.02), "linf", None,
             "50 it, 10 candidates, overshoot 0.02"),
            ("foolbox PGD-Linf-20", fb.attacks.LinfPGD(rel_stepsize=2.5 / 20, steps=20, random_start=True), "linf",
             EPS_LINF, "20 steps, 1 restart"),
        ]:
            if only and row_name not in only:
                continue
            torch.manual_seed(0)
            xa, sec, nf, nb = external(foolbox_call(fb, atk_, eps), model, x, y)
            add(row_name, "foolbox", type(atk_).__name__, norm, eps, xa, sec, nf, nb, budget=budget)
    except ImportError:
        print("foolbox not installed: skipping its rows", file=sys.stderr)

    curves = tr_cw_curves(model, x[:a.curve_n], y[:a.curve_n]) if a.curve_n and not only else []
    timing = interleaved_ratios(model, x[:a.time_n], y[:a.time_n], a.repeats) if a.time_n and not only else {}
    write(rows, Path(a.out), device, curves, timing)


def write(rows, out: Path, device, curves=(), timing=None):
    by = {r["row"]: r for r in rows}
    ratios = []
    tr, cw = by.get("TR-L2 (order 1)"), by.get("CW-L2 (9 x 100)")
    if tr and cw:
        ratios.append(f"- TR-L2 (1000 it) success {tr['success_rate']:.3f}; median L2 TR / CW = "
                      f"{tr['median_l2'] / cw['median_l2']:.3f} (target <= 1.25); gradient evaluations CW / TR = "
                      f"{cw['grad_evals_per_example'] / tr['grad_evals_per_example']:.1f}x (single rows' seconds: "
                      f"{cw['seconds'] / tr['seconds']:.1f}x)")
    eq = equal_norm_ratio(list(curves))
    if eq:
        ratios.append(f"- At equal median L2 ({eq['median_l2']:.4f}, CW's best on the curve points): CW needs "
                      f"{eq['cw_evals']:.0f} gradient evaluations per example, TR {eq['tr_evals']:.1f}: "
                      f"**{eq['ratio']:.1f}x fewer for TR** (target >= 20x)")
    for label, t in (timing or {}).items():
        ratios.append(f"- Time {label}: {t['median']:.3f} (median of {len(t['all'])} interleaved repetitions on "
                      f"{t['n']} points: {', '.join(f'{v:.3f}' for v in t['all'])})")
    p, tp = by.get("PGD-Linf-20"), by.get("torchattacks PGD-Linf-20")
    if p and tp:
        ratios.append(f"- PGD-Linf-20 robust accuracy ours {p['robust_accuracy']:.3f} vs torchattacks "
                      f"{tp['robust_accuracy']:.3f} (target: ours <=)")
    fcw = by.get("foolbox CW-L2 (9 x 100)")
    if cw and fcw:
        ratios.append(f"- CW-L2 median L2 ours / foolbox = {cw['median_l2'] / fcw['median_l2']:.3f} (success ours "
                      f"{cw['success_rate']:.3f}, foolbox {fcw['success_rate']:.3f}, real successes only)")
    over = [f"{r['row']} {r['overhead_ratio']:.2f}" for r in rows if "overhead_ratio" in r]
    if over:
        ratios.append("- time / bare cost of the same passes (target <= 1.10): " + "; ".join(over))
    cols = ["row", "budget", "success_rate", "robust_accuracy", "median_l2", "mean_l2", "median_linf", "mean_linf",
            "mean_rel_l2", "grad_evals_per_example", "forward_per_example", "seconds", "load_avg"]
    fmt = lambda v: ("" if v is None or (isinstance(v, float) and np.isnan(v)) else  # noqa: E731
                     (f"{v:.4g}" if isinstance(v, float) else str(v)))
    lines = ["# Attack benchmark", "",
             f"Default model (ResNet-20, Fashion-MNIST, cached checkpoint), {rows[0]['n'] if rows else 0} clean-correct "
             f"test points, one run. Fixed-budget attacks at L-inf {EPS_LINF} / L2 {EPS_L2}; minimization "
             "attacks unbounded (norms of successful perturbations; a peer's reported failures count as failures). "
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, device {device}; torch {torch.__version__}, "
             f"Python {platform.python_version()}. Generated by `benchmarks/attacks.py`; `load_avg` is the machine's "
             "1-minute load when the row started (above ~2 on 2 cores, other work shared them, so compare its "
             "seconds only through the interleaved ratios).", "",
             "## Targets (ratios from this run)", "", *ratios, "",
             "## Table", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    if curves:
        n_curve = curves[0].get("n", "")
        lines += ["", "## TR vs CW: median L2 against gradient evaluations", "",
                  "Median over all points (+inf where the attack failed), first-order TR-L2 at iteration caps "
                  f"{', '.join(map(str, TR_LADDER))} and CW-L2 at (binary-search steps x Adam steps) "
                  f"{', '.join(f'{a} x {b}' for a, b in CW_LADDER)}, on the first {n_curve} points of the table's.",
                  "", "![TR vs CW](img/tr_vs_cw_budget.png)", "",
                  "| attack | budget | grad_evals_per_example | median_l2 | success_rate | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['attack']} | {c['budget']} | {fmt(c['grad_evals_per_example'])} | {fmt(c['median_l2'])} | "
                  f"{fmt(c['success_rate'])} | {fmt(c['seconds'])} |" for c in curves]
        plot_curves(curves, out.parent / "img" / "tr_vs_cw_budget.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "curves": list(curves), "timing": timing or {},
                                                    "equal_norm": eq}, indent=2))
    print("\n".join(ratios))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
