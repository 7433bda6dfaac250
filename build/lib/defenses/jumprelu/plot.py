"""The JumpReLU trade-off figure (``jumprelu_tradeoff.png``), drawn from the tuning table."""

from __future__ import annotations

import numpy as np
import pandas as pd


def plot_tradeoff(path, table: pd.DataFrame, max_drop: float) -> None:
    """Two panels against k: accuracies (clean validation accuracy and every robust accuracy measured) and
    median minimal perturbation norms (every minimization attack measured); the chosen k marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm_cols = [c for c in table.columns if "median_min_" in c]
    minimizers = {c.split("median_min_")[0] for c in norm_cols}      # "<label>_" prefixes (and "" unlabelled)
    # robust accuracy of a minimization attack run without eps means "never fooled": not an accuracy at a budget
    acc_cols = [c for c in table.columns if c.endswith("robust_accuracy") and c[:-len("robust_accuracy")] not in minimizers]
    fig, axes = plt.subplots(1, 2 if norm_cols else 1, figsize=(10.4 if norm_cols else 5.2, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot(table["k"], table["val_accuracy"], marker="o", ms=3, color="k", label="clean val accuracy")
    ref = float(table.loc[table["k"] == 0.0, "val_accuracy"].iloc[0])
    ax.axhline(ref - max_drop, color="k", ls=":", lw=1, label=f"k=0 accuracy - {max_drop:g}")
    for i, c in enumerate(acc_cols):
        ax.plot(table["k"], table[c], marker="s", ms=3, color=f"C{i}", label=c)
    chosen = table.loc[table["chosen"], "k"]
    for a in axes[0]:
        if len(chosen):
            a.axvline(float(chosen.iloc[0]), color="grey", ls="--", lw=1)
        a.set_xlabel("jump k (pre-activation units)")
        a.grid(alpha=0.3)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, loc="best")
    ax.set_title("JumpReLU: accuracy vs k" + (f" (chosen k = {float(chosen.iloc[0]):g})" if len(chosen) else ""),
                 fontsize=9)
    if norm_cols:
        ax2 = axes[0, 1]
        for i, c in enumerate(norm_cols):
            ax2.plot(table["k"], table[c].replace([np.inf], np.nan), marker="^", ms=3, color=f"C{i + len(acc_cols)}",
                     label=c)
        ax2.set_ylabel("median minimal perturbation")
        ax2.set_yscale("log")
        ax2.legend(fontsize=6, loc="best")
        ax2.set_title("median minimal norm vs k (larger = apparently more robust;\nnot drawn where < half fooled)",
                      fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
