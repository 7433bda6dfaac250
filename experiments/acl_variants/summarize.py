"""The ACL variants table and plot from a sweep's run directories.

    python experiments/acl_variants/summarize.py <sweep dir> [more dirs] [--out DIR]
    python experiments/acl_variants/summarize.py --table acl_variants.csv --out DIR   # redraw from a saved table

Reads every ``metrics.json`` below the given folders whose defense is ``acl_<variant>_<protocol>``, and the
sidecar of each run's checkpoint (its training history: selected epoch, validation robust accuracy,
pre-training loss and time), and writes ``acl_variants.csv``, ``acl_variants.md`` and ``acl_variants.png``
(clean and robust accuracy per arm: means over seeds, each seed a dot, 95% CI bars where 2+ seeds ran)
into ``--out`` (default: the first folder). Also run automatically at the end of
``python run.py experiment=acl_variants`` (``WriteTableOnMultirunEnd``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import scipy.stats

from robustbench_lab.app.report import table_cli
from robustbench_lab.core import plotstyle, tables

ORDER = ["none", "simclr", "a2a", "a2s", "ds"]
LABELS = {"none": "no pre-training (TRADES from scratch)", "simclr": "SimCLR (standard to standard)",
          "a2a": "ACL A2A", "a2s": "ACL A2S", "ds": "ACL DS (dual stream)"}


def _sidecar(checkpoint: str | None) -> dict[str, Any]:
    if not checkpoint:
        return {}
    p = Path(checkpoint).with_suffix(".json")
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def collect(dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per finished ACL run below ``dirs`` (a directory counted once)."""
    rows, seen = [], set()
    for d in dirs:
        for p in sorted(Path(d).rglob("metrics.json")):
            if ".staging" in p.parts or "wandb" in p.parts or p.resolve() in seen:
                continue
            seen.add(p.resolve())
            m = json.loads(p.read_text())
            cfg = m.get("defense_config") or {}
            if cfg.get("procedure") != "acl":
                continue
            variant = cfg["pretrain"]["variant"]
            hist = _sidecar(m.get("checkpoint")).get("history") or {}
            pre = hist.get("pretrain") or {}
            pre_hist = pre.get("history") or {}
            sel = hist.get("selected_epoch")
            vr = hist.get("val_robust_accuracy") or []
            ft_seconds = (hist["seconds"][-1] - pre.get("seconds", 0.0)) if hist.get("seconds") else float("nan")
            rows.append({
                "arm": variant, "label": LABELS.get(variant, variant), "protocol": cfg["downstream"]["protocol"],
                "seed": m.get("seed"), "n_examples": m.get("n_examples"), "attack": m.get("attack"),
                "eps": m.get("eps"), "clean_accuracy": m.get("clean_accuracy"),
                "robust_accuracy": m.get("robust_accuracy"),
                "selected_epoch": sel, "val_robust_accuracy": vr[sel - 1] if sel and len(vr) >= sel else None,
                "pretrain_final_nt_xent": (pre_hist.get("loss") or [None])[-1],
                "pretrain_seconds": (pre_hist.get("seconds") or [0.0])[-1] if variant != "none" else 0.0,
                "finetune_seconds": ft_seconds, "run_dir": str(p.parent)})
    rows.sort(key=lambda r: (ORDER.index(r["arm"]) if r["arm"] in ORDER else 99, str(r["protocol"]), r["seed"] or 0))
    return rows


COLUMNS = {"label": "pre-training", "protocol": "fine-tuning", "seed": "seed", "clean_accuracy": "clean acc.",
           "robust_accuracy": "PGD-20 robust acc.", "selected_epoch": "selected epoch",
           "val_robust_accuracy": "val. robust acc.", "pretrain_final_nt_xent": "final NT-Xent",
           "pretrain_seconds": "pre-training s", "finetune_seconds": "fine-tuning s"}
FORMATS = {"clean_accuracy": ".3f", "robust_accuracy": ".3f", "val_robust_accuracy": ".3f",
           "pretrain_final_nt_xent": ".3f", "pretrain_seconds": ".1f", "finetune_seconds": ".1f"}


def per_arm(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, protocol) in ``ORDER``: seeds, mean clean and robust accuracy and their 95%
    t-interval half-widths over seeds (NaN for one seed)."""
    rows = []
    for (arm, protocol), g in df.groupby(["arm", "protocol"], sort=False):
        row = {"arm": arm, "label": g["label"].iloc[0], "protocol": protocol, "n_seeds": int(g["seed"].nunique())}
        for c in ("clean_accuracy", "robust_accuracy"):
            x = pd.to_numeric(g[c], errors="coerce").dropna()
            row[c] = float(x.mean())
            row[f"{c}_ci95"] = float(tables.t_half_width(pd.Series([x.std(ddof=1)]), pd.Series([len(x)])).iloc[0]) \
                if len(x) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, path: Path) -> Path:
    """Clean and robust accuracy per arm: bars at the mean over seeds, each seed a dot, the 95% CI as a bar
    only for arms run with 2+ seeds."""
    arms = per_arm(df)
    several = len({(a, p) for a, p in zip(arms["arm"], arms["protocol"])}) != len(arms["arm"].unique())
    ticks = [f"{plotstyle.wrap(lab, 1.3)}" + (f"\n{p}" if several else "") +
             f"\n({n} seed{'s' if n > 1 else ''})"
             for lab, p, n in zip(arms["label"].str.replace(r" \(.*\)$", "", regex=True), arms["protocol"],
                                  arms["n_seeds"])]
    xs = np.arange(len(arms))
    c_clean, c_rob, c_seed = plotstyle.colors(7)[0], plotstyle.colors(7)[1], plotstyle.colors(7)[6]
    attack = plotstyle.words(df["attack"].iloc[0]) if "attack" in df and df["attack"].notna().any() else "attack"
    with plotstyle.style() as plt:
        fig, ax = plt.subplots(figsize=(1.2 * len(arms) + 1.2, 4.4))
        for dx, col, colour, label in ((-0.2, "clean_accuracy", c_clean, "Clean accuracy"),
                                       (0.2, "robust_accuracy", c_rob, f"{attack} robust accuracy")):
            ax.bar(xs + dx, arms[col], 0.4, color=colour, label=label + " (mean over seeds)", zorder=2)
            plotstyle.seed_errorbars(ax, xs + dx, arms[col], arms[f"{col}_ci95"], arms["n_seeds"], "black", zorder=4)
            pos = {(a, p): x for a, p, x in zip(arms["arm"], arms["protocol"], xs)}
            ax.scatter([pos[(a, p)] + dx for a, p in zip(df["arm"], df["protocol"])], df[col], s=14, color=c_seed,
                       zorder=3, label="Each seed" if col == "robust_accuracy" else None)
        ax.set_xticks(xs)
        ax.set_xticklabels(ticks)
        ax.set_ylabel("Accuracy")
        ax.set_ylim(0, 1.0)
        ax.grid(axis="x", visible=False)
        eps = df["eps"].iloc[0] if "eps" in df else None
        ax.set_title(plotstyle.wrap("ACL pre-training variants, same fine-tuning; robust accuracy at L-inf "
                                    f"{eps:g}; bars: 95% CI over seeds where 2+ ran", 1.2 * len(arms) + 1.2, 10))
        plotstyle.legend(ax, outside=True)     # bars fill the axes: a legend inside would sit on them
        return plotstyle.save(fig, path)


ARM_CAPTION = ("Per arm: mean over seeds, ± the half-width of the 95% t-interval over seeds where two or more "
               "ran (one seed: the value alone).")


def write(rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """acl_variants.csv (one row per run), acl_variants.md (per-run table, per-arm means, the DS vs SimCLR
    answer) and acl_variants.png into ``out``; ``rows`` as ``collect`` returns them (or read back from a
    saved acl_variants.csv)."""
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    written = {"csv": out / "acl_variants.csv", "md": out / "acl_variants.md"}
    df.to_csv(written["csv"], index=False)
    first = rows[0] if rows else {}
    lines = ["# ACL variants", "",
             f"{len(rows)} runs; clean and robust accuracy on the same {first.get('n_examples', '?')} test "
             f"points ({first.get('attack', '')}, L-inf eps {first.get('eps', '')}).", ""]
    if rows:
        lines += [tables.markdown(df[list(COLUMNS)], "One row per run.", headers=list(COLUMNS.values()),
                                  formats=FORMATS),
                  tables.markdown(tables.with_intervals(per_arm(df)[["label", "protocol", "n_seeds", "clean_accuracy",
                                                                     "clean_accuracy_ci95", "robust_accuracy",
                                                                     "robust_accuracy_ci95"]]),
                                  ARM_CAPTION, headers=["pre-training", "fine-tuning", "seeds", "clean acc.",
                                                        "PGD-20 robust acc."], formats=FORMATS)]
    rob = {(r["arm"], r["seed"]): r["robust_accuracy"] for r in rows}
    seeds = sorted({sd for (arm, sd) in rob if arm == "ds"} & {sd for (arm, sd) in rob if arm == "simclr"},
                   key=lambda v: (v is None, v))
    lines += ["", verdict(rob, seeds)]
    written["md"].write_text("\n".join(lines) + "\n")
    if rows:
        written["png"] = plot(df, out / "acl_variants.png")
    return written


def verdict(rob: dict[tuple[Any, Any], float], seeds: list[Any]) -> str:
    """DS vs SimCLR in robust accuracy over the seeds both ran: the paired (same seed) difference with its
    95% t-interval; a difference whose interval contains 0 is inconclusive, and so is a single seed."""
    if not seeds:
        return "DS vs SimCLR: not both run."
    diffs = np.array([rob[("ds", sd)] - rob[("simclr", sd)] for sd in seeds])
    ds = float(np.mean([rob[("ds", sd)] for sd in seeds]))
    sc = float(np.mean([rob[("simclr", sd)] for sd in seeds]))
    head = (f"DS vs SimCLR in robust accuracy, seeds {', '.join(map(str, seeds))}: {ds:.3f} vs {sc:.3f}, paired "
            f"difference {diffs.mean():+.3f}")
    if len(diffs) < 2:
        return head + " from one seed: **inconclusive** (no interval)."
    half = float(scipy.stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs)))
    lo, hi = diffs.mean() - half, diffs.mean() + half
    word = "DS higher" if lo > 0 else "SimCLR higher" if hi < 0 else "inconclusive"
    return (head + f" ± {half:.3f} (95% t-interval over {len(diffs)} seeds, sd {diffs.std(ddof=1):.3f}): "
            f"**{word}**.")


def summarize(dirs: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Path]:
    for d in dirs:
        if not Path(d).exists():
            raise FileNotFoundError(f"no such directory: {d}")
    return write(collect(dirs), Path(out if out is not None else dirs[0]))


try:   # the Hydra callback (Hydra is installed wherever run.py runs)
    from robustbench_lab.app.callbacks import StudyTableOnMultirunEnd

    class WriteTableOnMultirunEnd(StudyTableOnMultirunEnd):
        """Writes acl_variants.csv/.md/.png into the sweep directory after the last job."""

        what = "ACL variants table"
        script = "experiments/acl_variants/summarize.py"

        def write(self, sweep: Path, config: Any) -> Path:
            return summarize([sweep])["md"]
except ImportError:  # pragma: no cover
    pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--table" not in argv:
        return table_cli(summarize, argv, __doc__.split("\n")[0])
    ap = argparse.ArgumentParser(description="Redraw the ACL variants table and figure from a saved acl_variants.csv.")
    ap.add_argument("--table", required=True, help="an acl_variants.csv (one row per run)")
    ap.add_argument("--out", required=True, help="output folder")
    a = ap.parse_args(argv)
    rows = pd.read_csv(a.table).astype(object).where(lambda d: d.notna(), None).to_dict("records")
    print(f"wrote {write(rows, Path(a.out))['md']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
