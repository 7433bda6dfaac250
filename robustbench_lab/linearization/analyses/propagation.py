"""(c) Perturbation propagation: random and adversarial perturbations of equal L2 norm, and how far
each moves every state of the network (stem, unit outputs, logits)."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pandas as pd
import torch

from robustbench_lab.core.attack_base import Attack
from robustbench_lab.core.model import Classifier
from robustbench_lab.linearization.analyses.context import Context, Results
from robustbench_lab.linearization.analyses.plots import Caption, plot_propagation
from robustbench_lab.linearization.analyses.tables import fmt, markdown_table
from robustbench_lab.linearization.units import hidden_states

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Perturbations:
    """Random and adversarial perturbations of the same L2 norm per image; ``x`` (N, C, H, W)."""

    x: torch.Tensor
    d: dict[str, torch.Tensor]            # "random" / "adversarial" -> (N, C, H, W)
    adv_success: np.ndarray               # the attack fooled the model (before any rescaling)
    adv_l2_raw: np.ndarray                # the adversarial norm as the attack returned it
    index: list[int]


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def make_perturbations(ctx: Context, attack: tuple[Attack, float | None]) -> Perturbations:
    """Adversarial d = attack(x) - x; random d Gaussian; both rescaled to the same L2 norm: the adversarial
    norm of each image (``perturbation.l2`` null) or ``perturbation.l2``. Not clipped to the [0, 1] box:
    clipping would change the norms, and the analysis is of the network as a function."""
    atk, eps = attack
    n = ctx.opts.n_images
    x, y = ctx.images.x[:n], ctx.images.y[:n]
    gen = torch.Generator(device=x.device).manual_seed(ctx.seed)
    r = atk(ctx.model, x, y, eps=eps, generator=gen)
    d_adv = (r.x_adv - x).detach()
    raw = _l2(d_adv)
    g2 = torch.Generator(device=x.device).manual_seed(ctx.seed + 7919)
    d_rand = torch.randn(x.shape, generator=g2, device=x.device, dtype=x.dtype)
    target = raw if ctx.opts.perturbation.l2 is None else torch.full_like(raw, ctx.opts.perturbation.l2)
    shape = (-1,) + (1,) * (x.dim() - 1)
    d_rand = d_rand * (target / _l2(d_rand)).view(shape)
    if ctx.opts.perturbation.l2 is not None:
        d_adv = d_adv * (target / raw.clamp_min(1e-30)).view(shape)
    if bool((raw == 0).any()):
        log.warning("the attack left %d image(s) unperturbed; their ratios are NaN", int((raw == 0).sum()))
    return Perturbations(x, {"random": d_rand, "adversarial": d_adv}, r.success.cpu().numpy(), raw.cpu().numpy(),
                         ctx.images.index[:n])


@torch.no_grad()
def _states(model: Classifier, x: torch.Tensor) -> dict[str, torch.Tensor]:
    hs = dict(hidden_states(model, x))
    hs["logits"] = model(x)
    return hs


def propagation(ctx: Context, res: Results, pert: Perturbations) -> None:
    base = _states(ctx.model, pert.x)
    names = list(base)
    stage = {u.name: u.stage + 1 for u in ctx.all_units}   # 1-based, as in the unit names
    rows = []
    for kind, d in pert.d.items():
        moved = _states(ctx.model, pert.x + d)
        prev = _l2(d)
        for j, name in enumerate(names):
            diff = _l2(moved[name] - base[name])
            size = _l2(base[name])
            for i in range(diff.shape[0]):
                rows.append({"image": pert.index[i], "kind": kind, "state_index": j, "state": name,
                             "stage": stage.get(name, 0 if j == 0 else "head"), "input_l2": float(_l2(d)[i]),
                             "diff_l2": float(diff[i]), "state_l2": float(size[i]),
                             "rel_diff": float(diff[i] / size[i]) if size[i] > 0 else math.nan,
                             "gain": float(diff[i] / prev[i]) if prev[i] > 0 else math.nan,
                             "ratio_to_input": float(diff[i] / _l2(d)[i]) if _l2(d)[i] > 0 else math.nan,
                             "adv_success": bool(pert.adv_success[i])})
            prev = diff
    df = pd.DataFrame(rows)
    ctx.writer.write_csv("propagation.csv", df)
    res.tables["propagation"] = df
    np.savez_compressed(ctx.writer.path("perturbations.npz"), x=pert.x.cpu().numpy(),
                        d_random=pert.d["random"].cpu().numpy(), d_adversarial=pert.d["adversarial"].cpu().numpy(),
                        index=np.asarray(pert.index), adv_success=pert.adv_success, adv_l2_raw=pert.adv_l2_raw)
    piv = df.pivot_table(index=["image", "state_index"], columns="kind", values="diff_l2")
    ratio = (piv["adversarial"] / piv["random"]).unstack("state_index")   # (images, states)
    last_unit = names.index(ctx.all_units[-1].name)
    res.metrics["propagation/adv_over_random_stem"] = float(np.nanmedian(ratio[0]))
    res.metrics["propagation/adv_over_random_last"] = float(np.nanmedian(ratio[last_unit]))
    res.metrics["propagation/adv_over_random_logits"] = float(np.nanmedian(ratio[len(names) - 1]))
    res.metrics["propagation/adv_success_rate"] = float(np.mean(pert.adv_success))
    res.metrics["propagation/input_l2_median"] = float(np.median(_l2(pert.d["adversarial"]).cpu().numpy()))
    _plot_propagation(ctx, df, names)
    stage_ends = [names.index(u.name) for k, u in enumerate(ctx.all_units)
                  if k + 1 == len(ctx.all_units) or ctx.all_units[k + 1].stage != u.stage]
    for s_no, j in enumerate(stage_ends, start=1):
        res.metrics[f"propagation/adv_over_random_stage{s_no}_end"] = float(np.nanmedian(ratio[j]))
    lines = [f"## Perturbation propagation ({ctx.block_type}; states = unit outputs, after the post-addition ReLU)",
             "", f"`propagation.csv` (one row per image x kind x state), `propagation.png`, `perturbations.npz`. "
             f"{len(pert.index)} images; the attack fooled {int(pert.adv_success.sum())}; "
             f"median L2 norm of d = {fmt(res.metrics['propagation/input_l2_median'])} "
             f"({'the adversarial norm' if ctx.opts.perturbation.l2 is None else 'fixed'}).", ""]
    median = (lambda j, kind: df[(df["state_index"] == j) & (df["kind"] == kind)]["diff_l2"].median())
    lines += markdown_table(
        ["state", "median L2 of dh, random", "median L2 of dh, adversarial", "median ratio adv/random"],
        [[names[j], fmt(median(j, "random")), fmt(median(j, "adversarial")), fmt(np.nanmedian(ratio[j]))]
         for j in [0] + stage_ends + [len(names) - 1]],
        "How far each perturbation moves the stem, the end of every stage and the logits (medians over images).")
    res.sections.append("\n".join(lines))


def _plot_propagation(ctx: Context, df: pd.DataFrame, names: list[str]) -> None:
    starts = [j - 0.5 for j in range(1, len(names)) if names[j] in {u.name for u in ctx.all_units}
              and (names[j - 1] == "stem" or ctx.stage_of(names[j]) != ctx.stage_of(names[j - 1]))]
    starts.append(len(names) - 1.5)   # the head (pooling + linear layer)
    plot_propagation(ctx.writer.path("propagation.png"), df, names, starts, Caption(ctx.label, ctx.block_type))
