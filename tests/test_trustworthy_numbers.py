"""Numbers a reviewer can trust where results are combined: a minimal-norm ensemble keeps each example's
smallest adversarial; the audit sees what an attack returned before the harness clipped it; second-order
costs and the trust-region paper's relative perturbation are stated; an example's random draws depend on
(seed, its id, the attack) and not on batching or on the attacks before it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attacks.pgd import PGD
from robustbench_lab.app.checks import run_checks
from robustbench_lab.core.attack_base import MINIMIZATION, Attack
from robustbench_lab.core.evaluator import attack_points, evaluate, robust_accuracy_curve, summarize
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.norms import Norm


def _linear(seed: int = 0, bounds: tuple[float, float] = (-10.0, 10.0)) -> Classifier:
    """A 2-class linear model on 1x4x4 inputs: the minimal L2 adversarial of x is its projection on the
    hyperplane, at distance |w.x + b| / ||w||."""
    torch.manual_seed(seed)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    return Classifier(lin, (0.0,), (1.0,), 2, bounds=bounds).eval()   # by default a box the steps stay inside


class Overshoot(Attack):
    """Moves each point across the boundary of the linear model, by factor ``near`` of the minimal distance
    on points whose first pixel is below 0.5 and ``far`` on the others (so two instances with swapped factors
    each win on different points)."""

    name = "overshoot"
    family = MINIMIZATION
    supported_norms = (Norm.L2,)

    def __init__(self, *, norm: str = "l2", near: float = 1.05, far: float = 2.0, name: str = "overshoot") -> None:
        super().__init__(norm=norm)
        self.near, self.far, self.name = near, far, name

    def run(self, model, x, y, eps, generator):
        lin = model.model.net[1]
        w = (lin.weight[1] - lin.weight[0]).view(1, -1)
        b = lin.bias[1] - lin.bias[0]
        margin = (x.flatten(1) @ w.T).squeeze(1) + b            # > 0: class 1
        step = -margin / (w.norm() ** 2)                        # to the boundary along w
        factor = torch.where(x.flatten(1)[:, 0] < 0.5, torch.tensor(self.near), torch.tensor(self.far))
        with torch.no_grad():
            model(x)                                            # one counted pass, like a real method
        return x + (factor * step).view(-1, 1, 1, 1) * w.view(1, 1, 4, 4)


def _points(n: int = 200):
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(n, 1, 4, 4, generator=g)
    model = _linear()
    with torch.no_grad():
        y = model(x).argmax(1)                                  # every point clean-correct
    return model, x, y


def _curve(ev, grid):
    pe = ev.per_example()
    norms = np.where(pe["broken_by"].notna(), pe["l2"], np.inf)
    return robust_accuracy_curve(norms, pe["clean_correct"].to_numpy(), grid)["robust_accuracy"].to_numpy()


def test_minimal_norm_ensemble_keeps_each_examples_smallest():
    model, x, y = _points()
    a = Overshoot(near=1.05, far=2.0, name="a")
    b = Overshoot(near=2.0, far=1.05, name="b")
    g = lambda: torch.Generator().manual_seed(0)   # noqa: E731
    ev_a, ev_b = evaluate(model, x, y, [a], None, g()), evaluate(model, x, y, [b], None, g())
    ev = evaluate(model, x, y, [a, b], None, g())
    grid = np.linspace(0, float(ev_a.table["l2"].max()) * 1.1, 60)
    ca, cb, c = _curve(ev_a, grid), _curve(ev_b, grid), _curve(ev, grid)
    assert (c <= ca + 1e-12).all() and (c <= cb + 1e-12).all()
    assert (c < ca).any() and (c < cb).any()
    # every member ran on every clean-correct point, and broken_by names the one with the smaller norm
    assert ev.attack_counts["a"]["attacked"] == ev.attack_counts["b"]["attacked"] == len(y)
    pe = ev.per_example()
    low = (x.flatten(1)[:, 0] < 0.5).numpy()
    assert (pe.loc[low, "broken_by"] == "a").all() and (pe.loc[~low, "broken_by"] == "b").all()
    # the worst-case batch holds those smallest adversarials
    d = (ev.x_adv - x).flatten(1).norm(dim=1).numpy()
    np.testing.assert_allclose(d, np.minimum(ev_a.per_example()["l2"], ev_b.per_example()["l2"]), rtol=1e-5)


def test_ensemble_with_an_epsilon_scores_at_it_and_a_cascade_keeps_its_rule():
    model, x, y = _points()
    a, b = Overshoot(near=1.05, far=2.0, name="a"), Overshoot(near=2.0, far=1.05, name="b")
    d_min = float(evaluate(model, x, y, [a, b], None, torch.Generator()).per_example()["l2"].median())
    ev = evaluate(model, x, y, [a, b], d_min, torch.Generator())
    assert abs(float(ev.robust.float().mean()) - 0.5) < 0.02          # half the points need more than eps
    pgd = PGD(norm="l2", steps=5, step_size=0.2)
    cas = evaluate(model, x, y, [pgd, a], 0.2, torch.Generator())
    assert cas.attack_counts["a"]["attacked"] == int((~cas.table[
        cas.table["attack"] == pgd.name]["success"].to_numpy()).sum())   # fixed-eps first: a runs on the rest


class ForgetsToProject(PGD):
    """A PGD that returns its last step without projecting it: the bug the raw-output audit must catch."""

    name = "pgd_no_projection"

    def run(self, model, x, y, eps, generator):
        return x + 12 * eps * torch.sign(torch.randn(x.shape, generator=generator))


def test_the_audit_sees_an_attack_that_forgets_to_project():
    _, x, y = _points(64)
    model = _linear(bounds=(0.0, 1.0))
    for atk, fires in ((ForgetsToProject(norm="linf"), True), (PGD(norm="linf", steps=5), False)):
        ev = evaluate(model, x, y, [atk], 0.05, torch.Generator().manual_seed(0))
        counts = ev.attack_counts[atk.name]
        (aud,) = [r for r in run_checks(model, x, y, [atk], 0.05, ev.robust, ev.x_adv, ev.n_nan, "none",
                                        torch.Generator(), raw=ev.attack_counts) if r.name == "audit"]
        assert aud.fired is fires, aud.message
        if fires:
            assert counts["raw_ball_violation"] > 0.5 and counts["raw_box_violation"] > 0.2
            assert counts["n_projected"] == 64 and f"BUG in attack {atk.name}" in aud.message
        else:
            assert counts["raw_ball_violation"] <= 1e-6 and counts["n_projected"] == 0


def test_second_order_costs_and_the_papers_relative_perturbation():
    from attacks.trust_region import TrustRegion
    model, x, y = _points(32)
    tr2 = TrustRegion(norm="l2", order=2, iterations=5)
    ev = evaluate(model, x, y, [tr2], None, torch.Generator())
    s = summarize(ev, [tr2], None)
    assert ev.attack_counts[tr2.name]["hvp"] > 0 and s["hvp_per_example"] > 0
    tr1 = TrustRegion(norm="l2", order=1, iterations=5)
    assert summarize(evaluate(model, x, y, [tr1], None, torch.Generator()), [tr1], None)["hvp_per_example"] == 0
    # paper's rho_2: mean over all points of ||d|| / ||x||, 0 for points misclassified before the attack
    pe = ev.per_example()
    if pe["broken_by"].notna().all():
        expect = float((pe["l2"] / x.flatten(1).norm(dim=1).numpy()).mean())
        assert abs(s["paper_rel_l2"] - expect) < 1e-6
    else:
        assert np.isnan(s["paper_rel_l2"])


# -- randomness that does not depend on batching ------------------------------------------------------------
def _random_attacks():
    from attacks.square import Square
    return {"square_linf": (Square(norm="linf", n_queries=40), 0.1),
            "square_l2": (Square(norm="l2", n_queries=40), 1.5),
            "pgd_restarts": (PGD(norm="linf", steps=3, restarts=3), 0.08)}


@pytest.mark.parametrize("which", ["square_linf", "square_l2", "pgd_restarts"])
def test_random_attacks_give_each_example_the_same_result_whatever_the_batch(trained_small_cnn, fmnist_small, which):
    """Per-example results of Square and of PGD with restarts at batch_size 7 and 500, and on a subset of
    the points (as a later cascade member sees them): identical to the bit, and not trivially so (some points
    broken, some not)."""
    atk, eps = _random_attacks()[which]
    x, y = fmnist_small[2][:60], fmnist_small[3][:60]
    ids = torch.arange(1000, 1060)                       # dataset indices, not batch positions
    small = attack_points(trained_small_cnn, atk, x, y, eps, torch.Generator().manual_seed(5), 7, ids=ids)
    large = attack_points(trained_small_cnn, atk, x, y, eps, torch.Generator().manual_seed(5), 500, ids=ids)
    assert 0 < int(small.success.sum()) < int(small.attacked.sum())
    assert torch.equal(small.x_adv, large.x_adv) and torch.equal(small.success, large.success)
    # a subset (every third point, e.g. those still robust after another attack), with another generator
    # object of the same seed that has already been drawn from
    g = torch.Generator().manual_seed(5)
    torch.rand(100, generator=g)
    keep = small.clean_correct & (torch.arange(60) % 3 == 0)
    sub = attack_points(trained_small_cnn, atk, x, y, eps, g, 500, mask=keep, ids=ids)
    assert torch.equal(sub.x_adv[keep], small.x_adv[keep]) and torch.equal(sub.success[keep], small.success[keep])
    other = attack_points(trained_small_cnn, atk, x, y, eps, torch.Generator().manual_seed(6), 500, ids=ids)
    assert not torch.equal(other.x_adv, small.x_adv)      # the seed does change it


def test_cascade_members_do_not_share_draws(trained_small_cnn, fmnist_small):
    """Square alone and Square after PGD in a cascade: on the points Square attacks in both, the same result."""
    from attacks.square import Square
    x, y = fmnist_small[2][:60], fmnist_small[3][:60]
    sq = Square(norm="linf", n_queries=40)
    alone = evaluate(trained_small_cnn, x, y, [sq], 0.1, torch.Generator().manual_seed(2), indices=range(60))
    after = evaluate(trained_small_cnn, x, y, [PGD(norm="linf", steps=2), sq], 0.1,
                     torch.Generator().manual_seed(2), indices=range(60))
    a = alone.table.set_index("index")
    b = after.table[after.table["attack"] == "square"].set_index("index")
    both = b.index[b["attacked"].to_numpy()]
    assert len(both) > 5 and len(both) < int(a["attacked"].sum())   # PGD took some points first
    assert (a.loc[both, "success"] == b.loc[both, "success"]).all()
    assert np.allclose(a.loc[both, "linf"], b.loc[both, "linf"], rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_starts_change_with_the_seed_and_nothing_else(norm):
    """FGSM and PGD with a random start: the start (seen through FGSM's output on a model with zero gradients,
    and PGD's on its first iterate) is a function of (seed, example id): the same under any batching and any
    prior use of the generator; another seed moves every example."""
    from attacks.fgsm import FGSM
    flat = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), (0.0,), (1.0,), 3).eval()
    nn.init.zeros_(flat.net[1].weight)                      # zero gradient: the output is the start itself
    x = 0.5 * torch.ones(20, 1, 4, 4)
    y = torch.zeros(20, dtype=torch.long)
    ids = torch.arange(20) * 7
    for atk in (FGSM(norm=norm, random_start=True), PGD(norm=norm, steps=1, random_start=True)):
        def start(seed, bs, burn=0):
            g = torch.Generator().manual_seed(seed)
            torch.rand(burn, generator=g)
            return attack_points(flat, atk, x, y, 0.2, g, bs, mask=torch.ones(20, dtype=torch.bool), ids=ids).x_adv
        s0 = start(0, 20)
        assert torch.equal(s0, start(0, 3)) and torch.equal(s0, start(0, 20, burn=1000))
        s1 = start(1, 20)
        assert ((s0 - s1).flatten(1).abs().amax(1) > 1e-4).all()   # every example moved
        assert ((s0 - x).flatten(1).abs().amax(1) > 1e-4).all()    # and the start is random, not x
