"""The ACL variants table and plot from a sweep's run directories.

    python experiments/acl_variants/summarize.py <sweep dir> [more dirs] [--out DIR]

Reads every ``metrics.json`` below the given folders whose defense is ``acl_<variant>_<protocol>``, and the
sidecar of each run's checkpoint (its training history: selected epoch, validation robust accuracy,
pre-training loss and time), and writes ``acl_variants.csv``, ``acl_variants.md`` and ``acl_variants.png``
(clean and robust accuracy per arm) into ``--out`` (default: the first folder). Also run automatically at the
end of ``python run.py experiment=acl_variants`` (``WriteTableOnMultirunEnd``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from robustbench_lab.app.report import table_cli

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


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write(rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    written = {"csv": out / "acl_variants.csv", "md": out / "acl_variants.md"}
    df.to_csv(written["csv"], index=False)
    cols = [("arm", "pre-training"), ("protocol", "fine-tuning"), ("seed", "seed"), ("clean_accuracy", "clean acc."),
            ("robust_accuracy", "PGD-20 robust acc."), ("selected_epoch", "selected epoch"),
            ("val_robust_accuracy", "val. robust acc."), ("pretrain_final_nt_xent", "final NT-Xent"),
            ("pretrain_seconds", "pre-training s"), ("finetune_seconds", "fine-tuning s")]
    lines = ["# ACL variants", "",
             f"{len(rows)} runs; clean and robust accuracy on the same {rows[0]['n_examples'] if rows else '?'} test "
             f"points ({rows[0]['attack'] if rows else ''}, L-inf eps {rows[0]['eps'] if rows else ''}).", "",
             "| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k], 1 if k.endswith("seconds") else 3) if k != "arm"
                                       else r["label"] for k, _ in cols) + " |")
    rob = {(r["arm"], r["seed"]): r["robust_accuracy"] for r in rows}
    seeds = sorted({sd for (arm, sd) in rob if arm == "ds"} & {sd for (arm, sd) in rob if arm == "simclr"},
                   key=lambda v: (v is None, v))
    if len(seeds) == 1:
        ds, sc = rob[("ds", seeds[0])], rob[("simclr", seeds[0])]
        lines += ["", f"DS >= SimCLR in robust accuracy: **{'yes' if ds >= sc else 'no'}** ({ds:.3f} vs {sc:.3f})."]
    elif len(seeds) > 1:   # the seeds both arms ran: means and the paired (same seed) difference
        import statistics
        diffs = [rob[("ds", sd)] - rob[("simclr", sd)] for sd in seeds]
        ds = statistics.mean(rob[("ds", sd)] for sd in seeds)
        sc = statistics.mean(rob[("simclr", sd)] for sd in seeds)
        lines += ["", f"DS >= SimCLR in robust accuracy, mean over seeds {', '.join(map(str, seeds))}: "
                      f"**{'yes' if ds >= sc else 'no'}** ({ds:.3f} vs {sc:.3f}; paired difference "
                      f"{statistics.mean(diffs):+.3f} +- {statistics.stdev(diffs):.3f} sd over seeds)."]
    written["md"].write_text("\n".join(lines) + "\n")
    if rows:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        labels = [f"{r['arm']}\n{r['protocol']}" + (f" s{r['seed']}" if len({x['seed'] for x in rows}) > 1 else "")
                  for r in rows]
        xs = np.arange(len(rows))
        fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2.5, 3.6))
        ax.bar(xs - 0.2, [r["clean_accuracy"] for r in rows], 0.4, label="clean")
        ax.bar(xs + 0.2, [r["robust_accuracy"] for r in rows], 0.4, label=f"{rows[0]['attack']} robust")
        for x, r in zip(xs, rows):
            ax.text(x + 0.2, r["robust_accuracy"] + 0.01, f"{r['robust_accuracy']:.3f}", ha="center", fontsize=7)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_title("ACL pre-training variants, same fine-tuning", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        written["png"] = out / "acl_variants.png"
        fig.savefig(written["png"], dpi=110)
        plt.close(fig)
    return written


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
    return table_cli(summarize, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
