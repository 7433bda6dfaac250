"""The analyses of ``task=linearize`` (Rothauge et al., arXiv 1905.13386; docs/methods.md section 6).

Each analysis writes a CSV table and a PNG plot through the run's ``ResultWriter``, returns scalar metrics
(slash-namespaced, for ``metrics.json``) and a Markdown section for ``summary.md``:

- ``units``: singular values of every selected residual unit's Jacobian J = lambda S + dF at the unit input of
  each image (S the shortcut; identity inside a stage). Per unit: the fraction within ``tol`` of 1, min /
  median / max, the top singular value, and the image-to-image spread (std across images of the sorted
  singular values, relative to their mean). ``explicit_units``: complete spectra of chosen units.
- ``stages``: the same for whole stages (top/bottom-k by Lanczos unless explicit is affordable).
- ``sweep``: the spectrum of one unit as its skip scale lambda (and, separately, its residual weights) vary.
- ``propagation``: ||h_k(x + d) - h_k(x)|| at every state h_k (stem, every unit output, logits) for a random
  d and an adversarial d of the same L2 norm, and each unit's gain ||dh_k|| / ||dh_{k-1}||.
- ``energy``: the share of each propagated perturbation (its difference at a unit's input) that lies in the
  span of that unit's top-k right singular vectors, against k / n for a direction drawn at random.

Spectra come from ``robustbench_lab.linearization.spectra`` on Jacobian operators of either backend. A
spectrum is *complete* (every singular value, explicit or exact low-rank) or *partial* (Lanczos top-k and
bottom-k): statistics a partial spectrum cannot give (the median, the exact fraction equal to 1) are NaN,
and the fraction equal to 1 is then reported as bounds ``frac_one_lo`` / ``frac_one_hi``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from robustbench_lab.core.attack_base import Attack
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.results import ResultWriter
from robustbench_lab.linearization.units import get_block, hidden_states, list_units, scaled, stage_function, unit_function, unit_input

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- context
@dataclasses.dataclass
class Images:
    """The analysed test images: ``x`` (N, C, H, W) in [0, 1], labels ``y`` (N,), test-set indices."""

    x: torch.Tensor
    y: torch.Tensor
    index: list[int]


@dataclasses.dataclass
class Results:
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    sections: list[str] = dataclasses.field(default_factory=list)
    tables: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)


def select_units(net: nn.Module, spec: Any, key: str = "linearize.units") -> list[Any]:
    """Units named by ``spec``: ``"all"``, N (evenly spaced per stage, first and last included) or names."""
    units = list(list_units(net))
    names = [u.name for u in units]
    if spec == "all":
        return units
    if isinstance(spec, int):
        out = []
        for s in sorted({u.stage for u in units}):
            stage = [u for u in units if u.stage == s]
            pick = np.unique(np.round(np.linspace(0, len(stage) - 1, min(spec, len(stage)))).astype(int))
            out += [stage[i] for i in pick]
        return out
    for i, n in enumerate(spec):
        if n not in names:
            raise ConfigError(f"{key}[{i}]", n, names)
    return [u for u in units if u.name in set(spec)]


def check_units(net: nn.Module, opts: Any, model_name: str) -> list[Any]:
    """Every unit name of the options exists in ``net`` (a ResNet with residual units); returns the units."""
    units = list(list_units(net))   # ConfigError naming model.name for a network without residual units
    if not units:
        raise ConfigError("model.name", model_name, "a ResNet with residual units (resnet20/32/44/56/110, "
                          "resnet56_bottleneck)", "task=linearize found no residual unit in this model")
    names = [u.name for u in units]
    select_units(net, opts.units)
    for key, seq in (("linearize.explicit_units", opts.explicit_units), ("linearize.hist_units", opts.hist_units)):
        for i, n in enumerate(seq or ()):
            if n not in names:
                raise ConfigError(f"{key}[{i}]", n, names)
    if "sweep" in opts.analyses and opts.sweep_unit not in names:
        raise ConfigError("linearize.sweep.unit", opts.sweep_unit, names)
    from robustbench_lab.linearization.units import has_identity_shortcut
    lowrank = [("linearize.method", select_units(net, opts.units))] if opts.method == "lowrank" else []
    if opts.sweep_method == "lowrank" and "sweep" in opts.analyses:
        lowrank.append(("linearize.sweep.method", [u for u in units if u.name == opts.sweep_unit]))
    for key, refs in lowrank:
        if "post" in opts.boundaries:
            raise ConfigError(key, "lowrank", ["auto", "explicit", "lanczos"],
                              "the exact low-rank reduction needs J = lambda*I + dF (boundary pre); after the "
                              "post-addition ReLU it does not apply")
        down = [u.name for u in refs if not has_identity_shortcut(get_block(net, u))]
        if down:
            raise ConfigError(key, "lowrank", ["auto", "explicit", "lanczos"],
                              f"the exact low-rank reduction needs an identity shortcut; {', '.join(down)} "
                              "downsample (use auto: it takes the reduction only where it applies)")
    if opts.stage_method == "lowrank":
        raise ConfigError("linearize.stages.method", "lowrank", ["auto", "explicit", "lanczos"],
                          "the low-rank reduction is for single units")
    return units


@dataclasses.dataclass
class Context:
    """What every analysis needs. ``make_op(fn, x0, batch_size=..., dtype=...)`` builds a Jacobian operator."""

    model: Classifier
    opts: Any
    images: Images
    writer: ResultWriter
    make_op: Callable[..., Any]
    seed: int
    label: str

    def __post_init__(self) -> None:
        self.net: nn.Module = self.model.net
        self.all_units = list(list_units(self.net))
        self.units = select_units(self.net, self.opts.units)
        types = []
        for u in self.all_units:
            t = type(get_block(self.net, u)).__name__
            if t not in types:
                types.append(t)
        self.block_type = "+".join(types)
        self.values: dict[str, np.ndarray] = {}     # raw singular values, saved as singular_values.npz
        self.per_image: list[dict[str, Any]] = []   # one row per spectrum computed (spectra_per_image.csv)

    def op(self, fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor) -> Any:
        return self.make_op(fn, x0.detach(), batch_size=self.opts.batch_size, dtype=self.opts.dtype)

    def spectrum(self, fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, method: str, k: int,
                 block: nn.Module | None = None, boundary: str = "pre", which: str | None = None) -> "Spec":
        return compute_spectrum(self.op(fn, x0), method, k, self.opts.explicit_max, block=block, x0=x0.detach(),
                                boundary=boundary, batch_size=self.opts.batch_size, dtype=self.opts.dtype,
                                which=which or self.opts.which, maxiter=self.opts.lanczos_maxiter)

    def stage_of(self, name: str) -> int:
        return next(u.stage for u in self.all_units if u.name == name)

    def stage_starts(self, refs: list[Any]) -> list[float]:
        """x positions (between items of ``refs``) where a new stage begins, for plot separators."""
        return [i - 0.5 for i in range(1, len(refs)) if refs[i].stage != refs[i - 1].stage]


# ----------------------------------------------------------------------------------------------- spectra
@dataclasses.dataclass
class Spec:
    """Singular values of one operator. ``n``: how many it has, min(n_in, n_out).

    Complete spectra (explicit, lowrank) hold every value in ``top`` (descending). Partial ones (Lanczos):
    ``top`` the k largest, ``bottom`` the k smallest, both descending; an end that was not asked for (``which``)
    or did not converge is empty. ``n_zero``: singular values known to be exactly 0 (rows of outputs whose
    post-addition ReLU is inactive, boundary post), a lower bound on their count.
    """

    top: np.ndarray
    bottom: np.ndarray
    complete: bool
    n: int
    n_in: int
    n_out: int
    method: str
    seconds: float
    n_zero: int = 0
    note: str = ""

    @property
    def values(self) -> np.ndarray:
        return self.top if self.complete else np.concatenate([self.top, self.bottom])


def _desc(v: Any) -> np.ndarray:
    return np.sort(np.asarray(v, dtype=np.float64).ravel())[::-1]


def _zero_rows(op: Any) -> int:
    """Outputs that are exactly 0 at the linearization point. For a ReLU output (boundary post) their rows
    of J are 0 (the ReLU's derivative at 0 is 0 in torch and jax), so rank(J) <= n_out - zeros: at least
    zeros - (n_out - n) of its n = min(n_in, n_out) singular values are 0."""
    y = op.y0
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return int(np.sum(y == 0))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Lanczos multiplies one vector at a time: too little work to share, and on a busy 2-core machine the
    thread hand-offs made a top-6 Lanczos of a 12544-dim unit ~10x slower at 2 threads than at 1 (measured).
    Dense Jacobians and SVDs keep the run's threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _lanczos_end(op: Any, k: int, which: str, maxiter: int | None) -> tuple[np.ndarray, str]:
    """One end of the spectrum by Lanczos; empty (with a note) when ARPACK does not converge in ``maxiter``."""
    from scipy.sparse.linalg import ArpackNoConvergence

    from robustbench_lab.linearization import spectra
    try:
        with _one_thread():
            return _desc(spectra.svd_lanczos(op, k, which=which, maxiter=maxiter).values), ""
    except ArpackNoConvergence:
        log.warning("Lanczos (%s, k=%d) did not converge within maxiter=%s; that end is left unknown", which, k,
                    maxiter)
        return np.zeros(0), f"{which} not converged"


def compute_spectrum(op: Any, method: str, k: int, explicit_max: int, *, block: nn.Module | None = None,
                     x0: torch.Tensor | None = None, boundary: str = "pre", batch_size: int = 256,
                     dtype: Any = torch.float32, which: str = "both", maxiter: int | None = None) -> Spec:
    """Singular values of ``op`` (the Jacobian of ``block`` at ``x0`` for a unit, with the block's current
    skip scale and weights: callers wrap it in ``units.scaled``).

    ``auto``: the exact low-rank reduction where it applies and pays (boundary pre, identity shortcut,
    2r < 0.8 n active units of the branch's first ReLU, 2r <= explicit_max; as ``spectra.singular_values``),
    else explicit up to ``explicit_max`` dims (max of in and out), else Lanczos: the top-k (``which`` LM or
    both) and bottom-k (SM or both). ``lanczos`` with 2k close to n computes the whole spectrum explicitly
    instead (cheaper, and the ends would overlap). Boundary post: when at least k outputs are 0 (inactive
    ReLUs), the bottom-k are exact zeros, known without Lanczos (which would stall on that multiple value).
    """
    from robustbench_lab.linearization import spectra
    from robustbench_lab.linearization.units import has_identity_shortcut
    n_in, n_out = int(op.n_in), int(op.n_out)
    n = min(n_in, n_out)
    n_zero = max(0, _zero_rows(op) - (n_out - n)) if boundary == "post" else 0
    m = method
    lowrank_ok = block is not None and x0 is not None and boundary == "pre" and has_identity_shortcut(block)
    if m == "lowrank" and not lowrank_ok:
        raise ConfigError("linearize.method", "lowrank", ["auto", "explicit", "lanczos"],
                          "the exact low-rank reduction needs boundary pre and an identity shortcut (a "
                          "downsampling unit has neither; use auto)")
    if m == "auto":
        m = "explicit" if max(n_in, n_out) <= explicit_max else "lanczos"
        if lowrank_ok:
            r, _ = spectra.reduction_rank(block, x0)
            if 2 * r < 0.8 * n and 2 * r <= explicit_max:
                m = "lowrank"
    if m == "lanczos" and 2 * k >= n - 1:
        m = "explicit"
    t0 = time.perf_counter()
    if m == "explicit":
        s = spectra.svd_explicit(op)
        return Spec(_desc(s.values), np.zeros(0), True, n, n_in, n_out, "explicit", time.perf_counter() - t0, n_zero)
    if m == "lowrank":   # skip_scale None / weight_scale 1: the block as it is now (inside `scaled`)
        s = spectra.svd_lowrank(block, x0, skip_scale=None, weight_scale=1.0, boundary="pre",
                                batch_size=batch_size, dtype=dtype)
        return Spec(_desc(s.values), np.zeros(0), True, n, n_in, n_out, "lowrank", time.perf_counter() - t0)
    notes = []
    top = np.zeros(0)
    bottom = np.zeros(0)
    if which in ("LM", "both"):
        top, note = _lanczos_end(op, k, "LM", maxiter)
        top = top[:k]
        notes.append(note)
    if which in ("SM", "both"):
        if n_zero >= k:
            bottom = np.zeros(k)
            notes.append("bottom: exact zeros (inactive ReLU rows)")
        else:
            bottom, note = _lanczos_end(op, k, "SM", maxiter)
            bottom = bottom[-k:]
            notes.append(note)
    return Spec(top, bottom, False, n, n_in, n_out, "lanczos", time.perf_counter() - t0, n_zero,
                "; ".join(x for x in notes if x))


def spectrum_stats(sp: Spec, tol: float, target: float = 1.0) -> dict[str, float]:
    """Fraction of singular values within ``tol`` of ``target`` (exact for a complete spectrum, else bounds),
    min / median / max. A partial spectrum's unknown middle values lie between its k-th largest and k-th
    smallest value (when both ends are known); known exact zeros count against the upper bound."""
    near = (lambda v: int(np.sum(np.abs(v - target) <= tol)))
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


def relative_spread(specs: list[Spec]) -> tuple[float, float]:
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


def _record(ctx: Context, level: str, boundary: str, name: str, setting: str, image: int, sp: Spec,
            stats: dict[str, float], **extra: Any) -> None:
    ctx.values[f"{level}/{boundary}/{name}/{setting}/img{image}"] = sp.values.astype(np.float32)
    ctx.per_image.append({"level": level, "boundary": boundary, "name": name, "setting": setting, "image": image,
                          "method": sp.method, "complete": sp.complete, "n_in": sp.n_in, "n_out": sp.n_out,
                          "n": sp.n, "frac_one": stats["frac"], "frac_one_lo": stats["frac_lo"],
                          "frac_one_hi": stats["frac_hi"], "sigma_min": stats["min"],
                          "sigma_median": stats["median"], "sigma_max": stats["max"], "n_zero": sp.n_zero,
                          "note": sp.note, "seconds": sp.seconds, **extra})


def _aggregate(specs: list[Spec], stats: list[dict[str, float]]) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------- plotting
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _wrap(text: str, width_in: float, fontsize: float = 7) -> str:
    """``text`` wrapped to a figure ``width_in`` inches wide (long titles carry block type and boundary)."""
    import textwrap
    return "\n".join(textwrap.fill(part, width=max(30, int(width_in * 110 / fontsize)))
                     for part in text.split("\n"))


def _boundary_text(b: str) -> str:
    return {"pre": "boundary pre (lambda*S(x) + F(x), before the post-addition ReLU)",
            "post": "boundary post (after the post-addition ReLU)"}[b]


def _stage_lines(ax: Any, xs: Iterable[float]) -> None:
    for x in xs:
        ax.axvline(x, color="0.5", ls="--", lw=0.8)


# ------------------------------------------------------------------------------------------ (a) units
def unit_spectra(ctx: Context, res: Results) -> None:
    o = ctx.opts
    x = ctx.images.x[:o.n_images]
    rows = []
    pooled: dict[tuple[str, str], list[Spec]] = {}
    for b in o.boundaries:
        for ref in ctx.units:
            block = get_block(ctx.net, ref)
            x0 = unit_input(ctx.model, x, ref)
            fn = unit_function(block, boundary=b)
            specs, stats = [], []
            for i in range(x.shape[0]):
                sp = ctx.spectrum(fn, x0[i], o.method, o.k, block=block, boundary=b)
                st = spectrum_stats(sp, o.tol)
                _record(ctx, "unit", b, ref.name, "trained", ctx.images.index[i], sp, st,
                        block=type(block).__name__)
                specs.append(sp)
                stats.append(st)
            pooled[(b, ref.name)] = specs
            rows.append({"boundary": b, "block": type(block).__name__, "unit": ref.name, "stage": ref.stage + 1,
                         "index": ref.index + 1, **_aggregate(specs, stats)})
            log.info("unit %s (%s): %s, frac_one %.3f [%.3f, %.3f], top1 %.3f", ref.name, b, rows[-1]["method"],
                     rows[-1]["frac_one"], rows[-1]["frac_one_lo"], rows[-1]["frac_one_hi"], rows[-1]["top1"])
    df = pd.DataFrame(rows)
    ctx.writer.write_csv("unit_spectra.csv", df)
    res.tables["unit_spectra"] = df

    explicit: dict[tuple[str, str], list[Spec]] = {}
    if o.explicit_units:
        erows = []
        xe = ctx.images.x[:o.explicit_images]
        for b in o.boundaries:
            for ref in [u for u in ctx.all_units if u.name in set(o.explicit_units)]:
                block = get_block(ctx.net, ref)
                x0 = unit_input(ctx.model, xe, ref)
                fn = unit_function(block, boundary=b)
                specs, stats = [], []
                for i in range(xe.shape[0]):
                    sp = ctx.spectrum(fn, x0[i], "explicit", o.k, boundary=b)
                    st = spectrum_stats(sp, o.tol)
                    _record(ctx, "unit_explicit", b, ref.name, "trained", ctx.images.index[i], sp, st,
                            block=type(block).__name__)
                    specs.append(sp)
                    stats.append(st)
                explicit[(b, ref.name)] = specs
                erows.append({"boundary": b, "block": type(block).__name__, "unit": ref.name, "stage": ref.stage + 1,
                              "index": ref.index + 1, **_aggregate(specs, stats)})
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
                "`unit_spectra_explicit.csv`." if o.explicit_units else ""), "",
             "| boundary | unit | method | frac. within tol of 1 [bounds] | min | median | max | spread (rel.) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['boundary']} | {r['unit']} | {r['method']} | {_f(r['frac_one'])} "
                     f"[{_f(r['frac_one_lo'])}, {_f(r['frac_one_hi'])}] | {_f(r['sigma_min'])} | "
                     f"{_f(r['sigma_median'])} | {_f(r['sigma_max'])} | {_f(r['spread_rel_mean'])} |")
    res.sections.append("\n".join(lines))


def _plot_unit_bands(ctx: Context, b: str, df: pd.DataFrame, pooled: dict[tuple[str, str], list[Spec]],
                     explicit: dict[tuple[str, str], list[Spec]] | None = None) -> None:
    """Per unit: quantile bars of the complete spectra (blue), or the known Lanczos ends (orange) plus, for
    ``explicit_units``, their complete spectra on fewer images (light blue). Right axis: the fraction within
    tol of 1 where it is known (complete spectra: filled squares; explicit units: open squares), and its
    bounds where only the ends are known (shaded). A partial spectrum has no point: the fraction is unknown."""
    plt = _pyplot()
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
    _stage_lines(ax, ctx.stage_starts(refs))
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
    ax.set_title(_wrap(f"{ctx.label}: unit singular values over {ctx.opts.n_images} images\n{ctx.block_type}, "
                       f"{_boundary_text(b)}; blue: complete spectra (whiskers min-max, bars 5-95% and 25-75%, "
                       f"dot median; light: explicit units on {ctx.opts.explicit_images} images), orange: Lanczos "
                       f"top/bottom-{ctx.opts.k} (which={ctx.opts.which})", fig.get_figwidth()), fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.writer.path(f"unit_spectra_{b}.png"), dpi=110)
    plt.close(fig)


def _plot_histograms(ctx: Context, b: str, pooled: dict[tuple[str, str], list[Spec]],
                     explicit: dict[tuple[str, str], list[Spec]]) -> None:
    """Histograms of complete spectra (explicit ones preferred) for ``hist_units`` (default: the first and
    last analysed unit of each stage that has a complete spectrum)."""
    def complete_specs(name: str) -> list[Spec]:
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
    plt = _pyplot()
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
    fig.suptitle(_wrap(f"{ctx.label}: histograms of complete spectra (pooled over images); {ctx.block_type}, "
                       f"{_boundary_text(b)}", fig.get_figwidth(), 8), fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.writer.path(f"unit_histograms_{b}.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- (a') stages
def stage_spectra(ctx: Context, res: Results) -> None:
    o = ctx.opts
    x = ctx.images.x[:o.stage_images]
    rows, pooled = [], {}
    stages = sorted({u.stage for u in ctx.all_units})
    for b in o.boundaries:
        for s in stages:
            first = next(u for u in ctx.all_units if u.stage == s)
            x0 = unit_input(ctx.model, x, first)
            fn = stage_function(ctx.net, s, boundary=b)
            specs, stats = [], []
            for i in range(x.shape[0]):
                sp = ctx.spectrum(fn, x0[i], o.stage_method, o.stage_k, boundary=b, which=o.stage_which)
                st = spectrum_stats(sp, o.tol)
                _record(ctx, "stage", b, f"stage{s + 1}", "trained", ctx.images.index[i], sp, st)
                specs.append(sp)
                stats.append(st)
            pooled[(b, s)] = specs
            rows.append({"boundary": b, "block": ctx.block_type, "stage": s + 1,
                         "units": len([u for u in ctx.all_units if u.stage == s]), **_aggregate(specs, stats)})
            log.info("stage %s (%s): %s, top1 %.3f, min %.3g", s + 1, b, rows[-1]["method"], rows[-1]["top1"],
                     rows[-1]["sigma_min"])
    df = pd.DataFrame(rows)
    ctx.writer.write_csv("stage_spectra.csv", df)
    res.tables["stage_spectra"] = df
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(o.boundaries), figsize=(4.2 * len(o.boundaries), 3.4), squeeze=False)
    for ax, b in zip(axes[0], o.boundaries):
        for s in stages:
            v = np.concatenate([sp.values for sp in pooled[(b, s)]])
            ax.plot(np.full(v.size, s) + np.random.default_rng(s).uniform(-0.12, 0.12, v.size), v, ".",
                    color="C0" if all(sp.complete for sp in pooled[(b, s)]) else "C1", ms=3)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_ylim(bottom=0)                      # singular values: no negative half of the symlog axis
        ax.set_xticks(stages)
        ax.set_xticklabels([f"stage {s + 1}\n({pooled[(b, s)][0].n_in}->{pooled[(b, s)][0].n_out})" for s in stages],
                           fontsize=7)
        ax.set_ylabel("singular value")
        ax.set_title(f"{ctx.block_type}, boundary {b}", fontsize=8)
    fig.suptitle(_wrap(f"{ctx.label}: stage Jacobians over {x.shape[0]} images (blue complete, orange Lanczos "
                       f"top/bottom-{o.stage_k}, which={o.stage_which})", fig.get_figwidth(), 8), fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.writer.path("stage_spectra.png"), dpi=110)
    plt.close(fig)
    for r in rows:
        res.metrics[f"stages/{r['boundary']}/stage{r['stage']}/top1"] = r["top1"]
        res.metrics[f"stages/{r['boundary']}/stage{r['stage']}/sigma_min"] = r["sigma_min"]
    res.metrics["stages/seconds"] = float(df["seconds"].sum())
    lines = [f"## Stage spectra ({ctx.block_type})", "", "`stage_spectra.csv`, `stage_spectra.png`.", "",
             "| boundary | stage | dims in -> out | method | top-1 | smallest | frac. within tol of 1 [bounds] |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['boundary']} | {r['stage']} | {r['n_in']} -> {r['n_out']} | {r['method']} | "
                     f"{_f(r['top1'])} | {_f(r['sigma_min'])} | {_f(r['frac_one'])} [{_f(r['frac_one_lo'])}, "
                     f"{_f(r['frac_one_hi'])}] |")
    res.sections.append("\n".join(lines))


# ------------------------------------------------------------------------------------------- (b) sweep
def scale_sweep(ctx: Context, res: Results) -> None:
    """Spectra of ``sweep.unit`` for every skip scale lambda (weight scale 1) and every residual-weight scale
    (lambda 1). Fraction within tol of |lambda| and of 1; the unit is restored after each setting."""
    o = ctx.opts
    ref = next(u for u in ctx.all_units if u.name == o.sweep_unit)
    block = get_block(ctx.net, ref)
    x = ctx.images.x[:o.sweep_images]
    x0 = unit_input(ctx.model, x, ref)   # the unit's own scales do not change its input
    settings = [("skip", lam, 1.0) for lam in o.skip_scales] + [("weight", 1.0, c) for c in o.weight_scales]
    rows, curves = [], {}
    for b in o.boundaries:
        for kind, lam, c in settings:
            specs, stats, stats1 = [], [], []
            for i in range(x.shape[0]):
                with scaled(block, skip_scale=lam, weight_scale=c):   # restored on exit
                    sp = ctx.spectrum(unit_function(block, boundary=b), x0[i], o.sweep_method, o.k, block=block,
                                      boundary=b)
                st = spectrum_stats(sp, o.tol, target=abs(lam))
                st1 = spectrum_stats(sp, o.tol, target=1.0)
                _record(ctx, "sweep", b, ref.name, f"{kind}:lambda={lam:g},weight={c:g}", ctx.images.index[i], sp,
                        st1, block=type(block).__name__, skip_scale=lam, weight_scale=c,
                        frac_eq_lambda=st["frac"], frac_eq_lambda_lo=st["frac_lo"], frac_eq_lambda_hi=st["frac_hi"])
                specs.append(sp)
                stats.append(st)
                stats1.append(st1)
            curves[(b, kind, lam, c)] = specs
            agg = _aggregate(specs, stats1)
            rows.append({"boundary": b, "block": type(block).__name__, "unit": ref.name, "sweep": kind,
                         "skip_scale": lam, "weight_scale": c,
                         "frac_eq_lambda": float(np.mean([s["frac"] for s in stats])),
                         "frac_eq_lambda_lo": float(np.mean([s["frac_lo"] for s in stats])),
                         "frac_eq_lambda_hi": float(np.mean([s["frac_hi"] for s in stats])), **agg})
    df = pd.DataFrame(rows)
    ctx.writer.write_csv("scale_sweep.csv", df)
    res.tables["scale_sweep"] = df
    plt = _pyplot()
    fig, axes = plt.subplots(len(o.boundaries), 2, figsize=(9, 3.4 * len(o.boundaries)), squeeze=False)
    for row, b in zip(axes, o.boundaries):
        for ax, kind in zip(row, ("skip", "weight")):
            for j, (kk, lam, c) in enumerate([s for s in settings if s[0] == kind]):
                specs = curves[(b, kk, lam, c)]
                lab = f"lambda={lam:g}" if kind == "skip" else f"weights x{c:g}"
                if all(s.complete for s in specs):
                    m = min(s.values.size for s in specs)
                    mean = np.mean([s.values[:m] for s in specs], axis=0)
                    ax.plot(np.arange(m) / m, mean, color=f"C{j}", lw=1.2, label=lab)
                else:
                    for s in specs:
                        idx = np.concatenate([np.arange(s.top.size), s.n - s.bottom.size + np.arange(s.bottom.size)])
                        ax.plot(idx / s.n, s.values, ".", color=f"C{j}", ms=3, label=lab if s is specs[0] else None)
            ax.set_xlabel("i / n (singular values, descending)")
            ax.set_ylabel("singular value")
            ax.set_yscale("symlog", linthresh=1e-2)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=6)
            ax.set_title(_wrap(f"{ref.name} ({type(block).__name__}), boundary {b}: " + (
                "skip scale lambda (weights x1)" if kind == "skip" else "residual weights x c (lambda 1)"),
                fig.get_figwidth() / 2), fontsize=7)
    fig.suptitle(_wrap(f"{ctx.label}: spectra of unit {ref.name} under scaling, mean over {x.shape[0]} images",
                       fig.get_figwidth(), 8), fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.writer.path("scale_sweep.png"), dpi=110)
    plt.close(fig)
    for r in rows:
        tag = f"lambda={r['skip_scale']:g}" if r["sweep"] == "skip" else f"weight={r['weight_scale']:g}"
        res.metrics[f"sweep/{r['boundary']}/{tag}/frac_eq_lambda"] = r["frac_eq_lambda"]
        res.metrics[f"sweep/{r['boundary']}/{tag}/frac_one"] = r["frac_one"]
        res.metrics[f"sweep/{r['boundary']}/{tag}/top1"] = r["top1"]
    res.metrics["sweep/unit"] = ref.name
    lines = [f"## Scale sweep on unit {ref.name} ({type(block).__name__})", "",
             "`scale_sweep.csv`, `scale_sweep.png`: lambda varies with weights x1; the weights vary with lambda 1.",
             "", "| boundary | sweep | lambda | weights x | frac. within tol of abs(lambda) | frac. within tol of 1 | "
             "min | max |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['boundary']} | {r['sweep']} | {r['skip_scale']:g} | {r['weight_scale']:g} | "
                     f"{_f(r['frac_eq_lambda'])} | {_f(r['frac_one'])} | {_f(r['sigma_min'])} | {_f(r['sigma_max'])} |")
    res.sections.append("\n".join(lines))


# ------------------------------------------------------------------------------------- (c) propagation
@dataclasses.dataclass
class Perturbations:
    """Random and adversarial perturbations of the same L2 norm per image; ``x`` (N, C, H, W)."""

    x: torch.Tensor
    d: dict[str, torch.Tensor]            # "random" / "adversarial" -> (N, C, H, W)
    adv_success: np.ndarray               # the attack fooled the model (before any rescaling)
    adv_l2_raw: np.ndarray                # the adversarial norm as the attack returned it
    index: list[int]


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def make_perturbations(ctx: Context, attack: tuple[Attack, float | None]) -> Perturbations:
    """Adversarial d = attack(x) - x; random d Gaussian; both rescaled to the same L2 norm: the adversarial
    norm of each image (``perturbation.l2`` null) or ``perturbation.l2``. Not clipped to the [0, 1] box:
    clipping would change the norms, and the analysis is of the network as a function."""
    atk, eps = attack
    n = ctx.opts.n_images
    x, y = ctx.images.x[:n], ctx.images.y[:n]
    gen = torch.Generator(device=x.device).manual_seed(ctx.seed)
    r = atk(ctx.model, x, y, eps=eps, generator=gen)
    d_adv = (r.x_adv - x).detach()
    raw = _l2(d_adv)
    g2 = torch.Generator(device=x.device).manual_seed(ctx.seed + 7919)
    d_rand = torch.randn(x.shape, generator=g2, device=x.device, dtype=x.dtype)
    target = raw if ctx.opts.perturb_l2 is None else torch.full_like(raw, ctx.opts.perturb_l2)
    shape = (-1,) + (1,) * (x.dim() - 1)
    d_rand = d_rand * (target / _l2(d_rand)).view(shape)
    if ctx.opts.perturb_l2 is not None:
        d_adv = d_adv * (target / raw.clamp_min(1e-30)).view(shape)
    if bool((raw == 0).any()):
        log.warning("the attack left %d image(s) unperturbed; their ratios are NaN", int((raw == 0).sum()))
    return Perturbations(x, {"random": d_rand, "adversarial": d_adv}, r.success.cpu().numpy(), raw.cpu().numpy(),
                         ctx.images.index[:n])


@torch.no_grad()
def _states(model: Classifier, x: torch.Tensor) -> dict[str, torch.Tensor]:
    hs = dict(hidden_states(model, x))
    hs["logits"] = model(x)
    return hs


def propagation(ctx: Context, res: Results, pert: Perturbations) -> None:
    base = _states(ctx.model, pert.x)
    names = list(base)
    stage = {u.name: u.stage + 1 for u in ctx.all_units}   # 1-based, as in the unit names
    rows = []
    for kind, d in pert.d.items():
        moved = _states(ctx.model, pert.x + d)
        prev = _l2(d)
        for j, name in enumerate(names):
            diff = _l2(moved[name] - base[name])
            size = _l2(base[name])
            for i in range(diff.shape[0]):
                rows.append({"image": pert.index[i], "kind": kind, "state_index": j, "state": name,
                             "stage": stage.get(name, 0 if j == 0 else "head"), "input_l2": float(_l2(d)[i]),
                             "diff_l2": float(diff[i]), "state_l2": float(size[i]),
                             "rel_diff": float(diff[i] / size[i]) if size[i] > 0 else math.nan,
                             "gain": float(diff[i] / prev[i]) if prev[i] > 0 else math.nan,
                             "ratio_to_input": float(diff[i] / _l2(d)[i]) if _l2(d)[i] > 0 else math.nan,
                             "adv_success": bool(pert.adv_success[i])})
            prev = diff
    df = pd.DataFrame(rows)
    ctx.writer.write_csv("propagation.csv", df)
    res.tables["propagation"] = df
    np.savez_compressed(ctx.writer.path("perturbations.npz"), x=pert.x.cpu().numpy(),
                        d_random=pert.d["random"].cpu().numpy(), d_adversarial=pert.d["adversarial"].cpu().numpy(),
                        index=np.asarray(pert.index), adv_success=pert.adv_success, adv_l2_raw=pert.adv_l2_raw)
    piv = df.pivot_table(index=["image", "state_index"], columns="kind", values="diff_l2")
    ratio = (piv["adversarial"] / piv["random"]).unstack("state_index")   # (images, states)
    last_unit = names.index(ctx.all_units[-1].name)
    res.metrics["propagation/adv_over_random_stem"] = float(np.nanmedian(ratio[0]))
    res.metrics["propagation/adv_over_random_last"] = float(np.nanmedian(ratio[last_unit]))
    res.metrics["propagation/adv_over_random_logits"] = float(np.nanmedian(ratio[len(names) - 1]))
    res.metrics["propagation/adv_success_rate"] = float(np.mean(pert.adv_success))
    res.metrics["propagation/input_l2_median"] = float(np.median(_l2(pert.d["adversarial"]).cpu().numpy()))
    _plot_propagation(ctx, df, names)
    stage_ends = [names.index(u.name) for k, u in enumerate(ctx.all_units)
                  if k + 1 == len(ctx.all_units) or ctx.all_units[k + 1].stage != u.stage]
    for s_no, j in enumerate(stage_ends, start=1):
        res.metrics[f"propagation/adv_over_random_stage{s_no}_end"] = float(np.nanmedian(ratio[j]))
    lines = [f"## Perturbation propagation ({ctx.block_type}; states = unit outputs, after the post-addition ReLU)",
             "", f"`propagation.csv` (one row per image x kind x state), `propagation.png`, `perturbations.npz`. "
             f"{len(pert.index)} images; the attack fooled {int(pert.adv_success.sum())}; "
             f"median L2 norm of d = {_f(res.metrics['propagation/input_l2_median'])} "
             f"({'the adversarial norm' if ctx.opts.perturb_l2 is None else 'fixed'}).", "",
             "| state | median L2 of dh, random | median L2 of dh, adversarial | median ratio adv/random |",
             "|---|---|---|---|"]
    for j in [0] + stage_ends + [len(names) - 1]:
        sub = df[df["state_index"] == j]
        lines.append(f"| {names[j]} | {_f(sub[sub['kind'] == 'random']['diff_l2'].median())} | "
                     f"{_f(sub[sub['kind'] == 'adversarial']['diff_l2'].median())} | {_f(np.nanmedian(ratio[j]))} |")
    res.sections.append("\n".join(lines))


def _plot_propagation(ctx: Context, df: pd.DataFrame, names: list[str]) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.28 * len(names) + 2), 6.4), sharex=True)
    for kind, color in (("random", "C0"), ("adversarial", "C3")):
        sub = df[df["kind"] == kind]
        for ax, col in zip(axes, ("diff_l2", "gain")):
            g = sub.groupby("state_index")[col]
            mean, lo, hi = g.mean(), g.min(), g.max()
            ax.plot(mean.index, mean.to_numpy(), "o-", color=color, ms=3, lw=1, label=f"{kind} (mean)")
            ax.fill_between(mean.index, lo.to_numpy(), hi.to_numpy(), color=color, alpha=0.2)
    starts = [j - 0.5 for j in range(1, len(names)) if names[j] in {u.name for u in ctx.all_units}
              and (names[j - 1] == "stem" or ctx.stage_of(names[j]) != ctx.stage_of(names[j - 1]))]
    starts.append(len(names) - 1.5)   # the head (pooling + linear layer)
    for ax in axes:
        _stage_lines(ax, starts)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("||h_k(x+d) - h_k(x)||_2")
    axes[1].set_ylabel("gain ||dh_k|| / ||dh_{k-1}||")
    axes[1].axhline(1.0, color="k", lw=0.6)
    axes[0].legend(fontsize=7)
    axes[1].set_xticks(range(len(names)))
    axes[1].set_xticklabels(names, rotation=90, fontsize=7)
    axes[0].set_title(_wrap(f"{ctx.label}: random vs adversarial d of equal L2 norm, {df['image'].nunique()} "
                            f"images (bands min-max); {ctx.block_type}, states h_k = unit outputs after the "
                            "post-addition ReLU", fig.get_figwidth(), 8), fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.writer.path("propagation.png"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ (d) energy
def top_right_vectors(op: Any, k: int, seed: int = 0, maxiter: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest singular values (descending) of a Jacobian operator and their right singular
    vectors (k, n_in), by Lanczos on jvp / vjp products (ArpackNoConvergence past ``maxiter`` restarts)."""
    from robustbench_lab.linearization import spectra
    with _one_thread():
        sp = spectra.svd_lanczos(op, k, which="LM", seed=seed, vectors=True, maxiter=maxiter)
    return sp.values, np.asarray(sp.extra["vh"], dtype=np.float64)


def energy(ctx: Context, res: Results, pert: Perturbations) -> None:
    """Share of ||delta||^2 in the top-k right singular subspace of each unit's Jacobian, delta the
    perturbation's difference at the unit input; a random direction has k / n_in on average."""
    from scipy.sparse.linalg import ArpackNoConvergence

    o = ctx.opts
    rows = []
    x = pert.x
    for b in o.boundaries:
        for ref in ctx.units:
            block = get_block(ctx.net, ref)
            fn = unit_function(block, boundary=b)
            x0 = unit_input(ctx.model, x, ref)
            deltas = {kind: (unit_input(ctx.model, x + d, ref) - x0).flatten(1).cpu().double().numpy()
                      for kind, d in pert.d.items()}
            for i in range(x.shape[0]):
                op = ctx.op(fn, x0[i])
                k = min(o.k, min(int(op.n_in), int(op.n_out)) - 1)
                try:
                    _, vh = top_right_vectors(op, k, seed=ctx.seed + i, maxiter=o.lanczos_maxiter)
                except ArpackNoConvergence:
                    log.warning("energy: top-%d vectors of %s (%s) did not converge; NaN", k, ref.name, b)
                    vh = None
                for kind, dl in deltas.items():
                    nrm2 = float(dl[i] @ dl[i])
                    e = math.nan
                    if vh is not None and nrm2 > 0:
                        proj = vh @ dl[i]
                        e = float(proj @ proj) / nrm2
                    rows.append({"boundary": b, "block": type(block).__name__, "unit": ref.name,
                                 "stage": ref.stage + 1, "image": pert.index[i], "kind": kind, "k": k,
                                 "n_in": int(op.n_in), "energy_topk": e, "chance": k / int(op.n_in),
                                 "delta_l2": math.sqrt(nrm2)})
    per = pd.DataFrame(rows)
    ctx.writer.write_csv("energy_per_image.csv", per)
    agg = (per.pivot_table(index=["boundary", "block", "unit", "stage", "k", "n_in", "chance"], columns="kind",
                           values="energy_topk", aggfunc=["mean", "std"], sort=False))
    agg.columns = [f"{kind}_{stat}" for stat, kind in agg.columns]
    agg = agg.reset_index()
    ctx.writer.write_csv("energy.csv", agg)
    res.tables["energy"] = agg
    plt = _pyplot()
    width = max(6.0, 0.3 * len(ctx.units) + 2)
    fig, axes = plt.subplots(len(o.boundaries), 1, figsize=(width, 3.3 * len(o.boundaries)), squeeze=False)
    for ax, b in zip(axes[:, 0], o.boundaries):
        sub = agg[agg["boundary"] == b]
        xs = np.arange(len(sub))
        for kind, color in (("random", "C0"), ("adversarial", "C3")):
            if f"{kind}_mean" in sub:
                ax.errorbar(xs, sub[f"{kind}_mean"], yerr=sub[f"{kind}_std"], fmt="o-", color=color, ms=3, lw=1,
                            capsize=2, label=kind)
        ax.plot(xs, sub["chance"], "k:", lw=1, label="k / n (random direction)")
        ax.set_yscale("log")
        _stage_lines(ax, ctx.stage_starts(ctx.units))
        ax.set_xticks(xs)
        ax.set_xticklabels(sub["unit"], rotation=90, fontsize=7)
        ax.set_ylabel(f"energy in top-{o.k} subspace")
        ax.legend(fontsize=7)
        ax.set_title(_wrap(f"{ctx.label}: share of the perturbation (at each unit's input) in the span of the "
                           f"unit's top-{o.k} right singular vectors; {ctx.block_type}, boundary {b}",
                           fig.get_figwidth(), 8), fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.writer.path("energy.png"), dpi=110)
    plt.close(fig)
    for b in o.boundaries:
        sub = agg[agg["boundary"] == b]
        for kind in ("random", "adversarial"):
            res.metrics[f"energy/{b}/{kind}_mean"] = float(sub[f"{kind}_mean"].mean())
        res.metrics[f"energy/{b}/chance_mean"] = float(sub["chance"].mean())
    lines = [f"## Energy along the units' top-{o.k} right singular vectors ({ctx.block_type})", "",
             "`energy.csv` (one row per boundary x unit: mean / std over images), `energy_per_image.csv`, "
             "`energy.png`. chance = k / n_in, the expected share of a random direction.", "",
             "| boundary | unit | random | adversarial | chance |", "|---|---|---|---|---|"]
    for _, r in agg.iterrows():
        lines.append(f"| {r['boundary']} | {r['unit']} | {_f(r.get('random_mean'))} | "
                     f"{_f(r.get('adversarial_mean'))} | {_f(r['chance'])} |")
    res.sections.append("\n".join(lines))


# ------------------------------------------------------------------------------------------------ driver
def run_all(ctx: Context, attack: tuple[Attack, float | None] | None) -> Results:
    """Run the analyses of ``ctx.opts.analyses`` in a fixed order; each adds its tables, plots and metrics."""
    res = Results()
    todo = set(ctx.opts.analyses)
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0
        log.info("linearize: %s done in %.1f s", name, timings[name])

    if "units" in todo:
        timed("units", lambda: unit_spectra(ctx, res))
    if "stages" in todo:
        timed("stages", lambda: stage_spectra(ctx, res))
    if "sweep" in todo:
        timed("sweep", lambda: scale_sweep(ctx, res))
    if {"propagation", "energy"} & todo:
        assert attack is not None
        holder: dict[str, Perturbations] = {}
        timed("perturbations", lambda: holder.setdefault("p", make_perturbations(ctx, attack)))
        if "propagation" in todo:
            timed("propagation", lambda: propagation(ctx, res, holder["p"]))
        if "energy" in todo:
            timed("energy", lambda: energy(ctx, res, holder["p"]))
    if ctx.per_image:
        ctx.writer.write_csv("spectra_per_image.csv", pd.DataFrame(ctx.per_image))
        np.savez_compressed(ctx.writer.path("singular_values.npz"), **ctx.values)
    for name, s in timings.items():
        res.metrics[f"seconds/{name}"] = s
    return res


def _f(v: Any) -> str:
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if math.isnan(f) else f"{f:.4g}"


def summary_markdown(m: dict[str, Any], sections: list[str]) -> str:
    lines = [f"# Linearization of {m['model']} ({m['block']}) on {m['dataset']}", "",
             "Rothauge et al., arXiv 1905.13386 (docs/methods.md section 6); experiments/linearization/README.md "
             "says how to read every file.", "",
             "| setting | value |", "|---|---|",
             f"| unit boundary | {m['boundary']} (pre: lambda*S(x) + F(x); post: after the post-addition ReLU) |",
             f"| block type | {m['block']} |",
             f"| backend / method / k / dtype | {m['backend']} / {m['method']} / {m['k']} / {m['dtype']} |",
             f"| tol for 'equal to 1' | {m['tol']} |",
             f"| images | {m['n_images']} correctly classified test points (indices in metrics.json) |",
             f"| units analysed | {m['n_units_analysed']} of {m['n_units']} |",
             f"| perturbation attack | {m.get('attack')} (L2) |",
             f"| clean accuracy on the evaluation subset | {_f(m.get('clean_accuracy'))} ({m['n_examples']} points) |",
             f"| checkpoint | {m.get('checkpoint')} |", ""]
    return "\n".join(lines + [s + "\n" for s in sections])
