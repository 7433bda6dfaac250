"""Result writers: metrics.json, the per-example table, a Markdown summary and plots.

Files are first written to a hidden staging folder and then moved into the run directory, with
``metrics.json`` moved last: a run directory that has ``metrics.json`` has complete results; a run killed
before that point has none (a sweep treats it as not done).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from robustbench_lab.core import plotstyle
from robustbench_lab.core.cache import atomic_write_text

METRICS_FILE = "metrics.json"

REQUIRED_METRICS = ("dataset", "model", "defense", "attack", "norm", "eps", "n_examples", "clean_accuracy",
                    "robust_accuracy", "attack_success_rate", "median_l2", "median_linf", "mean_rel_l2",
                    "grad_evals_per_example", "seconds", "seed")


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return None if math.isnan(f) else (str(f) if math.isinf(f) else f)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, torch.Tensor):
        return _json_safe(v.tolist())
    return v


class ResultWriter:
    """Stages files for a run directory and commits them with ``metrics.json`` last."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stage = self.run_dir / ".staging"
        if self.stage.exists():
            shutil.rmtree(self.stage)
        self.stage.mkdir()
        self.files: list[str] = []

    def path(self, name: str) -> Path:
        """A staging path for ``name``; the file appears in the run directory at ``commit``."""
        p = self.stage / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if name not in self.files:
            self.files.append(name)
        return p

    def write_text(self, name: str, text: str) -> Path:
        p = self.path(name)
        p.write_text(text)
        return p

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(_json_safe(obj), indent=2, sort_keys=True))

    def write_table(self, name: str, df: pd.DataFrame) -> Path:
        """Parquet when pyarrow is installed, else CSV; returns the staged path (its suffix tells which)."""
        try:
            import pyarrow  # noqa: F401
            p = self.path(name + ".parquet")
            df.to_parquet(p, index=False)
        except ImportError:
            p = self.path(name + ".csv")
            df.to_csv(p, index=False)
        return p

    def write_csv(self, name: str, df: pd.DataFrame) -> Path:
        p = self.path(name)
        df.to_csv(p, index=False)
        return p

    def final_path(self, name: str) -> Path:
        return self.run_dir / name

    def commit(self, metrics: dict[str, Any]) -> Path:
        for name in self.files:
            dst = self.run_dir / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.stage / name, dst)
        shutil.rmtree(self.stage, ignore_errors=True)
        out = self.run_dir / METRICS_FILE
        atomic_write_text(out, json.dumps(_json_safe(metrics), indent=2, sort_keys=True))
        return out


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(run_dir) / METRICS_FILE
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def summary_markdown(m: dict[str, Any], extra_sections: list[str] | None = None) -> str:
    def f(v: Any, pct: bool = False) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if pct:
            return f"{100 * v:.2f}%"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [
        f"# {m['attack']} vs {m['defense']} on {m['model']} / {m['dataset']}",
        "",
        f"- threat model: {m['norm']}, eps = {f(m['eps'])} (input space, [0, 1] pixels)",
        *([f"- targeted, target {m['target']}: success means predicted as the target; a point is robust unless "
           "an attack moved it to its target"] if m.get("targeted") else []),
        f"- evaluated points: {m['n_examples']} (test-set indices in per_example table), seed {m['seed']}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| clean accuracy | {f(m['clean_accuracy'], True)} |",
        f"| robust accuracy (all points; worst case over attacks) | {f(m['robust_accuracy'], True)} |",
        f"| attack success rate (among clean-correct points) | {f(m['attack_success_rate'], True)} |",
        *([f"| targeted success rate (attacked points predicted as their target) | "
           f"{f(m['targeted_success_rate'], True)} |"] if m.get("targeted") else []),
        f"| median L2 / L-inf of successful perturbations | {f(m['median_l2'])} / {f(m['median_linf'])} |",
        *([f"| median L1 of successful perturbations | {f(m['median_l1'])} |"] if "median_l1" in m else []),
        f"| mean relative L2 perturbation ||d||/||x|| | {f(m['mean_rel_l2'])} |",
        f"| gradient evaluations per attacked example | {f(m['grad_evals_per_example'])} |",
        f"| attack seconds / run seconds | {f(m.get('attack_seconds'))} / {f(m['seconds'])} |",
        f"| device | {m.get('device', '')} |",
        "",
    ]
    if m.get("checks"):
        lines += ["## Sanity checks", "", "| check | fired | detail |", "|---|---|---|"]
        for name, c in m["checks"].items():
            lines.append(f"| {name} (`{c['doc']}`) | {'**YES**' if c['fired'] else 'no'} | "
                         f"{c['message']} |")
        lines.append("")
    for s in extra_sections or []:
        lines += [s, ""]
    return "\n".join(lines)


def plot_examples(path: Path, x: torch.Tensor, x_adv: torch.Tensor, y: np.ndarray, clean_pred: np.ndarray,
                  adv_pred: np.ndarray, class_names: list[str] | None = None, n: int = 8) -> None:
    """Up to ``n`` examples, four to a row: each clean image above its adversarial version, each titled with
    the prediction (red: wrong). ``x``, ``x_adv`` (N, C, H, W) in [0, 1]; ``y`` and the predictions (N,)."""
    n = max(min(n, x.shape[0]), 1)
    cols = min(n, 4)                  # four pairs to a row keep the figure narrow enough to be shown unscaled
    pairs = -(-n // cols)
    name = (lambda c: class_names[c] if class_names and 0 <= c < len(class_names) else str(c))
    wrong, right = plotstyle.colors(2)[::-1]      # vermillion for a misclassified image, blue otherwise
    with plotstyle.style() as plt:
        fig, axes = plt.subplots(2 * pairs, cols, figsize=(1.45 * cols + 0.8, 3.3 * pairs + 0.4), squeeze=False)
        for i in range(pairs * cols):
            for row, img, pred in ((0, x, clean_pred), (1, x_adv, adv_pred)):
                ax = axes[2 * (i // cols) + row][i % cols]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                if i >= n:
                    ax.set_axis_off()
                    continue
                if i % cols == 0:
                    ax.set_ylabel("clean" if row == 0 else "adversarial")
                im = img[i].detach().cpu().float()
                if im.shape[0] == 1:
                    ax.imshow(im[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(im.permute(1, 2, 0).clamp(0, 1).numpy())
                label = name(int(pred[i]))
                ax.set_title(label.replace("/", "/\n", 1) if len(label) > 10 else label,
                             color=right if int(pred[i]) == int(y[i]) else wrong)
        fig.suptitle("Predictions, clean above adversarial; red = misclassified")
        plotstyle.save(fig, path)


def plot_curve(path: Path, curve: pd.DataFrame, title: str, xlabel: str) -> None:
    """Robust accuracy (``curve["robust_accuracy"]``, in [0, 1]) against ``curve["eps"]``."""
    with plotstyle.style() as plt:
        fig, ax = plt.subplots(figsize=(5.0, 3.6))
        ax.plot(curve["eps"], curve["robust_accuracy"], marker="o", ms=3, color=plotstyle.colors(1)[0])
        # callers pass "epsilon (<norm>)": the norm as users write it, the label capitalised like the y axis
        xlabel = re.sub(r"\((\w+)\)", lambda m: f"({plotstyle.words(m.group(1))})", xlabel)
        ax.set_xlabel(xlabel[:1].upper() + xlabel[1:])
        ax.set_ylabel(plotstyle.words("robust_accuracy"))
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(plotstyle.wrap(title, 5.0, 10))
        plotstyle.save(fig, path)
