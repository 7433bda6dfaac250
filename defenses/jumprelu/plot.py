"""The JumpReLU trade-off figure (``jumprelu_tradeoff.png``), drawn from the tuning table.

    python -m defenses.jumprelu.plot <jumprelu_tradeoff.csv> <out.png> [--max-drop 0.01]

redraws it from a saved table (no model needed).
"""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np
import pandas as pd

from robustbench_lab.core import plotstyle

VAL, REF, CHOSEN = "#000000", "#7F7F7F", "#8C564B"   # clean accuracy, its admissible floor, the chosen k
INTERVAL_SUFFIXES = ("_ci_low", "_ci_high", "_n")


def _band(ax, table: pd.DataFrame, col: str, color: str) -> bool:
    """Shade the 95% interval of ``col`` where the table has it (one run's sampling interval, not a spread
    over seeds, so a band rather than error bars); unbounded ends are left open. Returns whether drawn."""
    lo, hi = f"{col}_ci_low", f"{col}_ci_high"
    if lo not in table or hi not in table:
        return False
    low = pd.to_numeric(table[lo], errors="coerce").replace([np.inf, -np.inf], np.nan)
    high = pd.to_numeric(table[hi], errors="coerce").replace([np.inf, -np.inf], np.nan)
    ax.fill_between(table["k"], low, high, color=color, alpha=0.15, lw=0)
    return True


def plot_tradeoff(path, table: pd.DataFrame, max_drop: float) -> None:
    """Two panels against k, one above the other: accuracies (clean validation accuracy and every robust
    accuracy measured) and median minimal perturbation norms (every minimization attack measured); the
    chosen k marked; shaded, the 95% intervals of the table's ``<column>_ci_low``/``_ci_high`` columns
    where it has them. Column names (``pgd_graybox_robust_accuracy``) are shown in words."""
    norm_cols = [c for c in table.columns if "median_min_" in c and not c.endswith(INTERVAL_SUFFIXES)]
    minimizers = {c.split("median_min_")[0] for c in norm_cols}      # "<label>_" prefixes (and "" unlabelled)
    # robust accuracy of a minimization attack run without eps means "never fooled": not an accuracy at a budget
    acc_cols = [c for c in table.columns if c.endswith("robust_accuracy") and c[:-len("robust_accuracy")] not in minimizers]
    curves = [c for c in plotstyle.colors(len(acc_cols) + len(norm_cols) + 3) if c not in (VAL, REF, CHOSEN)]
    chosen = table.loc[table["chosen"].astype(bool), "k"]
    with plotstyle.style() as plt:
        fig, axes = plt.subplots(2 if norm_cols else 1, 1, figsize=(6.4, 7.2 if norm_cols else 3.8), sharex=True,
                                 squeeze=False)
        ax = axes[0, 0]
        ax.plot(table["k"], table["val_accuracy"], marker="o", ms=4, color=VAL, label="Clean validation accuracy")
        ref = float(table.loc[table["k"] == 0.0, "val_accuracy"].iloc[0])
        ax.axhline(ref - max_drop, color=REF, ls=":", lw=1.2, label=f"Clean accuracy at k = 0 minus {max_drop:g}")
        banded = False
        for i, c in enumerate(acc_cols):
            ax.plot(table["k"], table[c], marker="s", ms=4, color=curves[i], label=plotstyle.words(c))
            banded |= _band(ax, table, c, curves[i])
        for a in axes[:, 0]:
            if len(chosen):
                a.axvline(float(chosen.iloc[0]), color=CHOSEN, ls="--", lw=1.2,
                          label=f"Chosen k = {float(chosen.iloc[0]):g}" if a is ax else None)
        axes[-1, 0].set_xlabel("Jump k (pre-activation units)")
        ax.set_ylabel("Accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(plotstyle.wrap("JumpReLU: accuracy against the jump k"
                                    + (" (bands: 95% Wilson intervals)" if banded else ""), 6.4, 10))
        plotstyle.legend(ax)
        if norm_cols:
            ax2 = axes[1, 0]
            for i, c in enumerate(norm_cols):
                ax2.plot(table["k"], table[c].replace([np.inf], np.nan), marker="^", ms=4,
                         color=curves[len(acc_cols) + i], label=plotstyle.words(c))
                _band(ax2, table, c, curves[len(acc_cols) + i])
            ax2.set_ylabel("Median minimal perturbation")
            ax2.set_yscale("log")
            ax2.set_title(plotstyle.wrap("Median minimal norm against k (larger = apparently more robust; not "
                                         "drawn where fewer than half were fooled; bands: 95% order-statistic "
                                         "intervals, open where unbounded)", 6.4, 10))
            plotstyle.legend(ax2)
        plotstyle.save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Redraw jumprelu_tradeoff.png from its table.")
    ap.add_argument("table", help="a jumprelu_tradeoff.csv")
    ap.add_argument("out", help="the figure to write")
    ap.add_argument("--max-drop", type=float, default=0.01, help="defense.max_accuracy_drop of the run")
    a = ap.parse_args(argv)
    plot_tradeoff(a.out, pd.read_csv(a.table), a.max_drop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
