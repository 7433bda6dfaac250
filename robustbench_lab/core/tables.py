"""Markdown and LaTeX tables through pandas' ``Styler``: one writer for every report's tables.

A cell holding a ``MeanCI`` prints as "mean ± half-width" (the half-width to two significant digits and the
mean to the same decimal place; the mean alone where the half-width is unknown, e.g. one seed). Names are
escaped for the target (``|`` and ``*`` in Markdown; ``_ & % $ # { } ~ ^ \\`` in LaTeX, by ``Styler``),
numeric columns are right-aligned, and every table carries a caption. Column headers are the words of
``plotstyle.words`` unless the caller passes its own.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from robustbench_lab.core.plotstyle import fmt_number, words

LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$"}
NUMBER = re.compile(r"^\s*[-+]?(\d|\.\d|inf\b|nan\b|n/a\b)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class MeanCI:
    """A mean and the half-width of its interval (NaN: unknown, e.g. one seed)."""

    mean: float
    half: float = math.nan

    def text(self, pm: str, digits: int = 4, spec: str | None = None) -> str:
        """"mean ± half" (``pm`` the separator); the mean alone, to ``digits`` significant digits or by the
        format ``spec``, when the half-width is unknown."""
        if self.mean is None or not np.isfinite(self.mean):
            return fmt_number(self.mean, digits)
        if self.half is None or not np.isfinite(self.half):
            return format(self.mean, spec) if spec else fmt_number(self.mean, digits)
        if self.half <= 1e-9 * max(1.0, abs(self.mean)):   # seeds that agree (up to float noise in the sd)
            return f"{fmt_number(self.mean, digits)}{pm}0"
        places = max(0, 1 - math.floor(math.log10(self.half)))     # two significant digits of the half-width
        return f"{self.mean:.{places}f}{pm}{self.half:.{places}f}"


def with_intervals(df: pd.DataFrame, suffix: str = "_ci95", half: Callable[[pd.Series, pd.Series], Any] | None = None,
                   n: str | None = None) -> pd.DataFrame:
    """``df`` with every column ``c`` that has a partner ``c + suffix`` turned into ``MeanCI(c, partner)``
    cells and the partner dropped. ``half(partner, n_column)`` converts the partner first (e.g. an sd into a
    95% t-interval half-width; ``n`` names the column of counts it needs)."""
    out = df.copy()
    for c in [c for c in df.columns if not str(c).endswith(suffix) and f"{c}{suffix}" in df.columns]:
        h = df[f"{c}{suffix}"]
        if half is not None:
            h = half(h, df[n] if n else None)
        out[c] = [MeanCI(float(m) if m is not None else math.nan, float(e) if e is not None else math.nan)
                  for m, e in zip(pd.to_numeric(df[c], errors="coerce"), pd.to_numeric(h, errors="coerce"))]
        out = out.drop(columns=f"{c}{suffix}")
    return out


def t_half_width(sd: pd.Series, n: pd.Series) -> pd.Series:
    """The 95% t-interval half-width t(0.975, n - 1) sd / sqrt(n) of a mean of ``n`` values (NaN for n < 2)."""
    from scipy import stats
    n = pd.to_numeric(n, errors="coerce").astype(float)
    t = pd.Series([stats.t.ppf(0.975, k - 1) if k >= 2 else math.nan for k in n], index=sd.index)
    return pd.to_numeric(sd, errors="coerce") * t / np.sqrt(n)


def _numeric(col: pd.Series) -> bool:
    vals = [v for v in col if v is not None and not (isinstance(v, float) and math.isnan(v)) and v != ""]
    return bool(vals) and all(
        isinstance(v, MeanCI) or (isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_)))
        or (isinstance(v, str) and NUMBER.match(v)) for v in vals)


def _escape_markdown(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("\n", " ")


def _styler(df: pd.DataFrame, target: str, headers: Sequence[str] | None, digits: int | Mapping[str, int],
            formats: Mapping[str, str] | None = None) -> Any:
    """A ``Styler`` of ``df`` for ``target`` ("markdown" or "latex"): cells formatted and escaped, headers in
    words, index hidden. ``digits``: significant digits (one for all or per column); ``formats``: a format
    spec per column (".3f") that overrides them for numbers."""
    shown = df.copy()
    shown.columns = list(headers) if headers is not None else [words(c) for c in df.columns]
    pm = r" $\pm$ " if target == "latex" else " ± "
    esc = "latex" if target == "latex" else None

    def cell(col: str) -> Callable[[Any], str]:
        d = digits.get(col, 4) if isinstance(digits, Mapping) else digits
        spec = (formats or {}).get(col)

        def f(v: Any) -> str:
            if isinstance(v, MeanCI):
                return v.text(pm, d, spec)
            if isinstance(v, str):
                return v if target == "latex" else _escape_markdown(v)   # LaTeX: Styler escaped it already
            if spec and fmt_number(v) not in ("", "inf", "-inf") and not isinstance(v, (bool, np.bool_)):
                return format(float(v), spec)
            return fmt_number(v, d)
        return f

    st = shown.style.hide(axis="index")
    for orig, col in zip(df.columns, shown.columns):
        st = st.format(cell(orig), subset=[col], escape=esc)
    st = st.format_index(escape=esc, axis=1) if esc else st.format_index(_escape_markdown, axis=1)
    return st


def markdown(df: pd.DataFrame, caption: str, headers: Sequence[str] | None = None,
             digits: int | Mapping[str, int] = 4, formats: Mapping[str, str] | None = None) -> str:
    """A GitHub/pandoc Markdown table of ``df`` with ``Table: caption`` above it; numeric columns
    right-aligned. An empty frame gives the caption and "(no rows)"."""
    if df.empty:
        return f"Table: {caption}\n\n(no rows)\n"
    st = _styler(df, "markdown", headers, digits, formats)
    lines = st.to_string(delimiter=" | ").rstrip("\n").split("\n")
    align = ["---:" if _numeric(df[c]) else "---" for c in df.columns]
    rows = ["| " + ln + " |" for ln in lines]
    return "\n".join([f"Table: {caption}", "", rows[0], "|" + "|".join(align) + "|", *rows[1:]]) + "\n"


def latex(df: pd.DataFrame, caption: str, label: str | None = None, headers: Sequence[str] | None = None,
          digits: int | Mapping[str, int] = 4, formats: Mapping[str, str] | None = None) -> str:
    """A booktabs LaTeX table (``table`` float with ``\\caption``) of ``df``; numeric columns right-aligned."""
    if df.empty:
        return ""
    st = _styler(df, "latex", headers, digits, formats)
    cap = re.sub(r"[\\&%$#_{}~^±]", lambda m: LATEX_SPECIAL[m.group()], caption)
    return st.set_caption(cap).to_latex(
        column_format="".join("r" if _numeric(df[c]) else "l" for c in df.columns), hrules=True,
        position_float="centering", label=label)
