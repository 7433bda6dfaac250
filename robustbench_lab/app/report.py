"""Aggregate run directories into one comparison: ``python -m robustbench_lab.app.report <dirs...> [--out DIR]``.

Finds every ``metrics.json`` (a finished cell) and ``failed.json`` (a failed one) below the given folders and
writes ``comparison.csv`` (one row per cell), ``comparison_summary.csv`` / ``.md`` / ``.tex`` (mean over seeds
with a 95% confidence interval), and plots: robust accuracy vs epsilon per attack x defense, the clean vs
robust trade-off, attack cost vs perturbation size, and the per-seed spread.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from robustbench_lab.core import plotstyle, tables
from robustbench_lab.core.cache import atomic_write_text
from robustbench_lab.core.plotstyle import fmt_number
from robustbench_lab.core.results import METRICS_FILE

log = logging.getLogger(__name__)

# "mode" (untargeted | targeted: <target>) exists only where some cell ran targeted attacks (``collect``)
GROUP = ["dataset", "model", "defense", "attack", "mode", "norm", "eps"]
# settings already in GROUP under another name, or that never tell cells apart (the seed: intervals are over it)
NOT_SWEPT = {"data.name", "model.name", "defense.name", "attack.name", "attack.norm", "attack.eps", "seed",
             "attacks", "attack.targeted"}
NOT_SWEPT_SUFFIXES = ("._target_",)   # the class follows from the attack or defense name
VALUES = ["clean_accuracy", "robust_accuracy", "attack_success_rate", "targeted_success_rate", "median_l2",
          "median_linf", "mean_rel_l2", "grad_evals_per_example", "attack_seconds", "seconds"]


def collect(dirs: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(finished cells, failed cells) below ``dirs``. A directory is counted once even if listed twice."""
    rows, failed, seen = [], [], set()
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise FileNotFoundError(f"no such run directory: {d}")
        for p in sorted(d.rglob(METRICS_FILE)):
            if ".staging" in p.parts or "wandb" in p.parts or p.resolve() in seen:
                continue
            seen.add(p.resolve())
            m = json.loads(p.read_text())
            rows.append({**{k: v for k, v in m.items() if not isinstance(v, (dict, list))},
                         **{f"settings:{k}": v for k, v in (m.get("settings") or {}).items()},
                         "run_dir": str(p.parent)})
        for p in sorted(d.rglob("failed.json")):
            if (p.parent / METRICS_FILE).exists():
                continue
            f = json.loads(p.read_text())
            failed.append({"run_dir": str(p.parent), "error": f.get("error", ""), "overrides": f.get("overrides", "")})
    df = pd.DataFrame(rows)
    if len(df) and "eps" in df:
        df["eps"] = pd.to_numeric(df["eps"], errors="coerce")
    if "targeted" in df and df["targeted"].fillna(False).astype(bool).any():
        # a targeted cell's numbers mean other things (success: predicted as the target): never pooled
        df["mode"] = [f"targeted: {t}" if bool(on) else "untargeted"
                      for on, t in zip(df["targeted"].fillna(False), df.get("target", pd.Series([None] * len(df))))]
    df = _swept_columns(df)
    return df, pd.DataFrame(failed, columns=["run_dir", "error", "overrides"])


def _swept_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Keep, as plain columns named by their key (``attack.steps``), the recorded settings that vary across
    the runs (the seed aside); drop the rest. Runs recorded without settings get NaN there."""
    cols = [c for c in df.columns if c.startswith("settings:")]
    swept = [c for c in cols if c[len("settings:"):] not in NOT_SWEPT and not c.endswith(NOT_SWEPT_SUFFIXES)
             and df[c].astype(str).nunique(dropna=False) > 1]
    df = df.drop(columns=[c for c in cols if c not in swept]).rename(columns={c: c[len("settings:"):] for c in swept})
    for c in swept:   # numbers sort as numbers; a column mixing kinds ("auto", 0.1) is compared as text
        c = c[len("settings:"):]
        num = pd.to_numeric(df[c], errors="coerce")
        mixed = num.isna() & df[c].notna()
        df[c] = df[c].astype(str) if mixed.any() or df[c].map(lambda v: isinstance(v, bool)).any() else num
    return df


def swept_keys(df: pd.DataFrame) -> list[str]:
    """The settings columns ``collect`` kept: the keys a sweep varied besides the seed."""
    return [c for c in df.columns if "." in c and c not in GROUP and c != "run_dir"]


def group_keys(df: pd.DataFrame) -> list[str]:
    return [k for k in GROUP if k in df] + swept_keys(df)


def curve_label(values: dict[str, Any], swept: Sequence[str]) -> str:
    """``attack / defense`` as users name them ("PGD / no defense"), the mode where some cell ran targeted,
    and the swept values that tell the curve apart (``attack.steps=10``)."""
    extra = ", ".join(([str(values["mode"])] if "mode" in values else []) + [f"{k}={fmt_number(values[k])}" for k in swept])
    base = " / ".join(plotstyle.words(values[k]) for k in ("attack", "defense") if values.get(k, "") != "")
    return f"{base} ({extra})" if extra else base


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds with a 95% t-interval half-width per (dataset, model, defense, attack, norm, eps)."""
    if df.empty:
        return pd.DataFrame()
    from scipy import stats
    keys = group_keys(df)
    vals = [v for v in VALUES if v in df]
    out = []
    for key, g in df.groupby(keys, dropna=False, sort=True):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["n_seeds"] = int(g["seed"].nunique()) if "seed" in g else len(g)
        for v in vals:
            x = pd.to_numeric(g[v], errors="coerce").dropna().to_numpy()
            row[v] = float(x.mean()) if x.size else float("nan")
            if x.size > 1:
                row[v + "_ci95"] = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
            else:
                row[v + "_ci95"] = float("nan")
        out.append(row)
    return pd.DataFrame(out)


def _plot_robust_vs_eps(df: pd.DataFrame, summ: pd.DataFrame, groups: Callable, colour: dict[str, str],
                        path: Path) -> Path:
    """Robust accuracy vs epsilon, one panel per norm. Fixed-epsilon cells are points joined per curve (mean
    over seeds; the 95% CI as a bar where 2+ seeds ran); a minimization attack run without epsilon (TR, CW,
    DeepFool) is scored at every epsilon, so each of its runs' robust_accuracy_curve.csv is a step line."""
    norms = sorted(summ["norm"].dropna().astype(str).unique()) or ["?"]
    with plotstyle.style() as plt:
        fig, axes = plt.subplots(1, len(norms), figsize=(5.0 * len(norms), 3.8), squeeze=False)
        for ax, norm in zip(axes[0], norms):
            part = summ[summ["norm"].astype(str) == norm]
            for name, g in groups(part[part["eps"].notna()]):
                g = g.sort_values("eps")
                ax.plot(g["eps"], g["robust_accuracy"], marker="o", ms=4, color=colour[name], label=name)
                plotstyle.seed_errorbars(ax, g["eps"], g["robust_accuracy"], g["robust_accuracy_ci95"], g["n_seeds"],
                                         colour[name])
            free = df[(df["norm"].astype(str) == norm) & df["eps"].isna()] if "run_dir" in df else df.iloc[:0]
            for name, g in groups(free):
                label = f"{name} (minimal norm)"
                for run_dir in g["run_dir"]:
                    curve_file = Path(run_dir) / "robust_accuracy_curve.csv"
                    if not curve_file.is_file():
                        continue
                    c = pd.read_csv(curve_file)
                    ax.plot(c["eps"], c["robust_accuracy"], drawstyle="steps-post", lw=1.4, color=colour[name],
                            label=label)
                    label = None     # one legend entry per curve, however many seeds
            ax.set_xlabel(f"Epsilon ({plotstyle.words(norm)})")
            ax.set_ylabel(plotstyle.words("robust_accuracy"))
            ax.set_ylim(-0.02, 1.02)
            plotstyle.legend(ax)
        return plotstyle.save(fig, path)


def _plot_scatter(summ: pd.DataFrame, groups: Callable, colour: dict[str, str], x: str, y: str, path: Path,
                  xscale: str = "linear") -> Path:
    """``y`` against ``x``, one colour per curve (attack / defense / swept settings); 95% CI bars where 2+
    seeds ran."""
    with plotstyle.style() as plt:
        fig, ax = plt.subplots(figsize=(5.6, 4.0))
        for name, g in groups(summ):
            ax.scatter(g[x], g[y], label=name, s=28, color=colour[name], zorder=3)
            plotstyle.seed_errorbars(ax, g[x], g[y], g[f"{y}_ci95"], g["n_seeds"], colour[name],
                                     xerr=g[f"{x}_ci95"])
        ax.set_xscale(xscale)
        ax.set_xlabel(plotstyle.words(x))
        ax.set_ylabel(plotstyle.words(y))
        plotstyle.legend(ax)
        return plotstyle.save(fig, path)


def _plot_seed_spread(df: pd.DataFrame, summ: pd.DataFrame, swept: list[str], path: Path) -> Path:
    """Per cell: the robust accuracy of every seed (dots) and their mean with its 95% CI (where 2+ seeds)."""
    labels = [curve_label(r, swept) + (f", eps {fmt_number(r['eps'])}" if fmt_number(r["eps"]) else ", minimal norm")
              for r in summ.to_dict("records")]
    with plotstyle.style() as plt:
        fig, ax = plt.subplots(figsize=(max(5.6, 0.45 * len(summ) + 2.5), 4.4))
        xs = np.arange(len(summ))
        c_mean, c_seed = plotstyle.colors(2)
        if "seed" in df:
            # keyed through fmt_number so a missing epsilon (NaN) matches itself (astype(str) keeps NaN)
            keys = ["attack", "defense", *(["mode"] if "mode" in summ else []), "norm", "eps", *swept]
            pos = {tuple(fmt_number(r[k]) for k in keys): i for i, r in enumerate(summ.to_dict("records"))}
            px = [pos.get(tuple(fmt_number(r[k]) for k in keys), np.nan) for r in df.to_dict("records")]
            ax.scatter(px, df["robust_accuracy"], s=16, alpha=0.6, color=c_seed, label="Each seed", zorder=2)
        ax.plot(xs, summ["robust_accuracy"], "D", ms=6, color=c_mean, label="Mean over seeds", zorder=3)
        plotstyle.seed_errorbars(ax, xs, summ["robust_accuracy"], summ["robust_accuracy_ci95"], summ["n_seeds"],
                                 c_mean, zorder=3)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=60, ha="right")
        ax.set_xlim(-0.6, len(summ) - 0.4)
        ax.set_ylabel(plotstyle.words("robust_accuracy"))
        ax.set_title("Spread over seeds (bars: 95% CI where 2+ seeds ran)")
        plotstyle.legend(ax)
        return plotstyle.save(fig, path)


def _plots(df: pd.DataFrame, summ: pd.DataFrame, out: Path) -> list[Path]:
    swept = swept_keys(summ)
    curve = ["attack", "defense", *(["mode"] if "mode" in summ else []), *swept]

    def groups(frame: pd.DataFrame):
        for key, g in frame.groupby(curve, dropna=False):
            yield curve_label(dict(zip(curve, key)), swept), g

    names = list(dict.fromkeys([n for n, _ in groups(summ)]))
    colour = dict(zip(names, plotstyle.colors(len(names))))     # one colour per curve in every figure
    attack_names = list(dict.fromkeys(plotstyle.words(a) for a in summ["attack"]))
    return [_plot_robust_vs_eps(df, summ, groups, colour, out / "robust_vs_eps.png"),
            _plot_scatter(summ, groups, colour, "clean_accuracy", "robust_accuracy", out / "clean_vs_robust.png"),
            _plot_scatter(summ, lambda f: ((plotstyle.words(a), g) for a, g in f.groupby("attack")),
                          dict(zip(attack_names, plotstyle.colors(len(attack_names)))), "grad_evals_per_example",
                          "median_l2", out / "cost_vs_size.png", xscale="symlog"),
            _plot_seed_spread(df, summ, swept, out / "seed_spread.png")]


CAPTION = ("Mean over seeds per setting; ± the half-width of the 95% t-interval over seeds where two or more "
           "ran (one seed: the value alone). comparison_summary.csv holds both columns.")


def aggregate(dirs: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Path]:
    """Write the comparison files for ``dirs`` into ``out`` (default: the first directory)."""
    df, failed = collect(dirs)          # raises for a missing directory before anything is written
    out = Path(out if out is not None else dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    cols = [c for c in group_keys(df) + ["seed"] + VALUES + ["run_dir"] if c in df]
    cells = df[cols].sort_values([c for c in group_keys(df) + ["seed"] if c in df]) if len(df) else df
    atomic_write_text(out / "comparison.csv", cells.to_csv(index=False))
    written["csv"] = out / "comparison.csv"
    summ = summarize(cells)
    atomic_write_text(out / "comparison_summary.csv", summ.to_csv(index=False))
    show = tables.with_intervals(summ) if len(summ) else summ
    md = ["# Comparison", "", f"{len(cells)} finished cells, {len(failed)} failed, from: "
          + ", ".join(str(d) for d in dirs), "", tables.markdown(show, CAPTION) if len(show) else "(no finished cells)"]
    if len(failed):
        md += ["## Failed cells", "", tables.markdown(failed, "Cells that failed, with their error and overrides.")]
    atomic_write_text(out / "comparison.md", "\n".join(md))
    atomic_write_text(out / "comparison.tex", tables.latex(show, CAPTION, label="tab:comparison") if len(show) else "")
    written.update(md=out / "comparison.md", tex=out / "comparison.tex", summary=out / "comparison_summary.csv")
    if len(summ):
        for p in _plots(cells, summ, out):
            written[p.stem] = p
    log.info("comparison of %d cells (%d failed) written to %s", len(cells), len(failed), out)
    return written


def table_cli(write: Callable[..., dict[str, Any]], argv: Sequence[str] | None, description: str, prog: str | None = None) -> int:
    """The command line of a table writer ``write(dirs, out) -> {"md": path, ...}``: directories, ``--out``;
    exit 2 with a message for a missing directory. Used by this module and the studies' summaries."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("dirs", nargs="+", help="run or sweep directories")
    ap.add_argument("--out", default=None, help="output folder (default: the first directory)")
    a = ap.parse_args(argv)
    try:
        w = write(a.dirs, a.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {w['md']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return table_cli(aggregate, argv, __doc__.split("\n")[0], prog="python -m robustbench_lab.app.report")


if __name__ == "__main__":
    raise SystemExit(main())
