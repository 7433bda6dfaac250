"""Figure helpers shared by the analyses' plots."""

from __future__ import annotations

import textwrap
from typing import Any, Iterable


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, chosen when the first plot is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def wrap(text: str, width_in: float, fontsize: float = 7) -> str:
    """``text`` wrapped to a figure ``width_in`` inches wide (long titles carry block type and boundary)."""
    return "\n".join(textwrap.fill(part, width=max(30, int(width_in * 110 / fontsize)))
                     for part in text.split("\n"))


def boundary_text(b: str) -> str:
    return {"pre": "boundary pre (lambda*S(x) + F(x), before the post-addition ReLU)",
            "post": "boundary post (after the post-addition ReLU)"}[b]


def stage_lines(ax: Any, xs: Iterable[float]) -> None:
    for x in xs:
        ax.axvline(x, color="0.5", ls="--", lw=0.8)
