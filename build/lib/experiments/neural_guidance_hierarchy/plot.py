"""The neural-guidance hierarchy study's table and plots, from finished runs.

    python experiments/neural_guidance_hierarchy/plot.py <sweep dir> [more dirs...] [--out DIR]

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
  target fit (components, predictor r);
* ``ng_robust_vs_eps.png``: robust accuracy vs L-inf radius per arm (guided levels coloured by level, controls
  grey/dashed);
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

import pandas as pd

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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for _, r in df.iterrows()]
    return "\n".join(lines) + "\n"


def plots(summ: pd.DataFrame, out: Path, eps: float) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    eps_cols = sorted((c for c in summ.columns if c.startswith("robust@") and not c.endswith("_sd")),
                      key=lambda c: float(c[7:]))
    radii = [0.0] + [float(c[7:]) for c in eps_cols]
    guided = summ[summ["role"].str.startswith("guided")]
    controls = summ[~summ["role"].str.startswith("guided")]
    cmap = plt.get_cmap("viridis")
    levels = sorted({lv for lv in guided["level"] if pd.notna(lv)})

    def colour(lv: Any) -> Any:
        return cmap(levels.index(lv) / max(len(levels) - 1, 1)) if lv in levels else "tab:red"

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for _, r in guided.iterrows():
        ax.plot(radii, [r["clean_accuracy"]] + [r[c] for c in eps_cols], marker="o", ms=3, color=colour(r["level"]),
                ls="-" if r["role"] == "guided" else "-.", label=f"{r['arm']}")
    for i, (_, r) in enumerate(controls.iterrows()):
        ax.plot(radii, [r["clean_accuracy"]] + [r[c] for c in eps_cols], marker="s", ms=3, ls="--",
                color=str(0.15 + 0.6 * i / max(len(controls) - 1, 1)), label=f"{r['arm']} [{r['role']}]")
    ax.set_xlabel("L-inf radius (PGD, [0, 1] pixels)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title("Neural guidance: robust accuracy vs radius\n(targets are model-derived surrogates)", fontsize=9)
    fig.tight_layout()
    made.append(out / "ng_robust_vs_eps.png")
    fig.savefig(made[-1], dpi=120)
    plt.close(fig)

    col = f"robust@{eps:g}"
    for metric, ylabel, name in (("smoothness_score", "smoothness score (mean sq. input-gradient norm;\nlower = "
                                  "smoother)", "ng_smoothness_by_level.png"),
                                 (col, f"robust accuracy at L-inf {eps:g}", "ng_robust_by_level.png")):
        if metric not in summ:
            print(f"note: no analysis radius {eps:g}; {name} not written (see --eps)", file=sys.stderr)
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        direct = guided[guided["role"] == "guided"].sort_values("level")
        sd = direct.get(f"{metric}_sd")
        ax.errorbar(range(len(direct)), direct[metric], yerr=None if sd is None else sd.fillna(0.0), marker="o",
                    color="tab:blue", capsize=3,
                    label="guided (exact targets)" + ("" if sd is None else ", mean ± sd over seeds"))
        ax.set_xticks(range(len(direct)))
        ax.set_xticklabels([str(t).replace(f" {MODEL_DERIVED}", "\n" + MODEL_DERIVED) for t in direct["target"]],
                           fontsize=7)
        other = pd.concat([guided[guided["role"] != "guided"], controls])
        for i, (_, r) in enumerate(other.iterrows()):
            ax.axhline(r[metric], ls="--", lw=1, color=f"C{(i + 1) % 10}", label=f"{r['arm']} [{r['role']}]")
        ax.set_xlabel("target level (surrogate hierarchy, model-derived)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        made.append(out / name)
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    return made


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
    written = {"csv": out / "hierarchy_table.csv", "md": out / "hierarchy_table.md"}
    summ.to_csv(written["csv"], index=False)
    show = summ[[c for c in summ.columns if not c.startswith("smooth@")]]
    written["md"].write_text(
        "# Neural guidance along the surrogate hierarchy\n\n" + NOTE + "\n\n" + to_markdown(show) +
        "\nrobust@e: PGD robust accuracy at L-inf radius e (analysis points); smoothness_score: mean over the "
        "radii of the mean squared input-gradient norm of the loss at the PGD points (lower = smoother); rsa: "
        "Spearman correlation of the correlation-distance RDMs of the guided layer and of the target source on "
        "held-out test images. For alpha = 0 controls, `target` is only the RSA reference (they train on labels "
        "alone); for the random / shuffled controls it is the source the predictor was built from.\n")
    for p in plots(summ, out, eps):
        written[p.stem] = p
    return written


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
    ap.add_argument("dirs", nargs="+", help="sweep or run directories")
    ap.add_argument("--out", default=None, help="output folder (default: the first directory)")
    ap.add_argument("--eps", type=float, default=0.02, help="radius of robust_by_level.png (one of the analysis radii)")
    a = ap.parse_args(argv)
    try:
        w = write(a.dirs, a.out, a.eps)
    except (FileNotFoundError, NoRunsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {w['md']} and " + ", ".join(p.name for k, p in w.items() if k not in ("csv", "md")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
