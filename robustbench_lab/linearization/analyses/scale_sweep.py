"""(b) Scale sweep: the spectrum of one unit as its skip scale lambda, and separately its residual
weights, vary (the unit is restored after every setting)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from robustbench_lab.linearization.analyses.context import Context, Results
from robustbench_lab.linearization.analyses.plots import Caption, plot_scale_sweep
from robustbench_lab.linearization.analyses.tables import aggregate, fmt, markdown_table, spectrum_stats
from robustbench_lab.linearization.units import get_block, scaled, unit_function, unit_input


def scale_sweep(ctx: Context, res: Results) -> None:
    """Spectra of ``sweep.unit`` for every skip scale lambda (weight scale 1) and every residual-weight scale
    (lambda 1). Fraction within tol of |lambda| and of 1; the unit is restored after each setting."""
    o = ctx.opts
    ref = next(u for u in ctx.all_units if u.name == o.sweep.unit)
    block = get_block(ctx.net, ref)
    x = ctx.images.x[:o.sweep.n_images]
    x0 = unit_input(ctx.model, x, ref)   # the unit's own scales do not change its input
    settings = ([("skip", lam, 1.0) for lam in o.sweep.skip_scales]
                + [("weight", 1.0, c) for c in o.sweep.weight_scales])
    rows, curves = [], {}
    for b in o.boundaries:
        for kind, lam, c in settings:
            specs, stats, stats1 = [], [], []
            for i in range(x.shape[0]):
                with scaled(block, skip_scale=lam, weight_scale=c):   # restored on exit
                    sp = ctx.spectrum(unit_function(block, boundary=b), x0[i], o.sweep.method, o.k, block=block,
                                      boundary=b)
                st = spectrum_stats(sp, o.tol, target=abs(lam))
                st1 = spectrum_stats(sp, o.tol, target=1.0)
                ctx.record("sweep", b, ref.name, f"{kind}:lambda={lam:g},weight={c:g}", ctx.images.index[i], sp,
                           st1, block=type(block).__name__, skip_scale=lam, weight_scale=c,
                           frac_eq_lambda=st["frac"], frac_eq_lambda_lo=st["frac_lo"], frac_eq_lambda_hi=st["frac_hi"])
                specs.append(sp)
                stats.append(st)
                stats1.append(st1)
            curves[(b, kind, lam, c)] = specs
            agg = aggregate(specs, stats1)
            rows.append({"boundary": b, "block": type(block).__name__, "unit": ref.name, "sweep": kind,
                         "skip_scale": lam, "weight_scale": c,
                         "frac_eq_lambda": float(np.mean([s["frac"] for s in stats])),
                         "frac_eq_lambda_lo": float(np.mean([s["frac_lo"] for s in stats])),
                         "frac_eq_lambda_hi": float(np.mean([s["frac_hi"] for s in stats])), **agg})
    df = pd.DataFrame(rows)
    ctx.writer.write_csv("scale_sweep.csv", df)
    res.tables["scale_sweep"] = df
    plot_scale_sweep(ctx.writer.path("scale_sweep.png"), curves, settings, o.boundaries, ref.name,
                     type(block).__name__, Caption(ctx.label, ctx.block_type), x.shape[0])
    for r in rows:
        tag = f"lambda={r['skip_scale']:g}" if r["sweep"] == "skip" else f"weight={r['weight_scale']:g}"
        res.metrics[f"sweep/{r['boundary']}/{tag}/frac_eq_lambda"] = r["frac_eq_lambda"]
        res.metrics[f"sweep/{r['boundary']}/{tag}/frac_one"] = r["frac_one"]
        res.metrics[f"sweep/{r['boundary']}/{tag}/top1"] = r["top1"]
    res.metrics["sweep/unit"] = ref.name
    lines = [f"## Scale sweep on unit {ref.name} ({type(block).__name__})", "",
             "`scale_sweep.csv`, `scale_sweep.png`: lambda varies with weights x1; the weights vary with lambda 1.",
             ""]
    lines += markdown_table(
        ["boundary", "sweep", "lambda", "weights x", "frac. within tol of abs(lambda)", "frac. within tol of 1", "min",
         "max"],
        [[r["boundary"], r["sweep"], f"{r['skip_scale']:g}", f"{r['weight_scale']:g}", fmt(r["frac_eq_lambda"]),
          fmt(r["frac_one"]), fmt(r["sigma_min"]), fmt(r["sigma_max"])] for r in rows],
        f"The spectrum of unit {ref.name} as its skip scale and its residual weights vary (means over images).")
    res.sections.append("\n".join(lines))
