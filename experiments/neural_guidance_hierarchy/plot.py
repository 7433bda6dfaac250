"""The neural-guidance hierarchy study's table and plots, from finished runs.

    python experiments/neural_guidance_hierarchy/plot.py <sweep dir> [more dirs...] [--out DIR]
    python experiments/neural_guidance_hierarchy/plot.py --table hierarchy_table.csv --out DIR   # redraw only

Run automatically at the end of ``python run.py experiment=neural_guidance_hierarchy`` (the Hydra callback
``WriteHierarchyOnMultirunEnd``); by hand, it re-tabulates any set of finished runs (e.g. several sweeps'
seeds together).

Reads every ``metrics.json`` below the given directories whose defense recorded a neural-guidance analysis
(``defense_config.analysis``: robust accuracy and smoothness per epsilon, RSA) and writes into ``--out``
(default: the first directory):

* ``hierarchy_table.csv`` / ``.md``: one row per arm (mean over seeds when several, with ``<column>_sd`` the
  seed-to-seed sample standard deviation of clean / robust accuracy and smoothness): role (guided level or
  control), target label and ``source_kind`` (``surrogate`` targets carry "(model-derived)"), alpha, predictor
  mode, weight decay, clean accuracy, robust accuracy at every radius, the smoothness score, the RSA, the
  target fit (components, predictor r); the .md shows mean ± 95% t-interval over seeds in each cell;
* ``ng_robust_vs_eps.png``: robust accuracy vs L-inf radius per arm (one colour per arm, controls dashed,
  bars: sd over seeds);
* ``ng_smoothness_by_level.png`` and ``ng_robust_by_level.png``: smoothness score and robust accuracy (at
  ``--eps``) per surrogate level, with the controls as horizontal reference lines.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from robustbench_lab.core import plotstyle, tables

MODEL_DERIVED = "(model-derived)"
NOTE = ("Surrogate targets (source_kind = surrogate) are model-derived: a Gabor filter bank and stages of a "
        "trained network, NOT brain data.")


def _weight_decay(run_dir: Path) -> float | None:
    """The run's recipe weight decay, from Hydra's saved config of the job (absent for non-Hydra runs)."""
    cfg = run_dir / ".hydra" / "config.yaml"
    if not cfg.is_file():
        return None
    from omegaconf import OmegaConf
    try:
        return float(OmegaConf.load(cfg).model.train.weight_decay)
    except Exception:   # an older or hand-made config: the column stays empty
        return None


def _role(dc: dict[str, Any]) -> str:
    mode = (dc.get("predictor") or {}).get("mode", "direct")
    if float(dc.get("alpha", 0.0)) == 0.0:
        return "control: alpha=0"
    if mode in ("random", "shuffled"):
        return f"control: {mode} predictor"
    return "guided" if mode == "direct" else "guided (trained predictor)"


def collect(dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per finished run with a neural-guidance analysis."""
    rows = []
    for d in dirs:
        for p in sorted(Path(d).rglob("metrics.json")):
            if ".staging" in p.parts or "wandb" in p.parts:
                continue
            m = json.loads(p.read_text())
            dc = m.get("defense_config") or {}
            an = dc.get("analysis")
            if not isinstance(an, dict):
                continue
            row: dict[str, Any] = {
                "arm": m.get("defense"), "role": _role(dc), "target": dc.get("target_label"),
                "source_kind": dc.get("source_kind"), "level": dc.get("target_level"), "alpha": dc.get("alpha"),
                "predictor": (dc.get("predictor") or {}).get("mode"), "weight_decay": _weight_decay(p.parent),
                "seed": m.get("seed"), "clean_accuracy": an["robust_accuracy"][0],
                "smoothness_score": an.get("smoothness_score"), "rsa": an.get("rsa"),
                "main_eps": m.get("eps"), "main_robust_accuracy": m.get("robust_accuracy"),
                "n_components": (dc.get("target_fit") or {}).get("n_components"),
                "target_heldout_r": (dc.get("target_fit") or {}).get("target_heldout_r"),
                "run_dir": str(p.parent)}
            if row["role"].startswith("control"):
                row["level"] = None      # a control is no level of the hierarchy (its target: the RSA reference)
            if row["source_kind"] == "surrogate" and row["target"] and MODEL_DERIVED not in row["target"]:
                row["target"] = f"{row['target']} {MODEL_DERIVED}"
            for e, r, s in zip(an["eps"], an["robust_accuracy"], an["smoothness"]):
                if e > 0:
                    row[f"robust@{e:g}"] = r
                    row[f"smooth@{e:g}"] = s
            rows.append(row)
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per arm; guided levels first (by level), then the controls."""
    keys = ["arm", "role", "target", "source_kind", "level", "alpha", "predictor", "weight_decay"]
    num = [c for c in df.columns if c not in keys + ["run_dir", "seed"]]
    g = df.groupby(keys, dropna=False, sort=False)
    out = g[num].mean(numeric_only=True).reset_index()
    radii = sorted((c for c in out.columns if c.startswith(("robust@", "smooth@"))),
                   key=lambda c: (c.split("@")[0], float(c.split("@")[1])))
    out = out[[c for c in out.columns if c not in radii] + radii]
    out.insert(len(keys), "n_seeds", g["seed"].nunique().to_numpy())
    if int(out["n_seeds"].max()) > 1:   # the seed-to-seed spread (sample sd; NaN for an arm run once)
        spread = [c for c in ["clean_accuracy", "smoothness_score"] + radii if not c.startswith("smooth@")]
        sd = g[spread].std(ddof=1).reset_index(drop=True)
        for c in spread:
            out[f"{c}_sd"] = sd[c].to_numpy()
    out["_order"] = [(0 if str(r).startswith("guided") else 1, lv if isinstance(lv, (int, float)) and not
                      math.isnan(lv) else 99) for r, lv in zip(out["role"], out["level"])]
    return out.sort_values("_order").drop(columns="_order").reset_index(drop=True)


def arm_labels(summ: pd.DataFrame) -> list[str]:
    """Each arm in words: a guided arm by its target ("V1-like Gabor bank (model-derived)", with ", trained
    predictor" for one), a control by what it controls for; arm names only where two would read the same."""
    labels = []
    for _, r in summ.iterrows():
        role = str(r["role"])
        if role.startswith("guided"):
            label = str(r["target"]) + (", trained predictor" if role != "guided" else "")
        elif role == "control: alpha=0":
            wd = r.get("weight_decay")
            label = "Control: no guidance (alpha = 0)" + (f", weight decay {wd:g}" if pd.notna(wd) else "")
        else:
            label = "Control: " + role.split(": ", 1)[-1]
        labels.append(label)
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            labels[i] = f"{lab} [{plotstyle.words(summ['arm'].iloc[i])}]"
    return labels


def _sd(summ: pd.DataFrame, col: str) -> pd.Series:
    return summ[f"{col}_sd"] if f"{col}_sd" in summ else pd.Series(np.nan, index=summ.index)


def plots(summ: pd.DataFrame, out: Path, eps: float) -> list[Path]:
    """The three study figures from the per-arm table ``summ`` (means over seeds; ``<column>_sd`` the
    seed-to-seed sd, drawn as bars only where an arm ran with 2+ seeds)."""
    made: list[Path] = []
    eps_cols = sorted((c for c in summ.columns if c.startswith("robust@") and not c.endswith("_sd")),
                      key=lambda c: float(c[7:]))
    radii = np.array([0.0] + [float(c[7:]) for c in eps_cols])
    summ = summ.assign(_label=arm_labels(summ)).reset_index(drop=True)
    guided = summ[summ["role"].str.startswith("guided")]
    colour = dict(zip(summ["_label"], plotstyle.colors(len(summ))))   # one colour per arm in every figure
    n_seeds = summ["n_seeds"] if "n_seeds" in summ else 1
    with plotstyle.style() as plt:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for i, r in summ.iterrows():
            ys = [r["clean_accuracy"]] + [r[c] for c in eps_cols]
            sds = [_sd(summ, "clean_accuracy")[i]] + [_sd(summ, c)[i] for c in eps_cols]
            is_guided = str(r["role"]).startswith("guided")
            ax.plot(radii, ys, marker="o" if is_guided else "s", ms=4, color=colour[r["_label"]],
                    ls="-" if r["role"] == "guided" else ("-." if is_guided else "--"), label=r["_label"])
            plotstyle.seed_errorbars(ax, radii, ys, sds, r.get("n_seeds", 1), colour[r["_label"]])
        ax.set_xlabel("L-inf radius (PGD, [0, 1] pixels)")
        ax.set_ylabel(plotstyle.words("robust_accuracy"))
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(plotstyle.wrap("Neural guidance: robust accuracy against radius (targets are model-derived "
                                    "surrogates; bars: sd over seeds)", 6.4, 10))
        plotstyle.legend(ax)
        made.append(plotstyle.save(fig, out / "ng_robust_vs_eps.png"))

        col = f"robust@{eps:g}"
        for metric, ylabel, name in (("smoothness_score", "Smoothness score (mean squared input-gradient norm;\n"
                                      "lower = smoother)", "ng_smoothness_by_level.png"),
                                     (col, f"Robust accuracy at L-inf {eps:g}", "ng_robust_by_level.png")):
            if metric not in summ:
                print(f"note: no analysis radius {eps:g}; {name} not written (see --eps)", file=sys.stderr)
                continue
            fig, ax = plt.subplots(figsize=(6.4, 4.4))
            direct = guided[guided["role"] == "guided"].sort_values("level")
            xs = np.arange(len(direct))
            c_direct = plotstyle.colors(1)[0]
            several = int(np.max(np.asarray(n_seeds))) > 1 if len(summ) else False
            ax.plot(xs, direct[metric], marker="o", ms=5, color=c_direct,
                    label="Guided (exact targets)" + (", mean ± sd over seeds" if several else ""))
            plotstyle.seed_errorbars(ax, xs, direct[metric], _sd(summ, metric)[direct.index],
                                     direct["n_seeds"] if "n_seeds" in direct else 1, c_direct)
            ax.set_xticks(xs)
            ax.set_xticklabels([str(t).replace(f" {MODEL_DERIVED}", "\n" + MODEL_DERIVED) for t in direct["target"]])
            other = summ.drop(index=direct.index)
            refs = [c for c in plotstyle.colors(len(other) + 1) if c != c_direct]
            for c, (_, r) in zip(refs, other.iterrows()):
                ax.axhline(r[metric], ls="--", lw=1.2, color=c, label=r["_label"])
            ax.set_xlabel("Target level (surrogate hierarchy, model-derived)")
            ax.set_ylabel(ylabel)
            plotstyle.legend(ax)
            made.append(plotstyle.save(fig, out / name))
    return made


CAPTION = ("Per arm: mean over seeds, ± the half-width of the 95% t-interval over seeds where two or more ran "
           "(computed from the seed-to-seed sd columns of hierarchy_table.csv).")


def write_summary(summ: pd.DataFrame, out: Path, eps: float = 0.02) -> dict[str, Path]:
    """Writes hierarchy_table.md and the plots of a per-arm table ``summ`` (``summarize``'s output, or its
    saved CSV) into ``out``; returns the paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    written = {"md": out / "hierarchy_table.md"}
    show = summ[[c for c in summ.columns if not c.startswith("smooth@")]]
    show = tables.with_intervals(show, "_sd", half=tables.t_half_width, n="n_seeds") if "n_seeds" in show else show
    written["md"].write_text(
        "# Neural guidance along the surrogate hierarchy\n\n" + NOTE + "\n\n" + tables.markdown(show, CAPTION) +
        "\nrobust@e: PGD robust accuracy at L-inf radius e (analysis points); smoothness score: mean over the "
        "radii of the mean squared input-gradient norm of the loss at the PGD points (lower = smoother); RSA: "
        "Spearman correlation of the correlation-distance RDMs of the guided layer and of the target source on "
        "held-out test images. For alpha = 0 controls, `target` is only the RSA reference (they train on labels "
        "alone); for the random / shuffled controls it is the source the predictor was built from.\n")
    for p in plots(summ, out, eps):
        written[p.stem] = p
    return written


class NoRunsError(ValueError):
    """No finished run with a neural-guidance analysis below the given directories."""


def write(dirs: Sequence[str | Path], out: str | Path | None = None, eps: float = 0.02) -> dict[str, Path]:
    """Collects the runs below ``dirs`` and writes the table (csv, md) and plots into ``out`` (default: the
    first directory). Returns the written paths by name. Raises FileNotFoundError for a missing directory and
    NoRunsError when no finished run below them carries a neural-guidance analysis."""
    for d in dirs:
        if not Path(d).exists():
            raise FileNotFoundError(f"no such directory: {d}")
    df = collect(dirs)
    if df.empty:
        raise NoRunsError("no finished run with a neural-guidance analysis below " + ", ".join(map(str, dirs)))
    out = Path(out if out is not None else dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    summ = summarize(df)
    summ.to_csv(out / "hierarchy_table.csv", index=False)
    return {"csv": out / "hierarchy_table.csv", **write_summary(summ, out, eps)}


try:   # the Hydra callback (Hydra is installed wherever run.py runs)
    from robustbench_lab.app.callbacks import StudyTableOnMultirunEnd

    class WriteHierarchyOnMultirunEnd(StudyTableOnMultirunEnd):
        """Writes hierarchy_table.csv/.md and the ng_*.png plots into the sweep directory after the last job
        (robustbench_lab/conf/experiment/neural_guidance_hierarchy.yaml); the by-level robust plot uses the run's attack.eps
        when it is one of the analysis radii, else 0.02."""

        what = "neural-guidance hierarchy table"
        script = "experiments/neural_guidance_hierarchy/plot.py"
        expected = (NoRunsError,)   # every cell failed: nothing to tabulate, the sweep's own report says why

        def write(self, sweep: Path, config: Any) -> Path:
            eps = 0.02
            try:
                radii = [float(e) for e in config.defense.analysis.eps]
                if config.attack.eps is not None and float(config.attack.eps) in radii:
                    eps = float(config.attack.eps)
            except Exception:   # a config without these keys: the default radius
                pass
            return write([sweep], eps=eps)["md"]
except ImportError:  # pragma: no cover
    pass


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="*", help="sweep or run directories")
    ap.add_argument("--out", default=None, help="output folder (default: the first directory)")
    ap.add_argument("--eps", type=float, default=0.02, help="radius of robust_by_level.png (one of the analysis radii)")
    ap.add_argument("--table", default=None, help="redraw from a saved hierarchy_table.csv instead (needs --out)")
    a = ap.parse_args(argv)
    if (a.table is None) == (not a.dirs) or (a.table and a.out is None):
        ap.error("give run directories, or --table CSV with --out DIR")
    try:
        w = write_summary(pd.read_csv(a.table), Path(a.out), a.eps) if a.table else write(a.dirs, a.out, a.eps)
    except (FileNotFoundError, NoRunsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {w['md']} and " + ", ".join(p.name for k, p in w.items() if k not in ("csv", "md")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
