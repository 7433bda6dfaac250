"""The analyses' figures, drawn from their tables and spectra (no model needed), in the project's style
(``robustbench_lab.core.plotstyle``). Each analysis computes, then calls its function here."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from robustbench_lab.core import plotstyle
from robustbench_lab.core.plotstyle import wrap
from robustbench_lab.linearization.spectra import Spectrum

BLUE, VERMILLION, GREEN, PURPLE, ORANGE, SKY, BLACK = plotstyle.PALETTE[:7]


@dataclasses.dataclass(frozen=True)
class Caption:
    """What every figure of a run says about it: the run's label (model, data) and its block type."""

    label: str
    block_type: str


def images(n: int) -> str:
    return f"{n} image" + ("" if n == 1 else "s")


def boundary_text(b: str) -> str:
    return {"pre": "boundary pre (lambda*S(x) + F(x), before the post-addition ReLU)",
            "post": "boundary post (after the post-addition ReLU)"}[b]


def stage_lines(ax: Any, xs: Iterable[float]) -> None:
    for x in xs:
        ax.axvline(x, color="0.5", ls="--", lw=0.8)


def plot_energy(path: Path, agg: pd.DataFrame, boundaries: Sequence[str], k: int, cap: Caption,
                stage_starts: Sequence[float], n_images: int) -> Path:
    """Per boundary: the mean share of each perturbation's energy in the top-``k`` right singular subspace
    of every unit (``agg``: columns unit, boundary, <kind>_mean, <kind>_std, chance), sd over images as bars
    when there are 2+ images, and k / n for a random direction."""
    with plotstyle.style() as plt:
        width = max(6.4, 0.3 * len(agg) / max(len(boundaries), 1) + 2.4)
        fig, axes = plt.subplots(len(boundaries), 1, figsize=(width, 3.6 * len(boundaries)), squeeze=False)
        for ax, b in zip(axes[:, 0], boundaries):
            sub = agg[agg["boundary"] == b]
            xs = np.arange(len(sub))
            for kind, color in (("random", BLUE), ("adversarial", VERMILLION)):
                if f"{kind}_mean" in sub:
                    ax.plot(xs, sub[f"{kind}_mean"], "o-", color=color, ms=4, lw=1.2,
                            label=f"{kind.capitalize()} perturbation (mean over images)")
                    plotstyle.seed_errorbars(ax, xs, sub[f"{kind}_mean"], sub[f"{kind}_std"], n_images, color)
            ax.plot(xs, sub["chance"], ":", color=BLACK, lw=1.2, label="k / n (a random direction's share)")
            ax.set_yscale("log")
            stage_lines(ax, stage_starts)
            ax.set_xticks(xs)
            ax.set_xticklabels(sub["unit"], rotation=90)
            ax.set_ylabel(f"Energy in the top-{k} subspace")
            ax.set_title(wrap(f"{cap.label}: share of the perturbation (at each unit's input) in the span of the "
                              f"unit's top-{k} right singular vectors; {cap.block_type}, boundary {b}; bars: sd "
                              "over images", width, 10))
        plotstyle.legend(axes[0, 0], over=list(axes[1:, 0]))     # the panels share their entries
        return plotstyle.save(fig, path)


def plot_propagation(path: Path, df: pd.DataFrame, names: Sequence[str], stage_starts: Sequence[float],
                     cap: Caption) -> Path:
    """How far random and adversarial perturbations of equal L2 norm move every state (``df``: one row per
    image x kind x state with diff_l2 and gain): the mean over images, a band from min to max."""
    with plotstyle.style() as plt:
        fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.28 * len(names) + 2.4), 7.0), sharex=True)
        for kind, color in (("random", BLUE), ("adversarial", VERMILLION)):
            sub = df[df["kind"] == kind]
            for ax, col in zip(axes, ("diff_l2", "gain")):
                g = sub.groupby("state_index")[col]
                mean, lo, hi = g.mean(), g.min(), g.max()
                ax.plot(mean.index, mean.to_numpy(), "o-", color=color, ms=4, lw=1.2,
                        label=f"{kind.capitalize()} perturbation (mean; band: min to max over images)")
                ax.fill_between(mean.index, lo.to_numpy(), hi.to_numpy(), color=color, alpha=0.2)
        for ax in axes:
            stage_lines(ax, stage_starts)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("||h_k(x+d) - h_k(x)||_2")
        axes[1].set_ylabel("Gain ||dh_k|| / ||dh_{k-1}||")
        axes[1].axhline(1.0, color=BLACK, lw=0.6)
        plotstyle.legend(axes[0])
        axes[1].set_xticks(range(len(names)))
        axes[1].set_xticklabels(names, rotation=90)
        axes[0].set_title(wrap(f"{cap.label}: random vs adversarial d of equal L2 norm, {df['image'].nunique()} "
                               f"images; {cap.block_type}, states h_k = unit outputs after the post-addition ReLU",
                               fig.get_figwidth(), 10))
        return plotstyle.save(fig, path)


def plot_stage_spectra(path: Path, pooled: dict[tuple[str, int], list[Spectrum]], boundaries: Sequence[str],
                       stages: Sequence[int], cap: Caption, k: int, which: str, n_images: int) -> Path:
    """Per boundary, the singular values of every whole stage's Jacobian (``pooled[(boundary, stage)]``,
    0-based stages), jittered around the stage; complete spectra and Lanczos ends in two colours."""
    with plotstyle.style() as plt:
        fig, axes = plt.subplots(1, len(boundaries), figsize=(4.6 * len(boundaries), 3.8), squeeze=False)
        for ax, b in zip(axes[0], boundaries):
            seen: set[bool] = set()
            for s in stages:
                v = np.concatenate([sp.values for sp in pooled[(b, s)]])
                complete = all(sp.complete for sp in pooled[(b, s)])
                label = None if complete in seen else ("complete spectrum" if complete else
                                                       f"Lanczos top/bottom-{k} (which={which})")
                seen.add(complete)
                ax.plot(np.full(v.size, s) + np.random.default_rng(s).uniform(-0.12, 0.12, v.size), v, ".",
                        color=BLUE if complete else ORANGE, ms=4, label=label)
            ax.axhline(1.0, color=BLACK, lw=0.6)
            ax.set_yscale("symlog", linthresh=1e-2)
            ax.set_ylim(bottom=0)                      # singular values: no negative half of the symlog axis
            ax.set_xticks(list(stages))
            ax.set_xticklabels([f"stage {s + 1}\n({pooled[(b, s)][0].n_in}->{pooled[(b, s)][0].n_out})"
                                for s in stages])
            ax.set_ylabel("Singular value")
            ax.set_title(f"{cap.block_type}, boundary {b}")
        plotstyle.legend(axes[0, -1], over=list(axes[0, :-1]))   # one legend for the panels
        fig.suptitle(wrap(f"{cap.label}: stage Jacobians over {images(n_images)}", fig.get_figwidth(), 10))
        return plotstyle.save(fig, path)


def plot_scale_sweep(path: Path, curves: dict[tuple[str, str, float, float], list[Spectrum]],
                     settings: Sequence[tuple[str, float, float]], boundaries: Sequence[str], unit: str,
                     block_name: str, cap: Caption, n_images: int) -> Path:
    """Per boundary, the spectrum of ``unit`` for every skip scale lambda (left) and every residual-weight
    scale (right): the mean over images of a complete spectrum as a line, the ends of a partial one as dots."""
    with plotstyle.style() as plt:
        fig, axes = plt.subplots(len(boundaries), 2, figsize=(10.0, 3.9 * len(boundaries)), squeeze=False)
        for row, b in zip(axes, boundaries):
            for ax, kind in zip(row, ("skip", "weight")):
                mine = [s for s in settings if s[0] == kind]
                for colour, (kk, lam, c) in zip(plotstyle.colors(len(mine)), mine):
                    specs = curves[(b, kk, lam, c)]
                    lab = f"lambda = {lam:g}" if kind == "skip" else f"weights x {c:g}"
                    if all(s.complete for s in specs):
                        m = min(s.values.size for s in specs)
                        mean = np.mean([s.values[:m] for s in specs], axis=0)
                        ax.plot(np.arange(m) / m, mean, color=colour, lw=1.4, label=lab)
                    else:
                        for s in specs:
                            idx = np.concatenate([np.arange(s.top.size), s.n - s.bottom.size + np.arange(s.bottom.size)])
                            ax.plot(idx / s.n, s.values, ".", color=colour, ms=4, label=lab if s is specs[0] else None)
                ax.set_xlabel("i / n (singular values, descending)")
                ax.set_ylabel("Singular value")
                ax.set_yscale("symlog", linthresh=1e-2)
                ax.set_ylim(bottom=0)
                if b == boundaries[0]:   # every row has the same entries as the first
                    plotstyle.legend(ax)
                ax.set_title(wrap(f"{unit} ({block_name}), boundary {b}: " + (
                    "skip scale lambda (weights x 1)" if kind == "skip" else "residual weights x c (lambda 1)"),
                    fig.get_figwidth() / 2, 10))
        fig.suptitle(wrap(f"{cap.label}: spectra of unit {unit} under scaling, mean over {images(n_images)}",
                          fig.get_figwidth(), 10))
        return plotstyle.save(fig, path)


def _bars(ax: Any, i: float, v: np.ndarray, colour: str) -> None:
    """Quantile bars of ``v`` at x = ``i``: whiskers min-max, bars 5-95% and 25-75%, an open dot at the median."""
    q = np.quantile(v, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    ax.vlines(i, q[0], q[6], color=colour, lw=0.8)
    ax.vlines(i, q[1], q[5], color=colour, lw=3, alpha=0.45)
    ax.vlines(i, q[2], q[4], color=colour, lw=6)
    ax.plot(i, q[3], "o", color="white", mec=colour, ms=4)


def plot_unit_bands(path: Path, b: str, df: pd.DataFrame, pooled: dict[tuple[str, str], list[Spectrum]],
                    explicit: dict[tuple[str, str], list[Spectrum]], names: Sequence[str],
                    stage_starts: Sequence[float], tol: float, cap: Caption, n_images: int, explicit_images: int,
                    k: int, which: str) -> Path:
    """Per unit (``names``, the rows of ``df`` in order): quantile bars of the complete spectra, or the known
    Lanczos ends plus, for explicit units, their complete spectra on fewer images. Right axis: the fraction
    within ``tol`` of 1 where it is known, and its bounds where only the ends are known (shaded). A partial
    spectrum has no point: the fraction is unknown."""
    from matplotlib.lines import Line2D
    with plotstyle.style() as plt:
        fig, ax = plt.subplots(figsize=(max(6.4, 0.34 * len(names) + 2.4), 4.6))
        ex_x, ex_frac, kinds = [], [], set()
        for i, name in enumerate(names):
            specs = pooled[(b, name)]
            v = np.concatenate([s.values for s in specs])
            if all(s.complete for s in specs):
                _bars(ax, i, v, BLUE)
                kinds.add("complete")
                continue
            ex = explicit.get((b, name))
            if ex and all(s.complete for s in ex):
                _bars(ax, i, np.concatenate([s.values for s in ex]), SKY)
                ex_x.append(i)
                ex_frac.append(float(np.mean([np.mean(np.abs(s.values - 1.0) <= tol) for s in ex])))
                kinds.add("explicit")
            if v.size:   # partial: the k largest and k smallest values only
                ax.vlines(i, v.min(), v.max(), color=ORANGE, lw=0.8)
                ax.plot(np.full(v.size, i), v, "_", color=ORANGE, ms=6)
                kinds.add("partial")
        for kind, colour, text in (("complete", BLUE, f"complete spectra, {images(n_images)}"),
                                   ("explicit", SKY, f"explicit units' complete spectra, {images(explicit_images)}"),
                                   ("partial", ORANGE, f"Lanczos top/bottom-{k} (which={which})")):
            if kind in kinds:     # a legend entry for the bars (they are line collections, unlabelled)
                ax.add_line(Line2D([], [], color=colour, lw=6, label=text))
        ax.axhline(1.0, color=BLACK, lw=0.6)
        stage_lines(ax, stage_starts)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90)
        ax.set_ylabel("Singular value")
        ax2 = ax.twinx()
        ax2.grid(False)
        xs = np.arange(len(names))
        frac = df["frac_one"].to_numpy(dtype=float)                 # NaN for partial spectra: drawn as gaps
        frac_lo, frac_hi = df["frac_one_lo"].to_numpy(dtype=float), df["frac_one_hi"].to_numpy(dtype=float)
        partial = np.isnan(frac)
        ax2.plot(xs, frac, "s-", color=VERMILLION, ms=4, lw=0.8, label=f"fraction within {tol:g} of 1")
        if partial.any():
            ax2.fill_between(xs, np.where(partial, frac_lo, np.nan), np.where(partial, frac_hi, np.nan),
                             color=PURPLE, alpha=0.25, label="its bounds (partial spectra)")
        if ex_x:
            ax2.plot(ex_x, ex_frac, "s", mfc="none", color=BLACK, ms=6,
                     label=f"fraction, explicit units ({images(explicit_images)})")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel(f"Fraction within {tol:g} of 1", color=VERMILLION)
        plotstyle.legend(ax2, over=[ax])
        ax.set_title(wrap(f"{cap.label}: unit singular values; {cap.block_type}, {boundary_text(b)}; bars: "
                          "whiskers min-max, 5-95% and 25-75%, dot median", fig.get_figwidth(), 10))
        return plotstyle.save(fig, path)


def plot_histograms(path: Path, b: str, chosen: dict[str, list[Spectrum]], tol: float, cap: Caption) -> Path:
    """Histograms of complete spectra (pooled over images), one panel per unit of ``chosen``; the band
    within ``tol`` of 1 shaded."""
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    with plotstyle.style() as plt:
        fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols, 3.1 * rows), squeeze=False)
        for ax, (name, specs) in zip(axes.flat, chosen.items()):
            v = np.concatenate([s.values for s in specs])
            frac = float(np.mean(np.abs(v - 1) <= tol))
            ax.hist(v, bins=80, color=BLUE)
            ax.axvspan(1 - tol, 1 + tol, color=VERMILLION, alpha=0.3)
            ax.set_yscale("log")
            ax.set_title(wrap(f"{name} (n={specs[0].n}, {len(specs)} img, {specs[0].method}): {100 * frac:.1f}% "
                              f"within {tol:g} of 1", 3.9, 9), fontsize=plotstyle.MIN_FONT_PT)
            ax.set_xlabel("Singular value")
            ax.set_ylabel("Count")
        for ax in list(axes.flat)[len(chosen):]:
            ax.axis("off")
        fig.suptitle(wrap(f"{cap.label}: histograms of complete spectra (pooled over images); {cap.block_type}, "
                          f"{boundary_text(b)}", fig.get_figwidth(), 10))
        return plotstyle.save(fig, path)
