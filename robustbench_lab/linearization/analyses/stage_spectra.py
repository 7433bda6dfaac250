"""(a') Stage spectra: the Jacobian of each whole stage (its units composed) at each image's stage input."""

from __future__ import annotations

import logging

import pandas as pd

from robustbench_lab.linearization.analyses.context import Context, Results
from robustbench_lab.linearization.analyses.plots import Caption, plot_stage_spectra
from robustbench_lab.linearization.analyses.tables import aggregate, fmt, markdown_table
from robustbench_lab.linearization.units import stage_function, unit_input

log = logging.getLogger(__name__)


def stage_spectra(ctx: Context, res: Results) -> None:
    o = ctx.opts
    x = ctx.images.x[:o.stages.n_images]
    rows, pooled = [], {}
    stages = sorted({u.stage for u in ctx.all_units})
    for b in o.boundaries:
        for s in stages:
            first = next(u for u in ctx.all_units if u.stage == s)
            x0 = unit_input(ctx.model, x, first)
            fn = stage_function(ctx.net, s, boundary=b)
            specs, stats = ctx.spectra("stage", b, f"stage{s + 1}", fn, x0, o.stages.method, o.stages.k,
                                       which=o.stages.which)
            pooled[(b, s)] = specs
            rows.append({"boundary": b, "block": ctx.block_type, "stage": s + 1,
                         "units": len([u for u in ctx.all_units if u.stage == s]), **aggregate(specs, stats)})
            log.info("stage %s (%s): %s, top1 %.3f, min %.3g", s + 1, b, rows[-1]["method"], rows[-1]["top1"],
                     rows[-1]["sigma_min"])
    df = pd.DataFrame(rows)
    ctx.writer.write_csv("stage_spectra.csv", df)
    res.tables["stage_spectra"] = df
    plot_stage_spectra(ctx.writer.path("stage_spectra.png"), pooled, o.boundaries, stages,
                       Caption(ctx.label, ctx.block_type), o.stages.k, o.stages.which, x.shape[0])
    for r in rows:
        res.metrics[f"stages/{r['boundary']}/stage{r['stage']}/top1"] = r["top1"]
        res.metrics[f"stages/{r['boundary']}/stage{r['stage']}/sigma_min"] = r["sigma_min"]
    res.metrics["stages/seconds"] = float(df["seconds"].sum())
    lines = [f"## Stage spectra ({ctx.block_type})", "", "`stage_spectra.csv`, `stage_spectra.png`.", ""]
    lines += markdown_table(
        ["boundary", "stage", "dims in -> out", "method", "top-1", "smallest", "frac. within tol of 1 [bounds]"],
        [[r["boundary"], r["stage"], f"{r['n_in']} -> {r['n_out']}", r["method"], fmt(r["top1"]),
          fmt(r["sigma_min"]), f"{fmt(r['frac_one'])} [{fmt(r['frac_one_lo'])}, {fmt(r['frac_one_hi'])}]"]
         for r in rows], "Singular values of every stage's Jacobian (means over images).")
    res.sections.append("\n".join(lines))
