"""The one style of every figure the project draws: font sizes, words for column and method names, a colour
cycle, error bars only where seeds vary, legends that cover no data, and saving.

Every plot is drawn inside ``style()`` and written with ``save(fig, path)``. The rules it keeps (checked by
tests/test_plots.py on every plot kind): text at ``MIN_FONT_PT`` points or more at the saved size, legend
entries in words (``words``), distinct colours for distinct curves (``colors``), no error bar where a
point has one seed (``seed_errorbars``), and a legend moved outside the axes when, at the final layout,
it would cover a line, marker, bar or label (``legend``, ``covers_data``).
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

MIN_FONT_PT = 9.0
DPI = 120
# Okabe & Ito's colour-blind-safe set (yellow last: it is faint on white), then tab10's others
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C564B", "#7F7F7F",
           "#BCBD22", "#F0E442")

# what a column holds, as a reader says it; ``words`` also reads "<method>_<column>" (JumpReLU's table)
COLUMN_WORDS = {
    "clean_accuracy": "Clean accuracy", "robust_accuracy": "Robust accuracy",
    "attack_success_rate": "Attack success rate", "median_l2": "Median L2 of successful perturbations",
    "median_linf": "Median L-inf of successful perturbations", "median_l1": "Median L1 of successful perturbations",
    "mean_rel_l2": "Mean relative L2 perturbation", "grad_evals_per_example": "Gradient evaluations per example",
    "attack_seconds": "Attack time (s)", "seconds": "Run time (s)", "n_seeds": "Seeds", "seed": "Seed",
    "eps": "Epsilon", "norm": "Norm", "dataset": "Dataset", "model": "Model", "defense": "Defense",
    "attack": "Attack", "n_examples": "Points", "val_accuracy": "Clean validation accuracy",
    "zero_grad_fraction": "Zero-gradient share", "median_min_l2": "Median minimal L2",
    "median_min_linf": "Median minimal L-inf", "median_min_l1": "Median minimal L1",
    "smoothness_score": "Smoothness score", "rsa": "RSA", "error": "Error", "overrides": "Overrides",
    "run_dir": "Run directory", "k": "Jump k", "val_robust_accuracy": "Validation robust accuracy",
    # the studies' tables (neural guidance, ACL)
    "arm": "Arm", "role": "Role", "target": "Target", "source_kind": "Source kind", "level": "Level",
    "alpha": "Alpha", "predictor": "Predictor", "weight_decay": "Weight decay", "main_eps": "Main epsilon",
    "main_robust_accuracy": "Main robust accuracy", "n_components": "Components",
    "target_heldout_r": "Target held-out r", "protocol": "Fine-tuning", "selected_epoch": "Selected epoch",
    "pretrain_final_nt_xent": "Final NT-Xent", "pretrain_seconds": "Pre-training (s)",
    "finetune_seconds": "Fine-tuning (s)",
}
# attacks, defenses, norms and their parts, as their users name them
NAME_WORDS = {
    "pgd": "PGD", "fgsm": "FGSM", "cw": "C&W", "cw_linf": "C&W (L-inf)", "deepfool": "DeepFool",
    "trust_region": "Trust region", "tr": "TR", "square": "Square", "autoattack": "AutoAttack", "fmn": "FMN",
    "ddn": "DDN", "pgd_bpda": "PGD + BPDA", "pgd_transfer": "PGD transfer", "bpda": "BPDA", "transfer": "transfer",
    "graybox": "gray-box", "none": "no defense", "jumprelu": "JumpReLU", "adv_training": "adversarial training",
    "trades": "TRADES", "acl": "ACL", "neural_guidance": "neural guidance", "linf": "L-inf", "l2": "L2", "l1": "L1",
    "simclr": "SimCLR", "a2a": "A2A", "a2s": "A2S", "ds": "DS", "aff": "AFF", "alf": "ALF", "slf": "SLF",
}

RC = {"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
      "legend.fontsize": 9, "legend.title_fontsize": 9, "figure.titlesize": 10, "savefig.dpi": DPI,
      "figure.dpi": DPI, "axes.grid": True, "grid.alpha": 0.3, "errorbar.capsize": 3,
      "legend.framealpha": 0.9}

_captures: list[list[tuple[Path, Any]]] = []


def words(name: Any) -> str:
    """A column, attack, defense or norm name in words: ``robust_accuracy`` -> "Robust accuracy",
    ``pgd_graybox_robust_accuracy`` -> "PGD gray-box: robust accuracy", ``trust_region`` -> "Trust region".
    An unknown name keeps its text with underscores read as spaces; config keys (``attack.steps``) stay."""
    s = str(name)
    if s in COLUMN_WORDS:
        return COLUMN_WORDS[s]
    if s in NAME_WORDS:
        return NAME_WORDS[s]
    for col in sorted(COLUMN_WORDS, key=len, reverse=True):
        if s.endswith("_" + col):
            w = COLUMN_WORDS[col]
            return f"{words(s[:-len(col) - 1])}: {w[0].lower()}{w[1:]}"
    return " ".join(NAME_WORDS.get(t, t) for t in s.split("_")) if "_" in s else s


def colors(n: int) -> list[str]:
    """``n`` distinct colours: the palette first, then evenly spaced hues of a wide colour map."""
    if n <= len(PALETTE):
        return list(PALETTE[:n])
    import matplotlib
    extra = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["turbo"](np.linspace(0.05, 0.95, n))]
    out = list(PALETTE)
    out += [c for c in extra if c not in out][: n - len(out)]
    return out


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, chosen when the first plot is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@contextlib.contextmanager
def style() -> Iterator[Any]:
    """The project's fonts, colour cycle and grid for the figures made inside; yields ``pyplot``."""
    plt = pyplot()
    from cycler import cycler
    with plt.rc_context({**RC, "axes.prop_cycle": cycler(color=list(PALETTE))}):
        yield plt


def seed_errorbars(ax: Any, x: Any, y: Any, err: Any, n_seeds: Any, color: Any, xerr: Any = None,
                   **kw: Any) -> bool:
    """Error bars of half-width ``err`` (and ``xerr``, horizontal) at (x, y), only where ``n_seeds`` > 1 and
    the half-width is finite and positive: a point from one seed has no spread to show, so it gets no bar
    (not a bar of zero), and seeds that agree exactly have nothing to draw. ``n_seeds`` is one number or one
    per point. Returns whether any bar was drawn."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = np.broadcast_to(np.asarray(n_seeds, dtype=float), x.shape)
    drawn_any = False
    for e, axis in ((err, "y"), (xerr, "x")):
        if e is None:
            continue
        e = np.asarray(e, dtype=float)
        keep = (n > 1) & np.isfinite(e) & (e > 0) & np.isfinite(x) & np.isfinite(y)
        if keep.any():
            ax.errorbar(x[keep], y[keep], **{f"{axis}err": e[keep]}, fmt="none", ecolor=color, elinewidth=1.2, **kw)
            drawn_any = True
    return drawn_any


def legend(ax: Any, *, over: Sequence[Any] = (), outside: bool = False, **kw: Any) -> Any:
    """A legend at the best place inside ``ax`` with the entries of ``ax`` and of the axes in ``over`` (a twin
    axis, or other panels with the same entries; each label once); ``save`` moves it outside (to the right)
    if at the final layout it covers data of any of them, or always with ``outside``. Returns the legend
    (None if nothing is labelled)."""
    handles, labels = [], []
    for a in (ax, *over):
        for h, lab in zip(*a.get_legend_handles_labels()):
            if lab not in labels:       # panels that share entries list them once
                handles.append(h)
                labels.append(lab)
    if not handles:
        return None
    leg = ax.legend(handles, labels, loc="best", **kw)
    leg._plotstyle_axes = [ax, *over]   # the axes whose data it must not cover
    leg._plotstyle_outside = outside
    return leg


def _paths(a: Any, renderer: Any) -> Iterator[tuple[Any, bool]]:
    """(path in display coordinates, filled) for every drawn line, marker and band of axes ``a``."""
    from matplotlib.collections import LineCollection, PathCollection
    from matplotlib.path import Path as MPath

    def marker(p: np.ndarray, size_pt: float) -> Any:
        r = max(size_pt, 2.0) * renderer.points_to_pixels(1.0) / 2
        return MPath([(p[0] - r, p[1] - r), (p[0] + r, p[1] - r), (p[0] + r, p[1] + r), (p[0] - r, p[1] + r),
                      (p[0] - r, p[1] - r)])

    for line in a.get_lines():
        xy = np.asarray(line.get_xydata(), dtype=float)
        if not line.get_visible() or len(xy) == 0:
            continue
        xy = line.get_transform().transform(xy)
        xy = xy[np.isfinite(xy).all(1)]
        if line.get_marker() not in (None, "None", "", " ", ","):
            for p in xy:
                yield marker(p, line.get_markersize()), True
        if line.get_linestyle() not in ("None", "", " ") and len(xy) > 1:
            if str(line.get_drawstyle()).startswith("steps"):   # the corners of a step curve
                xy = np.repeat(xy, 2, axis=0)[1:]
                xy[1::2, 1] = xy[0:-1:2, 1]
            yield MPath(xy), False
    for c in a.collections:
        if not c.get_visible():
            continue
        if isinstance(c, PathCollection):    # scatter: one marker at every offset
            size = math.sqrt(float(np.max(c.get_sizes(), initial=36.0)))
            for p in c.get_offset_transform().transform(np.asarray(c.get_offsets(), dtype=float)):
                if np.isfinite(p).all():
                    yield marker(p, size), True
        else:                                # error bars, vertical lines (not filled); bands (filled)
            for p in c.get_paths():
                yield c.get_transform().transform_path(p), not isinstance(c, LineCollection)


def covers_data(leg: Any, renderer: Any = None) -> bool:
    """Whether the drawn legend ``leg`` lies over a line, marker, bar, band or text of its axes."""
    renderer = renderer or drawn(leg.figure)
    box = leg.get_window_extent(renderer)
    for a in getattr(leg, "_plotstyle_axes", [leg.axes]):
        for path, filled in _paths(a, renderer):
            if path.intersects_bbox(box, filled=filled):
                return True
        for artist in (*a.patches, *a.texts):
            if artist.get_visible() and artist.get_window_extent(renderer).overlaps(box):
                return True
    return False


def _outside(leg: Any, renderer: Any) -> None:
    """Move ``leg`` to the right of its axes and of their decorations (a twin axis' ticks and label)."""
    ax = leg.axes
    axes = getattr(leg, "_plotstyle_axes", [ax])
    right = max(a.get_tightbbox(renderer).x1 for a in axes)
    x = ax.transAxes.inverted().transform((right, 0))[0] + 0.02
    handles, labels = leg.legend_handles, [t.get_text() for t in leg.get_texts()]
    leg.remove()
    new = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(x, 1.0), borderaxespad=0.0)
    new._plotstyle_axes = axes


def save(fig: Any, path: str | Path, dpi: int = DPI) -> Path:
    """Lay out, move any legend that covers data outside its axes, write ``path`` and close ``fig``."""
    plt = pyplot()
    path = Path(path)
    for _ in range(3):          # a moved legend changes the layout, which can change another "best" place
        fig.tight_layout()
        renderer = drawn(fig)
        moved = False
        for ax in fig.axes:
            leg = ax.get_legend()
            if leg is not None and leg.get_visible() and leg._loc == 0 and (
                    getattr(leg, "_plotstyle_outside", False) or covers_data(leg, renderer)):
                _outside(leg, renderer)
                moved = True
        if not moved:
            break
        # widen the figure by what the moved legends stick out, so the axes keep their size
        renderer = drawn(fig)
        over = max(a.get_legend().get_window_extent(renderer).x1 for a in fig.axes if a.get_legend() is not None)
        fig.set_figwidth(fig.get_figwidth() + max(0.0, over - fig.bbox.x1) / fig.dpi + 0.1)
    for leg in [a.get_legend() for a in fig.axes]:
        if leg is not None and leg._loc == 0:   # pin "best" where it was checked, for the saved file
            ax = leg.axes
            corner = tuple(ax.transAxes.inverted().transform(leg.get_window_extent(renderer))[0])
            handles, labels = leg.legend_handles, [t.get_text() for t in leg.get_texts()]
            leg.remove()
            ax.legend(handles, labels, loc=corner)._plotstyle_axes = getattr(leg, "_plotstyle_axes", [ax])
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    for saved in _captures:
        saved.append((path, fig))
    return path


def drawn(fig: Any) -> Any:
    """Draw ``fig`` (also after ``save`` closed it) and return its renderer."""
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


@contextlib.contextmanager
def capture() -> Iterator[list[tuple[Path, Any]]]:
    """Collect (path, figure) of every figure ``save`` writes inside the block (for checking them)."""
    saved: list[tuple[Path, Any]] = []
    _captures.append(saved)
    try:
        yield saved
    finally:
        _captures.remove(saved)


def small_texts(fig: Any, min_pt: float = MIN_FONT_PT) -> list[tuple[str, float]]:
    """(text, size in points) of every visible, non-empty text of ``fig`` smaller than ``min_pt``."""
    from matplotlib.text import Text
    drawn(fig)
    return [(t.get_text(), t.get_fontsize()) for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t.get_fontsize() < min_pt - 1e-9]


def wrap(text: str, width_in: float, fontsize: float = MIN_FONT_PT) -> str:
    """``text`` wrapped to lines of a figure ``width_in`` inches wide at ``fontsize`` points (an average
    character is about 0.55 em wide); newlines in ``text`` are kept."""
    import textwrap
    width = max(30, int(width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(part, width=width) for part in text.split("\n"))


def fmt_number(v: Any, digits: int = 4) -> str:
    """A number as text: ``digits`` significant digits, integers as integers, "" for None or NaN."""
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return ""
    return ("inf" if f > 0 else "-inf") if math.isinf(f) else f"{f:.{digits}g}"


SNAKE = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)+$")


def is_column_name(text: str) -> bool:
    """Whether ``text`` reads as a raw column name (``robust_accuracy``) rather than words."""
    return bool(SNAKE.match(text.strip()))
