"""What the attack benchmarks share: the default model, running one of our attacks or a peer's on the same
points, counting passes the same way for every library, and the statistics of a row."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from robustbench_lab.app.builders import build_attack, build_defense, build_model, checkpoint_spec, train_seed
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.attack_base import CountingModel
from robustbench_lab.core.cache import CheckpointCache
from robustbench_lab.core.model import eval_frozen, predict
from robustbench_lab.core.norms import l2, linf
from robustbench_lab.core.recipe import Recipe
from robustbench_lab.core.train import get_or_train

ROOT = Path(__file__).resolve().parents[1]

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
    counting = CountingModel(model).eval()   # foolbox warns on a module in train mode
    with eval_frozen(model, warn_train=False):
        t0 = time.perf_counter()
        x_adv = fn(counting, x, y)
        sec = time.perf_counter() - t0
    return x_adv.detach().clamp(0, 1), sec, counting.n_forward, counting.n_backward


def foolbox_call(fb, attack, eps):
    """A Foolbox attack as ``f(model, x, y) -> x_adv`` that keeps only its real successes. Where a
    minimization attack found nothing, Foolbox returns a placeholder (CW: an all-zero image) and its success
    flag is whether that placeholder is misclassified, which an all-black image often is. So a point counts
    as broken only if Foolbox reports success and the returned point is not the all-zero placeholder;
    elsewhere the clean input is returned and the row counts a failure."""
    def f(m, xx, yy):
        fm = fb.PyTorchModel(m, bounds=(0, 1), device=xx.device)
        _, clipped, success = attack(fm, xx, yy, epsilons=eps)
        placeholder = (clipped.flatten(1).abs().amax(1) == 0) & (xx.flatten(1).abs().amax(1) > 0)
        real = success & ~placeholder
        return torch.where(real.view(-1, *[1] * (xx.dim() - 1)), clipped, xx)
    return f


