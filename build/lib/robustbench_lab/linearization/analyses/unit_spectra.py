"""(a) Unit spectra: the singular values of every selected unit's Jacobian at each image's unit input,
per boundary; complete explicit spectra of ``explicit_units``; quantile-band and histogram plots."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from robustbench_lab.linearization.analyses.context import Context, Results
from robustbench_lab.linearization.analyses.plots import boundary_text, pyplot, stage_lines, wrap
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
          fmt(r["spread_rel_mean"])] for r in rows])
    res.sections.append("\n".join(lines))


def _plot_unit_bands(ctx: Context, b: str, df: pd.DataFrame, pooled: dict[tuple[str, str], list[Spectrum]],
                     explicit: dict[tuple[str, str], list[Spectrum]] | None = None) -> None:
    """Per unit: quantile bars of the complete spectra (blue), or the known Lanczos ends (orange) plus, for
    ``explicit_units``, their complete spectra on fewer images (light blue). Right axis: the fraction within
    tol of 1 where it is known (complete spectra: filled squares; explicit units: open squares), and its
    bounds where only the ends are known (shaded). A partial spectrum has no point: the fraction is unknown."""
    plt = pyplot()
    refs = [u for u in ctx.units]
    explicit = explicit or {}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(refs) + 2), 4.2))

    def bars(i: float, v: np.ndarray, colour: str, alpha: float) -> None:
        q = np.quantile(v, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
        ax.vlines(i, q[0], q[6], color=colour, lw=0.8, alpha=alpha)
        ax.vlines(i, q[1], q[5], color=colour, lw=3, alpha=0.45 * alpha)
        ax.vlines(i, q[2], q[4], color=colour, lw=6, alpha=alpha)
        ax.plot(i, q[3], "o", color="white", mec=colour, ms=4, alpha=alpha)

    ex_x, ex_frac = [], []
    for i, ref in enumerate(refs):
        specs = pooled[(b, ref.name)]
        v = np.concatenate([s.values for s in specs])
        if all(s.complete for s in specs):
            bars(i, v, "C0", 1.0)
        else:
            ex = explicit.get((b, ref.name))
            if ex and all(s.complete for s in ex):
                bars(i, np.concatenate([s.values for s in ex]), "C0", 0.45)
                ex_x.append(i)
                ex_frac.append(float(np.mean([np.mean(np.abs(s.values - 1.0) <= ctx.opts.tol) for s in ex])))
            if v.size:   # partial: the k largest and k smallest values only
                ax.vlines(i, v.min(), v.max(), color="C1", lw=0.8)
                ax.plot(np.full(v.size, i), v, "_", color="C1", ms=6)
    ax.axhline(1.0, color="k", lw=0.6)
    stage_lines(ax, ctx.stage_starts(refs))
    ax.set_xticks(range(len(refs)))
    ax.set_xticklabels([r.name for r in refs], rotation=90, fontsize=7)
    ax.set_ylabel("singular value")
    ax2 = ax.twinx()
    xs = np.arange(len(refs))
    frac = df["frac_one"].to_numpy(dtype=float)                 # NaN for partial spectra: drawn as gaps
    frac_lo, frac_hi = df["frac_one_lo"].to_numpy(dtype=float), df["frac_one_hi"].to_numpy(dtype=float)
    partial = np.isnan(frac)
    ax2.plot(xs, frac, "s-", color="C3", ms=3, lw=0.8, label="fraction within tol of 1")
    if partial.any():
        ax2.fill_between(xs, np.where(partial, frac_lo, np.nan), np.where(partial, frac_hi, np.nan), color="C3",
                         alpha=0.08, label="its bounds (partial spectra)")
    if ex_x:
        ax2.plot(ex_x, ex_frac, "s", mfc="none", color="C3", ms=5,
                 label=f"explicit units ({ctx.opts.explicit_images} img)")
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_ylabel(f"fraction within tol {ctx.opts.tol:g} of 1", color="C3")
    ax2.legend(fontsize=6, loc="upper right")
    ax.set_title(wrap(f"{ctx.label}: unit singular values over {ctx.opts.n_images} images\n{ctx.block_type}, "
                       f"{boundary_text(b)}; blue: complete spectra (whiskers min-max, bars 5-95% and 25-75%, "
                       f"dot median; light: explicit units on {ctx.opts.explicit_images} images), orange: Lanczos "
                       f"top/bottom-{ctx.opts.k} (which={ctx.opts.which})", fig.get_figwidth()), fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.writer.path(f"unit_spectra_{b}.png"), dpi=110)
    plt.close(fig)


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
    names = [n for n in names if complete_specs(n)]
    if not names:
        return
    plt = pyplot()
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        specs = complete_specs(name)
        v = np.concatenate([s.values for s in specs])
        frac = float(np.mean(np.abs(v - 1) <= ctx.opts.tol))
        ax.hist(v, bins=80, color="C0")
        ax.axvspan(1 - ctx.opts.tol, 1 + ctx.opts.tol, color="C3", alpha=0.3)
        ax.set_yscale("log")
        ax.set_title(f"{name} (n={specs[0].n}, {len(specs)} img, {specs[0].method}): {100 * frac:.1f}% within "
                     f"tol of 1", fontsize=7)
        ax.set_xlabel("singular value", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(wrap(f"{ctx.label}: histograms of complete spectra (pooled over images); {ctx.block_type}, "
                       f"{boundary_text(b)}", fig.get_figwidth(), 8), fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.writer.path(f"unit_histograms_{b}.png"), dpi=110)
    plt.close(fig)
