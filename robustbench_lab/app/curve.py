"""Where robustness ends: the robust-accuracy-vs-epsilon curve from one minimal-norm run, beside the run's
fixed-epsilon attacks.

A fixed-epsilon result such as "PGD robust accuracy 0.000 at eps 0.1" says nothing about smaller budgets.
With ``curve=<attack>`` (a minimization attack's config name; the default job uses ``trust_region``) the
evaluate task also runs that attack on every clean-correct point, in the run's norm, and reports robust
accuracy at every epsilon from its per-example minimal norms: ``robust_accuracy_curve.csv/.png`` and a
``curve`` entry in ``metrics.json``. It is an upper bound on robust accuracy at each epsilon (one attack);
the run's own attacks decide the headline number. Runs whose attacks are all minimization attacks already
have their curve, so ``curve`` is not run again for them.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from robustbench_lab.core.attack_base import MINIMIZATION, Attack
from robustbench_lab.core.evaluator import evaluate, robust_accuracy_curve
from robustbench_lab.core.norms import Norm
from robustbench_lab.core.progress import SILENT, Progress
from robustbench_lab.core.results import ResultWriter, plot_curve

log = logging.getLogger(__name__)

CURVE_SEED_OFFSET = 2_000_003   # the curve attack's streams are seeded apart from the run's attacks
# epsilons a reader knows, per norm (input space, [0, 1] pixels); the run's own eps is added
READABLE = {Norm.LINF: (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2), Norm.L2: (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0),
            Norm.L1: (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0)}


def write_curve(writer: ResultWriter, norms: np.ndarray, clean_correct: np.ndarray, title: str, xlabel: str,
                eps: float | None = None, stop_at_eps: bool = False) -> pd.DataFrame:
    """Robust accuracy on 41 epsilons from per-example minimal norms (+inf where not broken), written as
    ``robust_accuracy_curve.csv/.png``. The grid reaches past the 99th percentile of the finite norms; with
    ``eps`` it stops there (``stop_at_eps``) or includes it."""
    finite = norms[np.isfinite(norms)]
    top = float(np.quantile(finite, 0.99)) * 1.1 if finite.size else (eps or 1.0)
    grid = np.linspace(0, top, 41)
    if eps is not None:
        grid = np.linspace(0, float(eps), 41) if stop_at_eps else np.union1d(np.linspace(0, max(top, eps), 41), [eps])
    curve = robust_accuracy_curve(norms, clean_correct, grid)
    writer.write_csv("robust_accuracy_curve.csv", curve)
    plot_curve(writer.path("robust_accuracy_curve.png"), curve, title, xlabel)
    return curve


def needs_curve(attack: Attack | None, attacks: Sequence[Attack]) -> bool:
    return attack is not None and not all(a.family == MINIMIZATION for a in attacks)


def robustness_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, eps: float | None,
                     seed: int, batch_size: int, indices: Sequence[int], writer: ResultWriter,
                     title: str, progress: Progress = SILENT) -> tuple[dict[str, Any], str]:
    """Run minimization ``attack`` on the clean-correct points of ``x`` (N, C, H, W) in [0, 1]; write the curve
    (CSV and plot); return the ``curve`` metrics and a summary section."""
    log.info("curve: %s (%s, minimal norms) on the clean-correct points, for robust accuracy at every epsilon",
             attack.name, attack.norm.value)
    t0 = time.perf_counter()
    # targeted: the run's own seed, so random targets are the run's (the method's streams are salted with
    # the attack's name, so they still differ from the run's attacks')
    gen = torch.Generator(device=x.device).manual_seed(int(seed) + (0 if attack.targeted else CURVE_SEED_OFFSET))
    ev = evaluate(model, x, y, [attack], None, gen, batch_size=batch_size, indices=indices, progress=progress)
    seconds = time.perf_counter() - t0
    pe = ev.per_example()
    mode = f", targeted: {attack.target_spec}" if attack.targeted else ""
    col = attack.norm.value            # the per-example column of the attack's own norm
    norms = np.where(pe["broken_by"].notna(), pe[col], np.inf)
    cc = pe["clean_correct"].to_numpy()
    write_curve(writer, norms, cc, f"{title} ({attack.name}{mode}, minimal norms)", f"epsilon ({attack.norm.value})", eps)
    readable = sorted(set(READABLE[attack.norm]) | ({float(eps)} if eps is not None else set()))
    at = robust_accuracy_curve(norms, cc, readable)
    n_cc = int(cc.sum())
    metrics = {
        "attack": attack.name, "norm": attack.norm.value, "seconds": seconds,
        **({"targeted": True, "target": str(attack.target_spec)} if attack.targeted else {}),
        "success_rate": float(np.isfinite(norms[cc]).mean()) if n_cc else float("nan"),
        f"median_{col}": float(np.median(norms[cc])) if n_cc else float("nan"),
        "robust_accuracy": {f"{e:g}": float(r) for e, r in zip(at["eps"], at["robust_accuracy"])},
    }
    cells = " | ".join(f"{e:g}" for e in at["eps"])
    vals = " | ".join(f"{r:.3f}" for r in at["robust_accuracy"])
    section = "\n".join([
        f"## Robust accuracy vs epsilon ({attack.name}, {attack.norm.value}{mode}, from minimal norms)", "",
        f"Median minimal {attack.norm.value} perturbation {metrics[f'median_{col}']:.4g} over the {n_cc} clean-correct "
        f"points ({attack.name} broke {metrics['success_rate']:.1%} of them, {seconds:.1f} s). One attack's minimal "
        "norms give an upper bound on robust accuracy at each epsilon. Plot: robust_accuracy_curve.png.", "",
        f"| epsilon | {cells} |", "|---" * (len(at) + 1) + "|", f"| robust accuracy | {vals} |"])
    return metrics, section
