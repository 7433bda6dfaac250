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

from robustbench_lab.core.cache import atomic_write_text
from robustbench_lab.core.results import METRICS_FILE

log = logging.getLogger(__name__)

GROUP = ["dataset", "model", "defense", "attack", "norm", "eps"]
# settings already in GROUP under another name, or that never tell cells apart (the seed: intervals are over it)
NOT_SWEPT = {"data.name", "model.name", "defense.name", "attack.name", "attack.norm", "attack.eps", "seed",
             "attacks"}
NOT_SWEPT_SUFFIXES = ("._target_",)   # the class follows from the attack or defense name
VALUES = ["clean_accuracy", "robust_accuracy", "attack_success_rate", "median_l2", "median_linf",
          "mean_rel_l2", "grad_evals_per_example", "attack_seconds", "seconds"]


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
    """``attack / defense`` and the swept values that tell the curve apart (``attack.steps=10``)."""
    extra = ", ".join(f"{k}={_fmt(values[k])}" for k in swept)
    base = " / ".join(str(values[k]) for k in ("attack", "defense") if k in values)
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


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_latex(df: pd.DataFrame) -> str:
    esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")  # noqa: E731
    cols = list(df.columns)
    lines = [r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule",
             " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
    for _, r in df.iterrows():
        lines.append(" & ".join(esc(_fmt(r[c])) for c in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _scatter_figure(fig: Any, ax: Any, xlabel: str, ylabel: str, path: Path) -> Path:
    """Label, grid, legend and save a scatter figure; returns its path."""
    import matplotlib.pyplot as plt
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plots(df: pd.DataFrame, summ: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # robust accuracy vs epsilon per attack x defense, one panel per norm. Fixed-epsilon cells are points
    # (mean over seeds, 95% CI); a minimization attack run without epsilon (TR, CW, DeepFool) is scored at
    # every epsilon, so its run's robust_accuracy_curve.csv is drawn as a line (one per seed).
    swept = swept_keys(summ)
    curve = ["attack", "defense", *swept]

    def groups(frame: pd.DataFrame):
        for key, g in frame.groupby(curve, dropna=False):
            yield curve_label(dict(zip(curve, key)), swept), g

    norms = sorted(summ["norm"].dropna().astype(str).unique()) or ["?"]
    fig, axes = plt.subplots(1, len(norms), figsize=(5.5 * len(norms), 3.8), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        part = summ[summ["norm"].astype(str) == norm]
        fixed = part[part["eps"].notna()]
        for name, g in groups(fixed):
            g = g.sort_values("eps")
            ax.errorbar(g["eps"], g["robust_accuracy"], yerr=g["robust_accuracy_ci95"].fillna(0), marker="o",
                        ms=3, capsize=2, label=name)
        free = df[(df["norm"].astype(str) == norm) & df["eps"].isna()] if "run_dir" in df else df.iloc[:0]
        for name, g in groups(free):
            label = f"{name} (min. norm)"
            for run_dir in g["run_dir"]:
                curve_file = Path(run_dir) / "robust_accuracy_curve.csv"
                if not curve_file.is_file():
                    continue
                c = pd.read_csv(curve_file)
                ax.plot(c["eps"], c["robust_accuracy"], drawstyle="steps-post", lw=1.2, label=label)
                label = None
        ax.set_xlabel(f"epsilon ({norm})")
        ax.set_ylabel("robust accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(out / "robust_vs_eps.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)
    # clean vs robust trade-off
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    for name, g in groups(summ):
        ax.scatter(g["clean_accuracy"], g["robust_accuracy"], label=name, s=18)
    made.append(_scatter_figure(fig, ax, "clean accuracy", "robust accuracy", out / "clean_vs_robust.png"))
    # attack cost vs perturbation size
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    for atk, g in summ.groupby("attack"):
        ax.scatter(g["grad_evals_per_example"], g["median_l2"], label=str(atk), s=18)
    ax.set_xscale("symlog")
    made.append(_scatter_figure(fig, ax, "gradient evaluations per example", "median L2 of successful perturbations",
                                out / "cost_vs_size.png"))
    # per-seed spread
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    labels = [curve_label(r, swept) + f", eps={_fmt(r['eps'])}" for r in summ.to_dict("records")]
    ax.errorbar(range(len(summ)), summ["robust_accuracy"], yerr=summ["robust_accuracy_ci95"].fillna(0), fmt="o",
                capsize=3)
    if "seed" in df:
        # keyed through _fmt so a missing epsilon (NaN) matches itself (pandas' astype(str) keeps NaN)
        keys = ["attack", "defense", "norm", "eps", *swept]
        pos = {tuple(_fmt(r[k]) for k in keys): i for i, r in enumerate(summ.to_dict("records"))}
        xs = [pos.get(tuple(_fmt(r[k]) for k in keys), np.nan) for r in df.to_dict("records")]
        ax.scatter(xs, df["robust_accuracy"], s=8, alpha=0.5, color="gray")
    ax.set_xticks(range(len(summ)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("robust accuracy (mean, 95% CI; dots: seeds)")
    fig.tight_layout()
    made.append(out / "seed_spread.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)
    return made


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
    show = summ[[c for c in summ.columns if not c.endswith("_ci95")]] if len(summ) else summ
    md = ["# Comparison", "", f"{len(cells)} finished cells, {len(failed)} failed, from: "
          + ", ".join(str(d) for d in dirs), "", "Mean over seeds (95% confidence intervals in "
          "comparison_summary.csv).", "", to_markdown(show) if len(show) else "(no finished cells)"]
    if len(failed):
        md += ["", "## Failed cells", "", to_markdown(failed)]
    atomic_write_text(out / "comparison.md", "\n".join(md) + "\n")
    atomic_write_text(out / "comparison.tex", to_latex(show) if len(show) else "")
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
