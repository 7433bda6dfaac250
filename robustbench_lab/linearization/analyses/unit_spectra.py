"""(a) Unit spectra: the singular values of every selected unit's Jacobian at each image's unit input,
per boundary; complete explicit spectra of ``explicit_units``; quantile-band and histogram plots."""

from __future__ import annotations

import logging
import math

import pandas as pd

from robustbench_lab.linearization.analyses.context import Context, Results
from robustbench_lab.linearization.analyses.plots import Caption, plot_histograms, plot_unit_bands
from robustbench_lab.linearization.analyses.tables import aggregate, fmt, markdown_table
from robustbench_lab.linearization.spectra import Spectrum
from robustbench_lab.linearization.units import get_block, unit_function, unit_input

log = logging.getLogger(__name__)


def unit_spectra(ctx: Context, res: Results) -> None:
    o = ctx.opts
    x = ctx.images.x[:o.n_images]
    rows = []
    pooled: dict[tuple[str, str], list[Spectrum]] = {}
    for b in o.boundaries:
        for ref in ctx.units:
            block = get_block(ctx.net, ref)
            x0 = unit_input(ctx.model, x, ref)
            fn = unit_function(block, boundary=b)
            specs, stats = ctx.spectra("unit", b, ref.name, fn, x0, o.method, o.k, block=block,
                                       columns={"block": type(block).__name__})
            pooled[(b, ref.name)] = specs
            rows.append({"boundary": b, "block": type(block).__name__, "unit": ref.name, "stage": ref.stage + 1,
                         "index": ref.index + 1, **aggregate(specs, stats)})
            log.info("unit %s (%s): %s, frac_one %.3f [%.3f, %.3f], top1 %.3f", ref.name, b, rows[-1]["method"],
                     rows[-1]["frac_one"], rows[-1]["frac_one_lo"], rows[-1]["frac_one_hi"], rows[-1]["top1"])
    df = pd.DataFrame(rows)
    ctx.writer.write_csv("unit_spectra.csv", df)
    res.tables["unit_spectra"] = df

    explicit: dict[tuple[str, str], list[Spectrum]] = {}
    if o.explicit_units:
        erows = []
        xe = ctx.images.x[:o.explicit_images]
        for b in o.boundaries:
            for ref in [u for u in ctx.all_units if u.name in set(o.explicit_units)]:
                block = get_block(ctx.net, ref)
                x0 = unit_input(ctx.model, xe, ref)
                fn = unit_function(block, boundary=b)
                specs, stats = ctx.spectra("unit_explicit", b, ref.name, fn, x0, "explicit", o.k,
                                           columns={"block": type(block).__name__})
                explicit[(b, ref.name)] = specs
                erows.append({"boundary": b, "block": type(block).__name__, "unit": ref.name, "stage": ref.stage + 1,
                              "index": ref.index + 1, **aggregate(specs, stats)})
        edf = pd.DataFrame(erows)
        ctx.writer.write_csv("unit_spectra_explicit.csv", edf)
        res.tables["unit_spectra_explicit"] = edf

    for b in o.boundaries:
        _plot_unit_bands(ctx, b, df[df["boundary"] == b], pooled, explicit)
        _plot_histograms(ctx, b, pooled, explicit)
        sub = df[df["boundary"] == b]
        complete = sub[sub["complete"]]
        res.metrics[f"units/{b}/frac_one_lo_mean"] = float(sub["frac_one_lo"].mean())
        res.metrics[f"units/{b}/frac_one_hi_mean"] = float(sub["frac_one_hi"].mean())
        res.metrics[f"units/{b}/frac_one_mean_complete"] = float(complete["frac_one"].mean()) if len(complete) \
            else math.nan
        res.metrics[f"units/{b}/top1_max"] = float(sub["sigma_max"].max())
        for st, g in sub.groupby("stage"):
            gc = g[g["complete"]]
            res.metrics[f"units/{b}/stage{st}/frac_one_mean"] = float(gc["frac_one"].mean()) if len(gc) else math.nan
            res.metrics[f"units/{b}/stage{st}/top1_mean"] = float(g["top1"].mean())
            res.metrics[f"units/{b}/stage{st}/spread_rel_mean"] = float(g["spread_rel_mean"].mean())
        if o.explicit_units:
            for _, r in edf[edf["boundary"] == b].iterrows():
                res.metrics[f"units_explicit/{b}/{r['unit']}/frac_one"] = float(r["frac_one"])
        res.metrics[f"units/{b}/spread_rel_mean"] = float(sub["spread_rel_mean"].mean())
    res.metrics["units/seconds"] = float(df["seconds"].sum())
    lines = [f"## Unit spectra ({ctx.block_type}; tol {o.tol})", "",
             f"`unit_spectra.csv` (one row per boundary x unit, {o.n_images} images each, method `{o.method}`), "
             "`unit_spectra_<boundary>.png` (quantile bands per unit; right axis: fraction within tol of 1), "
             "`unit_histograms_<boundary>.png`."
             + (f" Complete explicit spectra of {', '.join(o.explicit_units)} on {o.explicit_images} images: "
                "`unit_spectra_explicit.csv`." if o.explicit_units else ""), ""]
    lines += markdown_table(
        ["boundary", "unit", "method", "frac. within tol of 1 [bounds]", "min", "median", "max", "spread (rel.)"],
        [[r["boundary"], r["unit"], r["method"], f"{fmt(r['frac_one'])} [{fmt(r['frac_one_lo'])}, "
          f"{fmt(r['frac_one_hi'])}]", fmt(r["sigma_min"]), fmt(r["sigma_median"]), fmt(r["sigma_max"]),
          fmt(r["spread_rel_mean"])] for r in rows],
        f"Singular values of every selected unit's Jacobian ({o.n_images} images each; fraction within {o.tol:g} "
        "of 1, with its bounds for partial spectra).")
    res.sections.append("\n".join(lines))


def _plot_unit_bands(ctx: Context, b: str, df: pd.DataFrame, pooled: dict[tuple[str, str], list[Spectrum]],
                     explicit: dict[tuple[str, str], list[Spectrum]] | None = None) -> None:
    o = ctx.opts
    plot_unit_bands(ctx.writer.path(f"unit_spectra_{b}.png"), b, df, pooled, explicit or {},
                    [u.name for u in ctx.units], ctx.stage_starts(ctx.units), o.tol, Caption(ctx.label, ctx.block_type),
                    o.n_images, o.explicit_images, o.k, o.which)


def _plot_histograms(ctx: Context, b: str, pooled: dict[tuple[str, str], list[Spectrum]],
                     explicit: dict[tuple[str, str], list[Spectrum]]) -> None:
    """Histograms of complete spectra (explicit ones preferred) for ``hist_units`` (default: the first and
    last analysed unit of each stage that has a complete spectrum)."""
    def complete_specs(name: str) -> list[Spectrum]:
        for src in (explicit, pooled):
            specs = src.get((b, name))
            if specs and all(s.complete for s in specs):
                return specs
        return []

    names = list(ctx.opts.hist_units) if ctx.opts.hist_units else []
    if not names:
        for s in sorted({u.stage for u in ctx.units}):
            stage = [u.name for u in ctx.units if u.stage == s and complete_specs(u.name)]
            stage += [n for (bb, n) in explicit if bb == b and ctx.stage_of(n) == s and n not in stage]
            names += list(dict.fromkeys([stage[0], stage[-1]])) if stage else []
    chosen = {n: complete_specs(n) for n in names if complete_specs(n)}
    if chosen:
        plot_histograms(ctx.writer.path(f"unit_histograms_{b}.png"), b, chosen, ctx.opts.tol,
                        Caption(ctx.label, ctx.block_type))
