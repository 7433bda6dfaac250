"""(a') Stage spectra: the Jacobian of each whole stage (its units composed) at each image's stage input."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from robustbench_lab.linearization.analyses.context import Context, Results
from robustbench_lab.linearization.analyses.plots import pyplot, wrap
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
    plt = pyplot()
    fig, axes = plt.subplots(1, len(o.boundaries), figsize=(4.2 * len(o.boundaries), 3.4), squeeze=False)
    for ax, b in zip(axes[0], o.boundaries):
        for s in stages:
            v = np.concatenate([sp.values for sp in pooled[(b, s)]])
            ax.plot(np.full(v.size, s) + np.random.default_rng(s).uniform(-0.12, 0.12, v.size), v, ".",
                    color="C0" if all(sp.complete for sp in pooled[(b, s)]) else "C1", ms=3)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_ylim(bottom=0)                      # singular values: no negative half of the symlog axis
        ax.set_xticks(stages)
        ax.set_xticklabels([f"stage {s + 1}\n({pooled[(b, s)][0].n_in}->{pooled[(b, s)][0].n_out})" for s in stages],
                           fontsize=7)
        ax.set_ylabel("singular value")
        ax.set_title(f"{ctx.block_type}, boundary {b}", fontsize=8)
    fig.suptitle(wrap(f"{ctx.label}: stage Jacobians over {x.shape[0]} images (blue complete, orange Lanczos "
                       f"top/bottom-{o.stages.k}, which={o.stages.which})", fig.get_figwidth(), 8), fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.writer.path("stage_spectra.png"), dpi=110)
    plt.close(fig)
    for r in rows:
        res.metrics[f"stages/{r['boundary']}/stage{r['stage']}/top1"] = r["top1"]
        res.metrics[f"stages/{r['boundary']}/stage{r['stage']}/sigma_min"] = r["sigma_min"]
    res.metrics["stages/seconds"] = float(df["seconds"].sum())
    lines = [f"## Stage spectra ({ctx.block_type})", "", "`stage_spectra.csv`, `stage_spectra.png`.", ""]
    lines += markdown_table(
        ["boundary", "stage", "dims in -> out", "method", "top-1", "smallest", "frac. within tol of 1 [bounds]"],
        [[r["boundary"], r["stage"], f"{r['n_in']} -> {r['n_out']}", r["method"], fmt(r["top1"]),
          fmt(r["sigma_min"]), f"{fmt(r['frac_one'])} [{fmt(r['frac_one_lo'])}, {fmt(r['frac_one_hi'])}]"]
         for r in rows])
    res.sections.append("\n".join(lines))
