"""(d) Energy: the share of each propagated perturbation (at a unit's input) in the span of that unit's
top-k right singular vectors, against k / n for a random direction."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse.linalg import ArpackNoConvergence

from robustbench_lab.linearization.analyses.context import Context, Results
from robustbench_lab.linearization.analyses.plots import Caption, plot_energy
from robustbench_lab.linearization.analyses.propagation import Perturbations
from robustbench_lab.linearization.analyses.tables import fmt, markdown_table
from robustbench_lab.linearization.spectra import one_thread, svd_lanczos
from robustbench_lab.linearization.units import get_block, unit_function, unit_input

log = logging.getLogger(__name__)


def top_right_vectors(op: Any, k: int, seed: int = 0, maxiter: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest singular values (descending) of a Jacobian operator and their right singular
    vectors (k, n_in), by Lanczos on jvp / vjp products (ArpackNoConvergence past ``maxiter`` restarts)."""
    with one_thread():
        sp = svd_lanczos(op, k, which="LM", seed=seed, vectors=True, maxiter=maxiter)
    return sp.values, np.asarray(sp.extra["vh"], dtype=np.float64)


def energy(ctx: Context, res: Results, pert: Perturbations) -> None:
    """Share of ||delta||^2 in the top-k right singular subspace of each unit's Jacobian, delta the
    perturbation's difference at the unit input; a random direction has k / n_in on average."""
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
    plot_energy(ctx.writer.path("energy.png"), agg, o.boundaries, o.k, Caption(ctx.label, ctx.block_type),
                ctx.stage_starts(ctx.units), x.shape[0])
    for b in o.boundaries:
        sub = agg[agg["boundary"] == b]
        for kind in ("random", "adversarial"):
            res.metrics[f"energy/{b}/{kind}_mean"] = float(sub[f"{kind}_mean"].mean())
        res.metrics[f"energy/{b}/chance_mean"] = float(sub["chance"].mean())
    lines = [f"## Energy along the units' top-{o.k} right singular vectors ({ctx.block_type})", "",
             "`energy.csv` (one row per boundary x unit: mean / std over images), `energy_per_image.csv`, "
             "`energy.png`. chance = k / n_in, the expected share of a random direction.", ""]
    lines += markdown_table(["boundary", "unit", "random", "adversarial", "chance"],
                            [[r["boundary"], r["unit"], fmt(r.get("random_mean")), fmt(r.get("adversarial_mean")),
                              fmt(r["chance"])] for _, r in agg.iterrows()],
                            f"Mean share of the perturbation's energy in each unit's top-{o.k} subspace.")
    res.sections.append("\n".join(lines))
