"""Statistics of spectra for the analyses' tables: the fraction near a value (exact, or bounds for a
partial spectrum), the image-to-image spread, one table row over images; and the Markdown tables of the
summary."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from robustbench_lab.core import tables
from robustbench_lab.core.plotstyle import fmt_number
from robustbench_lab.linearization.spectra import Spectrum, count_near


def spectrum_stats(sp: Spectrum, tol: float, target: float = 1.0) -> dict[str, float]:
    """Fraction of singular values within ``tol`` of ``target`` (exact for a complete spectrum, else bounds),
    min / median / max. A partial spectrum's unknown middle values lie between its k-th largest and k-th
    smallest value (when both ends are known); known exact zeros count against the upper bound."""
    near = (lambda v: count_near(v, target, tol))
    if sp.complete:
        v = sp.top
        frac = near(v) / sp.n
        return {"frac": frac, "frac_lo": frac, "frac_hi": frac, "min": float(v[-1]), "median": float(np.median(v)),
                "max": float(v[0])}
    known = near(sp.top) + near(sp.bottom)
    middle = sp.n - sp.top.size - sp.bottom.size
    middle_in = bool(sp.top.size and sp.bottom.size and sp.bottom[0] >= target - tol and sp.top[-1] <= target + tol)
    hidden_zeros = max(0, sp.n_zero - int(np.sum(sp.bottom == 0))) if abs(target) > tol else 0
    lo = (known + (middle if middle_in else 0)) / sp.n
    hi = (known + max(0, middle - hidden_zeros)) / sp.n
    low = float(sp.bottom[-1]) if sp.bottom.size else (0.0 if sp.n_zero else math.nan)
    return {"frac": math.nan, "frac_lo": lo, "frac_hi": max(lo, hi), "min": low, "median": math.nan,
            "max": float(sp.top[0]) if sp.top.size else math.nan}


def relative_spread(specs: list[Spectrum]) -> tuple[float, float]:
    """Image-to-image spread: std across images of the i-th largest singular value over its mean, averaged
    (and maximized) over i (indices with a mean of ~0, e.g. rows zeroed by a ReLU, are left out)."""
    if len(specs) < 2:
        return math.nan, math.nan
    if all(s.complete for s in specs):
        length = min(s.top.size for s in specs)
        a = np.stack([s.top[:length] for s in specs])
    else:   # partial: the i-th largest with the i-th largest, the i-th smallest with the i-th smallest
        kt = min(s.top.size for s in specs)
        kb = min(s.bottom.size for s in specs)
        a = np.stack([np.concatenate([s.top[:kt], s.bottom[s.bottom.size - kb:]]) for s in specs])
    if a.shape[1] == 0:
        return math.nan, math.nan
    mean = a.mean(0)
    ok = mean > 1e-8 * max(float(mean.max()), 1e-30)
    if not ok.any():
        return math.nan, math.nan
    rel = a.std(0)[ok] / mean[ok]
    return float(rel.mean()), float(rel.max())


def aggregate(specs: list[Spectrum], stats: list[dict[str, float]]) -> dict[str, Any]:
    """One table row over images: sizes, method(s), mean fractions near 1 and their bounds, extremes, the
    top singular value's mean and std, the spread, and the total seconds."""
    sp0 = specs[0]
    spread_mean, spread_max = relative_spread(specs)
    col = (lambda key: np.array([s[key] for s in stats], dtype=np.float64))
    top1 = np.array([s.top[0] if s.top.size else math.nan for s in specs])
    methods = "+".join(sorted({s.method for s in specs}))   # auto may choose per image (lowrank needs 2r < 0.8n)
    return {"n_in": sp0.n_in, "n_out": sp0.n_out, "n": sp0.n, "method": methods,
            "complete": all(s.complete for s in specs), "n_images": len(specs),
            "frac_one": float(col("frac").mean()), "frac_one_lo": float(col("frac_lo").mean()),
            "frac_one_hi": float(col("frac_hi").mean()), "frac_one_img_min": float(col("frac_lo").min()),
            "sigma_min": float(col("min").mean()), "sigma_median": float(col("median").mean()),
            "sigma_max": float(col("max").max()), "top1": float(top1.mean()), "top1_std": float(top1.std()),
            "spread_rel_mean": spread_mean, "spread_rel_max": spread_max,
            "seconds": float(sum(s.seconds for s in specs))}


def fmt(v: Any) -> str:
    """A number for a table: 4 significant digits, "n/a" for None or NaN."""
    return fmt_number(v) or "n/a"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str) -> list[str]:
    """The lines of a Markdown table (``robustbench_lab.core.tables``: captioned, escaped, numbers
    right-aligned); cells are written as given (format numbers with ``fmt`` first)."""
    df = pd.DataFrame([list(r) for r in rows], columns=range(len(header)))
    return tables.markdown(df, caption, headers=list(header)).rstrip("\n").split("\n")
