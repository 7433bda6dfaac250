"""Run the selected analyses of a ``Context`` in a fixed order, and the summary of a run."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import pandas as pd

from robustbench_lab.core.attack_base import Attack
from robustbench_lab.linearization.analyses.context import Context, Results
from robustbench_lab.linearization.analyses.energy import energy
from robustbench_lab.linearization.analyses.propagation import Perturbations, make_perturbations, propagation
from robustbench_lab.linearization.analyses.scale_sweep import scale_sweep
from robustbench_lab.linearization.analyses.stage_spectra import stage_spectra
from robustbench_lab.linearization.analyses.tables import fmt, markdown_table
from robustbench_lab.linearization.analyses.unit_spectra import unit_spectra

log = logging.getLogger(__name__)


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


def summary_markdown(m: dict[str, Any], sections: list[str]) -> str:
    """summary.md of a run: its settings from the metrics ``m``, then every analysis' section."""
    lines = [f"# Linearization of {m['model']} ({m['block']}) on {m['dataset']}", "",
             "Rothauge et al., arXiv 1905.13386 (docs/methods.md section 6); experiments/linearization/README.md "
             "says how to read every file.", "",
             *markdown_table(["setting", "value"], [
                 ["unit boundary", f"{m['boundary']} (pre: lambda*S(x) + F(x); post: after the post-addition ReLU)"],
                 ["block type", m["block"]],
                 ["backend / method / k / dtype", f"{m['backend']} / {m['method']} / {m['k']} / {m['dtype']}"],
                 ["tol for 'equal to 1'", m["tol"]],
                 ["images", f"{m['n_images']} correctly classified test points (indices in metrics.json)"],
                 ["units analysed", f"{m['n_units_analysed']} of {m['n_units']}"],
                 ["perturbation attack", f"{m.get('attack')} (L2)"],
                 ["clean accuracy on the evaluation subset",
                  f"{fmt(m.get('clean_accuracy'))} ({m['n_examples']} points)"],
                 ["checkpoint", m.get("checkpoint")]], "The run's settings."), ""]
    return "\n".join(lines + [s + "\n" for s in sections])
