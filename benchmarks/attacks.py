"""Attack benchmark: our attacks against torchattacks and foolbox on the default model, in one run.

    .venv/bin/python benchmarks/attacks.py [--n 500] [--device auto] [--out docs/benchmarks.md]

Uses the default model (ResNet-20 on Fashion-MNIST; trained and cached by `python run.py` if needed) and
the first ``--n`` clean-correct evaluation points. For every attack: success rate (among those points),
median / mean L2 and L-inf of the successful perturbations, mean relative L2, forward and backward passes
per example (counted the same way for every library, through a counting proxy of the model), and seconds.
Ratios asked by the targets are computed from numbers measured in this same run:

* TR-L2 vs our CW-L2: median L2 ratio and speed-up;
* our PGD vs torchattacks' PGD (same eps, step, steps, random start): time ratio and robust accuracies;
* each of our attacks vs the bare cost of its passes: a plain autograd loop replaying exactly the passes
  the attack made (every forward pass with its batch size, a backward pass where the attack made one),
  recorded by a tracing proxy ("bookkeeping overhead").

TR runs with ``iterations=1000`` here (it leaves the loop per example on success, so the cap only costs
on points that resist; the config default is 100).

Writes a Markdown table with machine and versions into ``--out`` and the raw numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ROBUSTBENCH_LAB_ROOT", str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from robustbench_lab.core import data as data_mod  # noqa: E402
from robustbench_lab.app.builders import build_attack, build_model, checkpoint_spec, build_defense, train_seed  # noqa: E402
from robustbench_lab.core.attack_base import CountingModel  # noqa: E402
from robustbench_lab.core.cache import CheckpointCache  # noqa: E402
from robustbench_lab.core.model import eval_frozen, predict  # noqa: E402
from robustbench_lab.core.norms import l2, linf  # noqa: E402
from robustbench_lab.core.recipe import Recipe  # noqa: E402
from robustbench_lab.core.train import get_or_train

EPS_LINF = 0.03   # fixed-budget comparison (PGD); small enough that attacks differ on the default model
EPS_L2 = 0.5


def cfg_of(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "robustbench_lab" / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def load_default_model(device):
    cfg = cfg_of([])
    splits = data_mod.load_splits(cfg.data.name, cfg.data.root, False, int(cfg.data.n_val), 10000, 0)
    recipe = Recipe.from_config(cfg.model.train)
    spec = checkpoint_spec(cfg, recipe, build_defense(cfg.defense))
    torch.manual_seed(spec["seed"])
    model = build_model(cfg, splits.card)
    get_or_train(model, spec, splits, recipe, CheckpointCache(Path(cfg.paths.cache_dir) / "checkpoints"),
                 device, train_seed(cfg))
    return model.to(device).eval(), splits


def stats(x, x_adv, y, model, eps=None, norm="l2"):
    with torch.no_grad():
        pred = predict(model, x_adv)
    d = x_adv - x
    n2, ninf = l2(d), linf(d)
    fooled = pred != y
    if eps is not None:
        fooled &= (ninf if norm == "linf" else n2) <= eps * (1 + 1e-5) + 1e-6
    s = fooled
    rel = n2 / l2(x).clamp_min(1e-12)
    f = lambda t: float(t[s].median()) if s.any() else float("nan")  # noqa: E731
    return {"success_rate": float(s.float().mean()), "robust_accuracy": float(1 - s.float().mean()),
            "median_l2": f(n2), "mean_l2": float(n2[s].mean()) if s.any() else float("nan"),
            "median_linf": f(ninf), "mean_linf": float(ninf[s].mean()) if s.any() else float("nan"),
            "mean_rel_l2": float(rel[s].mean()) if s.any() else float("nan")}


class Tracer(torch.nn.Module):
    """Records every forward pass through the model: [batch size, backward passes through its output]."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls: list[list] = []
        self.train(model.training)
        self.bounds = getattr(model, "bounds", (0.0, 1.0))
        self.num_classes = getattr(model, "num_classes", 0)

    def forward(self, x):
        out = self.model(x)
        rec = [x.shape[0], 0]
        self.calls.append(rec)
        if out.requires_grad:
            def hook(g, rec=rec):
                rec[1] += 1          # backward passes through this output (TR's target selection makes several)
                return g
            out.register_hook(hook)
        return out


def bare_cost(model, x, y, calls):
    """Seconds of a plain autograd loop replaying the same passes (same batch sizes, same backward passes):
    the cost of the model evaluations alone, without the attack's bookkeeping."""
    t0 = time.perf_counter()
    with eval_frozen(model, warn_train=False):
        for b, n_backward in calls:
            xb, yb = x[:b], y[:b]
            if n_backward:
                xb = xb.clone().requires_grad_(True)
                loss = F.cross_entropy(model(xb), yb, reduction="sum")
                for i in range(n_backward):
                    (g,) = torch.autograd.grad(loss, xb, retain_graph=i < n_backward - 1)
            else:
                with torch.no_grad():
                    model(xb)
    return time.perf_counter() - t0


def ours(name, overrides, model, x, y, eps, gen_seed=0):
    atk, _ = build_attack(cfg_of([f"attack={name}", *overrides]).attack)
    g = torch.Generator(device=x.device).manual_seed(gen_seed)
    res = atk(model, x, y, eps=eps, generator=g)
    return res, atk


def external(fn, model, x, y):
    counting = CountingModel(model)
    with eval_frozen(model, warn_train=False):
        t0 = time.perf_counter()
        x_adv = fn(counting, x, y)
        sec = time.perf_counter() - t0
    return x_adv.detach().clamp(0, 1), sec, counting.n_forward, counting.n_backward


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--only", default="", help="comma-separated subset of row names (quick looks)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    model, splits = load_default_model(device)
    x_all = data_mod.to_float(splits.x_test[:4000]).to(device)
    y_all = splits.y_test[:4000].to(device)
    ok = predict(model, x_all) == y_all
    x, y = x_all[ok][:a.n], y_all[ok][:a.n]
    n = x.shape[0]
    rows = []
    only = set(filter(None, a.only.split(",")))

    def add(row_name, lib, attack, norm, eps, x_adv, sec, nf, nb, bare=None):
        if only and row_name not in only:
            return
        r = {"row": row_name, "library": lib, "attack": attack, "norm": norm, "eps": eps, "n": n,
             **stats(x, x_adv, y, model, eps, norm), "forward_per_example": nf / n,
             "grad_evals_per_example": nb / n, "seconds": sec}
        if bare is not None:
            r["bare_seconds"] = bare
            r["overhead_ratio"] = sec / bare if bare > 0 else float("nan")
        rows.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)

    def run_ours(row_name, name, overrides, norm, eps):
        if only and row_name not in only:
            return
        tracer = Tracer(model)
        res, atk = ours(name, overrides, tracer, x, y, eps)
        calls = tracer.calls[:-1]          # the last pass is the template's verification (not timed in seconds)
        bare = bare_cost(model, x, y, calls)
        add(row_name, "robustbench_lab", name, norm, eps, res.x_adv, res.seconds, res.n_forward, res.n_backward, bare)

    # --- minimization attacks, L2 -------------------------------------------------------------------------
    run_ours("TR-L2 (order 1)", "trust_region", ["attack.norm=l2", "attack.iterations=1000"], "l2", None)
    run_ours("TR-L2 (order 2)", "trust_region", ["attack.norm=l2", "attack.order=2", "attack.iterations=1000"], "l2", None)
    run_ours("TR-Linf (order 1)", "trust_region", ["attack.norm=linf", "attack.iterations=1000"], "linf", None)
    run_ours("CW-L2 (9 x 100)", "cw", [], "l2", None)
    run_ours("DeepFool-L2", "deepfool", ["attack.norm=l2"], "l2", None)
    run_ours("DeepFool-Linf", "deepfool", ["attack.norm=linf"], "linf", None)
    # --- fixed budget ------------------------------------------------------------------------------------
    run_ours("PGD-Linf-20", "pgd", ["attack.norm=linf", "attack.steps=20"], "linf", EPS_LINF)
    run_ours("PGD-L2-20", "pgd", ["attack.norm=l2", "attack.steps=20"], "l2", EPS_L2)
    run_ours("AutoAttack-Linf (standard)", "autoattack", ["attack.norm=linf"], "linf", EPS_LINF)

    # --- peers ---------------------------------------------------------------------------------------------
    try:
        import torchattacks as ta
        step = 2.5 * EPS_LINF / 20
        if not only or "torchattacks PGD-Linf-20" in only:
            torch.manual_seed(0)
            xa, sec, nf, nb = external(lambda m, xx, yy: ta.PGD(m, eps=EPS_LINF, alpha=step, steps=20,
                                                                  random_start=True)(xx, yy), model, x, y)
            add("torchattacks PGD-Linf-20", "torchattacks", "PGD", "linf", EPS_LINF, xa, sec, nf, nb)
        if not only or "torchattacks PGD-L2-20" in only:
            torch.manual_seed(0)
            xa, sec, nf, nb = external(lambda m, xx, yy: ta.PGDL2(m, eps=EPS_L2, alpha=2.5 * EPS_L2 / 20, steps=20,
                                                                    random_start=True)(xx, yy), model, x, y)
            add("torchattacks PGD-L2-20", "torchattacks", "PGDL2", "l2", EPS_L2, xa, sec, nf, nb)
        if not only or "torchattacks CW-L2 (c=1, 100 steps, no search)" in only:
            xa, sec, nf, nb = external(lambda m, xx, yy: ta.CW(m, c=1, kappa=0, steps=100, lr=0.01)(xx, yy),
                                       model, x, y)
            add("torchattacks CW-L2 (c=1, 100 steps, no search)", "torchattacks", "CW", "l2", None, xa, sec, nf, nb)
        if not only or "torchattacks DeepFool-L2" in only:
            xa, sec, nf, nb = external(lambda m, xx, yy: ta.DeepFool(m, steps=50, overshoot=0.02)(xx, yy), model, x, y)
            add("torchattacks DeepFool-L2", "torchattacks", "DeepFool", "l2", None, xa, sec, nf, nb)
    except ImportError:
        print("torchattacks not installed: skipping its rows", file=sys.stderr)
    try:
        import foolbox as fb

        def fbrun(attack, eps):
            def f(m, xx, yy):
                fm = fb.PyTorchModel(m, bounds=(0, 1), device=xx.device)
                _, clipped, _ = attack(fm, xx, yy, epsilons=eps)
                return clipped
            return f
        for row_name, atk_, norm, eps in [
            ("foolbox CW-L2 (9 x 100)", fb.attacks.L2CarliniWagnerAttack(binary_search_steps=9, steps=100, stepsize=0.01,
                                                                          confidence=0, initial_const=1e-3,
                                                                          abort_early=True), "l2", None),
            ("foolbox DeepFool-L2", fb.attacks.L2DeepFoolAttack(steps=50, candidates=10, overshoot=0.02), "l2", None),
            ("foolbox DeepFool-Linf", fb.attacks.LinfDeepFoolAttack(steps=50, candidates=10, overshoot=0.02), "linf", None),
            ("foolbox PGD-Linf-20", fb.attacks.LinfPGD(rel_stepsize=2.5 / 20, steps=20, random_start=True), "linf",
             EPS_LINF),
        ]:
            if only and row_name not in only:
                continue
            torch.manual_seed(0)
            xa, sec, nf, nb = external(fbrun(atk_, eps), model, x, y)
            add(row_name, "foolbox", type(atk_).__name__, norm, eps, xa, sec, nf, nb)
    except ImportError:
        print("foolbox not installed: skipping its rows", file=sys.stderr)

    write(rows, Path(a.out), device)


def write(rows, out: Path, device):
    by = {r["row"]: r for r in rows}
    ratios = []
    tr, cw = by.get("TR-L2 (order 1)"), by.get("CW-L2 (9 x 100)")
    if tr and cw:
        ratios.append(f"- TR-L2 success {tr['success_rate']:.3f}; median L2 TR / CW = "
                      f"{tr['median_l2'] / cw['median_l2']:.3f} (target <= 1.25); speed-up CW / TR = "
                      f"{cw['seconds'] / tr['seconds']:.1f}x (target >= 20x)")
    p, tp = by.get("PGD-Linf-20"), by.get("torchattacks PGD-Linf-20")
    if p and tp:
        ratios.append(f"- PGD-Linf-20 time ours / torchattacks = {p['seconds'] / tp['seconds']:.3f} (target <= 1); "
                      f"robust accuracy ours {p['robust_accuracy']:.3f} vs torchattacks {tp['robust_accuracy']:.3f} "
                      f"(target: ours <=)")
    fcw = by.get("foolbox CW-L2 (9 x 100)")
    if cw and fcw:
        ratios.append(f"- CW-L2 median L2 ours / foolbox = {cw['median_l2'] / fcw['median_l2']:.3f}; time ours / "
                      f"foolbox = {cw['seconds'] / fcw['seconds']:.3f}")
    over = [f"{r['row']} {r['overhead_ratio']:.2f}" for r in rows if "overhead_ratio" in r]
    if over:
        ratios.append("- time / bare cost of the same passes (target <= 1.10): " + "; ".join(over))
    cols = ["row", "success_rate", "robust_accuracy", "median_l2", "mean_l2", "median_linf", "mean_linf",
            "mean_rel_l2", "grad_evals_per_example", "forward_per_example", "seconds"]
    fmt = lambda v: ("" if v is None or (isinstance(v, float) and np.isnan(v)) else  # noqa: E731
                     (f"{v:.4g}" if isinstance(v, float) else str(v)))
    lines = ["# Attack benchmark", "",
             f"Default model (ResNet-20, Fashion-MNIST, cached checkpoint), {rows[0]['n'] if rows else 0} clean-correct "
             f"test points, one run. Fixed-budget attacks at L-inf {EPS_LINF} / L2 {EPS_L2}; minimization "
             "attacks unbounded (norms of successful perturbations). Machine: "
             f"{platform.machine()}, {os.cpu_count()} CPU cores, device {device}; torch {torch.__version__}, "
             f"Python {platform.python_version()}. Generated by `benchmarks/attacks.py`.", "",
             "## Targets (ratios from this run)", "", *ratios, "",
             "## Table", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print("\n".join(ratios))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
