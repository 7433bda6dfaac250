"""Tables, ratios and curves of the minimal-norm benchmark (``benchmarks/minimal_norm.py``) from its rows."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from robustbench_lab.core import plotstyle

NORM_WORDS = {"l1": "L1", "l2": "L2", "linf": "L-inf"}
OURS = "robustbench_lab"


def best_distances(rows: list[dict]) -> dict[tuple[str, str], dict[int, float]]:
    """Per (model, norm): the smallest norm over every row, per test index."""
    best: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in rows:
        b = best[(r["model"], r["norm"])]
        for i, d in zip(r["indices"], r["dist"]):
            b[i] = min(b.get(i, float("inf")), d)
    return best


def optimality(d: np.ndarray, d_best: np.ndarray) -> float:
    """AttackBench's optimality of per-example norms ``d`` against the per-example best ``d_best`` (both over
    the same points, +inf where the attack failed): 1 - (A - A*) / (D - A*), A = mean min(d, D), D = max d*."""
    fin = d_best[np.isfinite(d_best)]
    if fin.size == 0:
        return float("nan")
    D = float(fin.max())
    a_best = float(np.minimum(d_best, D).mean())
    a = float(np.minimum(d, D).mean())
    return 1.0 - (a - a_best) / (D - a_best) if D > a_best else float("nan")


def summarize(rows: list[dict]) -> list[dict]:
    best = best_distances(rows)
    out = []
    for r in rows:
        d = np.asarray(r["dist"], dtype=float)
        b = np.asarray([best[(r["model"], r["norm"])][i] for i in r["indices"]])
        fin = np.isfinite(d)
        out.append({**{k: v for k, v in r.items() if k not in ("dist", "indices")},
                    "success_rate": float(fin.mean()),
                    "median": float(np.median(d[fin])) if fin.any() else float("nan"),
                    "mean": float(d[fin].mean()) if fin.any() else float("nan"),
                    "median_all": float(np.median(d)),            # failures as +inf
                    "median_best": float(np.median(b)),
                    "optimality": optimality(d, b)})
    return out


def peer_ratios(s: list[dict], rows: list[dict]) -> None:
    """Our rows get, per peer library implementing the same method at the same budget on the same model, on
    the points both ran: the median norm over the points both broke, ours / peer (``median_vs_<lib>``), the
    success rates' difference, ours - peer (``success_vs_<lib>``), and seconds per point, ours / peer."""
    key = lambda r: (r["model"], r["method"], r["norm"], r["budget"])  # noqa: E731
    by_name = {(r["model"], r["name"]): r for r in rows}
    peers = defaultdict(dict)
    for r in s:
        if r["library"] != OURS:
            peers[key(r)][r["library"]] = r
    for r in s:
        if r["library"] != OURS:
            continue
        mine = by_name[(r["model"], r["name"])]
        for lib, p in peers[key(r)].items():
            theirs = by_name[(p["model"], p["name"])]
            d_p = dict(zip(theirs["indices"], theirs["dist"]))
            pairs = np.asarray([(d, d_p[i]) for i, d in zip(mine["indices"], mine["dist"]) if i in d_p], dtype=float)
            both = np.isfinite(pairs).all(1)
            r[f"median_vs_{lib}"] = (float(np.median(pairs[both, 0]) / np.median(pairs[both, 1]))
                                     if both.any() and np.median(pairs[both, 1]) > 0 else float("nan"))
            r[f"success_vs_{lib}"] = float(np.isfinite(pairs[:, 0]).mean() - np.isfinite(pairs[:, 1]).mean())
            r[f"time_vs_{lib}"] = (r["seconds"] / r["n"]) / (p["seconds"] / p["n"]) if p["seconds"] > 0 else float("nan")
            r[f"points_vs_{lib}"] = int(len(pairs))


def apply_timing(s: list[dict], timing) -> None:
    """Where interleaved repetitions measured ours / peer, that median ratio replaces the one-run ratio
    (``time_vs_<lib>``; the one-run ratio stays as ``time_once_vs_<lib>``)."""
    t = {(x["model"], x["method"], x["norm"], x["budget"], x["peer"]): x for x in timing}
    for r in s:
        for k in [k for k in r if k.startswith("time_vs_")]:
            lib = k[len("time_vs_"):]
            m = t.get((r["model"], r["method"], r["norm"], r["budget"], lib))
            if m is not None:
                r[f"time_once_vs_{lib}"] = r[k]
                r[k] = m["median"]
                r[f"time_reps_vs_{lib}"] = f"{m['n']} points, " + ", ".join(f"{v:.2f}" for v in m["all"])


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, float):
        return "inf" if np.isinf(v) else f"{v:.4g}"
    return str(v)


def targets(s: list[dict], rows: list[dict]) -> list[str]:
    lines = []
    for r in s:
        if r["library"] != OURS:
            continue
        for k in sorted(k for k in r if k.startswith("median_vs_")):
            lib = k[len("median_vs_"):]
            m, t, ds = r[k], r[f"time_vs_{lib}"], r[f"success_vs_{lib}"]
            ok = "met" if m <= 1.02 and t <= 1.0 and ds >= 0 else "not met"
            lines.append(f"- {r['model']}, {r['method']}-{NORM_WORDS[r['norm']]} @{r['budget']} vs {lib} "
                         f"({r[f'points_vs_{lib}']} points): median {m:.3f}x on the points both broke, success "
                         f"{ds:+.3f}, time per point {t:.2f}x"
                         + (f" (interleaved: {r[f'time_reps_vs_{lib}']})" if f"time_reps_vs_{lib}" in r else " (one run)")
                         + f" ({ok}; target <= 1.02x, no lower success, <= 1.0x)")
    at100 = [r for r in rows if r["budget"] == 100]
    best100 = best_distances(at100)
    for model in sorted({r["model"] for r in s}):
        for norm in ("l2", "linf"):
            mine = [r for r in at100 if r["model"] == model and r["norm"] == norm and r["library"] == OURS]
            if not mine:
                continue
            med = {r["name"]: float(np.median(r["dist"])) for r in mine}
            top = min(mine, key=lambda r: med[r["name"]])
            b = float(np.median([best100[(model, norm)][i] for i in top["indices"]]))
            ratio = med[top["name"]] / b if b > 0 else float("nan")
            lines.append(f"- {model}, best of ours in {NORM_WORDS[norm]} at 100 iterations: {top['method']}, median "
                         f"{med[top['name']]:.4g} vs the per-example best of every row at 100 iterations {b:.4g}: "
                         f"{ratio:.3f}x ({'met' if ratio <= 1.05 else 'not met'}; target <= 1.05x)")
    for r in s:
        if r["library"] == OURS and r["method"] == "TR" and r["norm"] == "l2" and r["model"] == "default":
            lines.append(f"- default model, TR-L2 at {r['budget']} iterations (its default: 1000, stopping per example "
                         f"at success): success {r['success_rate']:.4f} on {r['n']} points (target 1.0 at the default)")
    return lines


def plot(s_rows: list[dict], rows: list[dict], model: str, norm: str, budget: int, path: Path) -> Path | None:
    sel = [r for r in rows if r["model"] == model and r["norm"] == norm and r["budget"] == budget]
    if not sel:
        return None
    best = best_distances(rows)[(model, norm)]
    idx = sel[0]["indices"]
    d_best = np.sort([best[i] for i in idx])
    plt = plotstyle.pyplot()
    with plotstyle.style():
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        cols = plotstyle.colors(len(sel))
        hi = float(d_best[np.isfinite(d_best)].max()) * 1.5
        for r, c in zip(sorted(sel, key=lambda r: (r["library"] != OURS, r["method"], r["library"])), cols):
            d = np.sort(np.asarray(r["dist"], dtype=float))
            xs = np.concatenate([[0.0], np.minimum(d, hi)])
            ys = 1 - np.arange(len(xs)) / len(d)
            ax.step(xs, ys, where="post", color=c, linestyle="-" if r["library"] == OURS else "--",
                    label=f"{r['method']} ({'ours' if r['library'] == OURS else r['library']})")
        xs = np.concatenate([[0.0], d_best])
        ax.step(xs, 1 - np.arange(len(xs)) / len(d_best), where="post", color="black", linewidth=2,
                label="Per-example best")
        ax.set_xlim(0, hi)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"Perturbation size ({NORM_WORDS[norm]})")
        ax.set_ylabel("Robust accuracy")
        ax.set_title(f"{model.replace('_', ' ')} model, {budget} iterations, {len(d_best)} points")
        plotstyle.legend(ax, outside=True)
        return plotstyle.save(fig, path)


def write(rows: list[dict], out: Path, meta: dict, timing: list[dict] = ()) -> None:
    s = summarize(rows)
    peer_ratios(s, rows)
    apply_timing(s, timing)
    s.sort(key=lambda r: (r["model"], r["norm"], r["budget"], -np.nan_to_num(r["optimality"], nan=-1)))
    libs = sorted({k[len("median_vs_"):] for r in s for k in r if k.startswith("median_vs_")})
    cols = ["library", "method", "n", "success_rate", "median", "mean", "optimality", "forward_per_example",
            "backward_per_example", "seconds", "load_avg"] + [f"{k}_vs_{lib}" for lib in libs for k in ("median", "success", "time")]
    lines = ["# Minimal-norm attacks against their peer implementations", "",
             "Generated by `benchmarks/minimal_norm.py` (method, budgets and the optimality formula in its docstring). "
             f"Machine: {meta.get('machine', '')}; versions: "
             + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
             + ". Points: the first clean-correct test points of each model, the same for every row of a table. "
             "`median` and `mean` are over each row's successes. Our rows compare with each peer's implementation of "
             "the same method at the same budget on the points both ran: `median_vs_<peer>` is ours / theirs of the "
             "median norm over the points both broke, `success_vs_<peer>` the difference in success rate (ours - "
             "theirs), `time_vs_<peer>` the ratio of seconds per point: the median over interleaved repetitions "
             "(ours, peers, ours, ...) on a subset where the Targets list says so, else the two rows' seconds. `optimality` is AttackBench's (1 = the per-example best over every row of that model "
             "and norm in the run). `load_avg` is the machine's 1-minute load as the row finished: the seconds "
             "of two rows compare fairly only at similar load.", ""]
    if meta.get("missing"):
        lines += [f"Not installed, rows left out: {', '.join(meta['missing'])}.", ""]
    lines += ["## Targets (ratios from this run)", "", *targets(s, rows), ""]
    img = out.parent / "img"
    for model in sorted({r["model"] for r in s}):
        for norm in ("l2", "linf", "l1"):
            for budget in sorted({r["budget"] for r in s}):
                sub = [r for r in s if r["model"] == model and r["norm"] == norm and r["budget"] == budget]
                if not sub:
                    continue
                lines += [f"## {model.replace('_', ' ')} model, {NORM_WORDS[norm]}, {budget} iterations "
                          f"({sub[0]['n']} points)", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in sub]
                img.mkdir(parents=True, exist_ok=True)
                p = plot(s, rows, model, norm, budget, img / f"minimal_norm_{model}_{norm}_{budget}.png")
                if p is not None:
                    lines += ["", f"![{model} {norm} {budget}](img/{p.name})"]
                lines += ["", "Budgets: " + "; ".join(sorted({f"{r['method']} ({r['library']}): {r['note']}" for r in sub})), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": s}, indent=1))
    print("\n".join(targets(s, rows)))
    print(f"wrote {out}")
