"""Assess a model on given points: the attacks as a cascade (or a minimal-norm ensemble), the summary
metrics, the sanity checks; then write the results a run directory holds. Shared by the evaluate task
(``app.evaluate``) and the Python API (``robustbench_lab.api``), so both give the same numbers and files.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from robustbench_lab.app.checks import report as checks_report
from robustbench_lab.app.curve import write_curve
from robustbench_lab.app.checks import run_checks
from robustbench_lab.core.attack_base import MINIMIZATION, Attack
from robustbench_lab.core.evaluator import Evaluation, evaluate, summarize, target_label
from robustbench_lab.core.progress import SILENT, Progress
from robustbench_lab.core.results import ResultWriter, plot_examples, summary_markdown

CHECK_SEED_OFFSET = 1_000_003   # the checks' generator is seeded apart from the attacks'


@dataclasses.dataclass
class Assessment:
    """The evaluation of one model on N points: per-example table, worst-case inputs, metrics, checks."""

    evaluation: Evaluation
    metrics: dict[str, Any]      # summary metrics, per-attack counts and the checks (metrics.json keys)
    x: torch.Tensor              # (N, C, H, W) the evaluated points, in [0, 1]
    y: torch.Tensor              # (N,)
    indices: list[int]           # the points' ids in their dataset
    attacks: list[Attack]
    eps: float | None


def assess(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Sequence[Attack], eps: float | None,
           seed: int, batch_size: int, checks: str, indices: Sequence[int] | None = None,
           progress: Progress = SILENT) -> Assessment:
    """Attack ``model`` (eval mode, on ``x``'s device) on ``x`` (N, C, H, W) in [0, 1] with labels ``y``;
    run the sanity checks of level ``checks``. Randomness comes from generators seeded with ``seed``.
    ``progress``: the banners of the attacks and checks stages and their bars (silent by default)."""
    attacks = list(attacks)
    idx = list(indices) if indices is not None else list(range(x.shape[0]))
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    spec = target_label(attacks)
    progress.stage("attacks", f"{'+'.join(a.name for a in attacks)} ({attacks[-1].norm.value}, "
                   f"{'eps ' + format(eps, 'g') if eps is not None else 'minimal norm'}"
                   f"{', targeted: ' + spec if spec is not None else ''}) on {x.shape[0]} points, "
                   f"batches of {int(batch_size)}")
    ev = evaluate(model, x, y, attacks, eps, gen, batch_size=int(batch_size), indices=idx, progress=progress)
    summ = summarize(ev, attacks, eps)
    progress.stage("checks", f"{checks} (docs/checks/); robust accuracy {summ['robust_accuracy']:.1%}"
                   + (f", targeted success rate {summ['targeted_success_rate']:.1%}" if spec is not None else "")
                   + f" after {summ['attack_seconds']:.1f} s of attacks")
    t_chk = time.time()
    check_gen = torch.Generator(device=x.device).manual_seed(int(seed) + CHECK_SEED_OFFSET)
    chk = checks_report(run_checks(model, x, y, attacks, eps, ev.robust, ev.x_adv, ev.n_nan, str(checks), check_gen,
                                   int(batch_size), table=ev.table, raw=ev.attack_counts, progress=progress))
    chk["checks_seconds"] = time.time() - t_chk
    metrics: dict[str, Any] = {
        "norm": attacks[-1].norm.value, "eps": eps, **summ,
        "attacks": [a.name for a in attacks], "attack_config": {a.name: a.config() for a in attacks},
        "per_attack": {a.name: {**ev.attack_counts[a.name], "seconds": ev.attack_seconds[a.name]} for a in attacks},
        **chk,
    }
    return Assessment(ev, metrics, x, y, idx, attacks, eps)


def write_assessment(writer: ResultWriter, a: Assessment, metrics: dict[str, Any], title: str, dataset: str,
                     class_names: Sequence[str] | None = None) -> list[str]:
    """Stage the per-example table, the evaluated indices, the robust-accuracy curve (minimal-norm attacks)
    and the examples figure into ``writer``; return the summary's extra sections. ``metrics.json`` and
    ``summary.md`` are the caller's (``finish``), so it can add its own fields first."""
    writer.write_table("per_example", a.evaluation.table)
    writer.write_json("eval_indices.json", {"dataset": dataset, "split": "test", "indices": list(a.indices)})
    sections: list[str] = []
    pe = a.evaluation.per_example()
    norm = a.attacks[-1].norm
    if all(atk.family == MINIMIZATION for atk in a.attacks):
        norms = np.where(pe["broken_by"].notna(), pe[norm.value], np.inf)
        spec = target_label(a.attacks)
        write_curve(writer, norms, pe["clean_correct"].to_numpy(),
                    title + (f" (targeted: {spec})" if spec is not None else ""), f"epsilon ({norm.value})", a.eps,
                    stop_at_eps=True)
        sections.append("Robust accuracy vs epsilon (from minimal norms): robust_accuracy_curve.csv/.png")
    sel = np.array(pe.index[pe["broken_by"].notna()].to_numpy()[:8])
    if sel.size == 0:
        sel = np.arange(min(8, len(pe)))
    plot_examples(writer.path("examples.png"), a.x[sel].cpu(), a.evaluation.x_adv[sel].cpu(), pe["label"].to_numpy()[sel],
                  pe["clean_pred"].to_numpy()[sel],
                  np.where(pe["broken_by"].notna(), pe["adv_pred"], pe["clean_pred"]).astype(int)[sel],
                  class_names)
    return sections


def finish(writer: ResultWriter, metrics: dict[str, Any], sections: list[str], t_start: float) -> Any:
    """Time-stamp ``metrics``, write ``summary.md`` and commit the run directory (``metrics.json`` last)."""
    metrics["seconds"] = time.time() - t_start
    metrics["finished_at"] = time.time()
    writer.write_text("summary.md", summary_markdown(metrics, sections))
    return writer.commit(metrics)
