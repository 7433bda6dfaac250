"""The trust-region attack: closed-form minimal perturbations on a linear classifier, behaviour on a small
trained CNN (success, smaller norms than fixed-budget attacks, best vs worst target), and its config. The
step-by-step checks against reference implementations are in test_trust_region_reference.py."""

from __future__ import annotations

import pytest
import torch

from attacks.fgsm import FGSM
from attacks.pgd import PGD
from attacks.trust_region import TrustRegion
from robustbench_lab.app.builders import build_attack
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.zoo import LinearClassifier

from conftest import compose

N_CNN = 48   # CNN test points: enough for medians, small enough for 2 shared CPU cores

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: small-batch work runs on one thread


# --------------------------------------------------------------------------------------- linear classifier
@pytest.fixture(scope="module")
def linear():
    """A 10-class linear classifier on 28x28 inputs (mean 0, std 1) and 32 inputs near 0.5, labelled by it."""
    g = torch.Generator().manual_seed(0)
    net = LinearClassifier(1, 10, 784)
    with torch.no_grad():
        net.fc.weight.copy_(torch.randn(10, 784, generator=g) * 0.05)
        net.fc.bias.copy_(torch.randn(10, generator=g) * 0.5)
    model = Classifier(net, (0.0,), (1.0,), 10).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = (0.5 + 0.1 * torch.randn(32, 1, 28, 28, generator=g)).clamp(0.25, 0.75)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def closed_form(model, x, y, q: float) -> torch.Tensor:
    """min_j (z_y - z_j) / ||w_y - w_j||_q: the minimal perturbation (dual norm q) when the box is not binding.

    Also checks that the minimizer stays inside the [0, 1] box, so the formula is exact for these inputs.
    """
    w = model.net.fc.weight                                  # (K, D)
    with torch.no_grad():
        z = model(x)
    wd = w[y][:, None, :] - w[None, :, :]                    # (B, K, D): w_y - w_j
    dist = (z.gather(1, y[:, None]) - z) / wd.norm(p=q, dim=2)
    dist.scatter_(1, y[:, None], float("inf"))
    best, j = dist.min(1)
    direction = -wd[torch.arange(len(y)), j]                 # toward class j
    if q == 2:
        step = direction / direction.norm(dim=1, keepdim=True)
    else:
        step = direction.sign()
    x_min = x.flatten(1) + best[:, None] * step
    assert x_min.min() > 0 and x_min.max() < 1, "closed-form minimizer leaves the box: the test is not exact"
    return best


@pytest.mark.parametrize("norm,q", [("l2", 2.0), ("linf", 1.0)])
def test_first_order_matches_closed_form_on_linear_model(linear, norm, q):
    model, x, y = linear
    res = TrustRegion(norm=norm)(model, x, y)
    assert res.fooled.all()
    ratio = res.norms / closed_form(model, x, y, q)
    # never below the true minimum; overshoot 2% of the last step plus 1e-4 only
    assert ratio.min() >= 1 - 1e-3, float(ratio.min())
    assert ratio.max() <= 1.05, float(ratio.max())


def test_second_order_succeeds_on_linear_model(linear):
    model, x, y = linear
    res = TrustRegion(norm="l2", order=2)(model, x, y)
    assert res.fooled.all()
    ratio = res.norms / closed_form(model, x, y, 2.0)
    assert ratio.min() >= 1 - 1e-3, float(ratio.min())
    # the softmax-margin gradient mixes in the other classes, so the path is not exactly the shortest one
    assert ratio.max() <= 1.25, float(ratio.max())
    assert res.n_backward > TrustRegion(norm="l2")(model, x, y).n_backward   # Hessian-vector products


def test_misclassified_examples_are_returned_unchanged_and_cost_one_check(linear):
    model, x, y = linear
    wrong = torch.zeros(len(y), dtype=torch.bool)
    wrong[::3] = True
    y_bad = torch.where(wrong, (y + 1) % 10, y)             # these start misclassified
    atk = TrustRegion(norm="l2")
    res = atk(model, x, y_bad)
    assert torch.equal(res.x_adv[wrong], x[wrong])
    assert (res.l2[wrong] == 0).all() and res.fooled[wrong].all()
    # the correct ones are attacked exactly as on their own; the others cost only the initial check
    alone = atk(model, x[~wrong], y[~wrong])
    assert torch.equal(res.x_adv[~wrong], alone.x_adv)
    assert res.n_backward == alone.n_backward
    assert res.n_forward == alone.n_forward + int(wrong.sum())


# ------------------------------------------------------------------------------------------ a trained CNN
@pytest.fixture(scope="module")
def cnn_runs(trained_small_cnn, fmnist_small):
    _, _, xt, yt = fmnist_small
    x, y = xt[:N_CNN], yt[:N_CNN]
    with torch.no_grad():
        ok = trained_small_cnn(x).argmax(1) == y
    runs = {(norm, "best"): TrustRegion(norm=norm)(trained_small_cnn, x, y) for norm in ("l2", "linf")}
    runs[("l2", "worst")] = TrustRegion(norm="l2", target="worst")(trained_small_cnn, x, y)
    return x, y, ok, runs


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_cnn_all_clean_correct_points_broken(cnn_runs, norm):
    x, _, ok, runs = cnn_runs
    res = runs[(norm, "best")]
    assert res.fooled[ok].all(), f"{int((~res.fooled[ok]).sum())} of {int(ok.sum())} not broken"
    assert torch.equal(res.x_adv[~ok], x[~ok])               # clean errors are not perturbed
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1


@pytest.mark.parametrize("norm,big_eps", [("l2", 4.0), ("linf", 0.3)])
def test_cnn_norms_smaller_than_a_large_fgsm_adversarial(trained_small_cnn, cnn_runs, norm, big_eps):
    """Foolbox's check: a minimization attack finds smaller norms than a starting adversarial."""
    x, y, ok, runs = cnn_runs
    start = FGSM(norm=norm)(trained_small_cnn, x, y, eps=big_eps)
    both = ok & start.fooled
    assert both.sum() >= ok.sum() // 2
    assert (runs[(norm, "best")].norms[both] < start.norms[both]).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_cnn_median_needs_no_more_than_fixed_budget_attacks(trained_small_cnn, cnn_runs, norm):
    """At TR's median norm, FGM and PGD (fixed budget) break no more points than TR does there."""
    x, y, ok, runs = cnn_runs
    res = runs[(norm, "best")]
    med = float(res.norms[ok].median())
    tr_rate = res.success_at(med)[ok].float().mean()
    assert tr_rate >= 0.5
    fgm = FGSM(norm=norm)(trained_small_cnn, x, y, eps=med).success[ok].float().mean()
    pgd = PGD(norm=norm)(trained_small_cnn, x, y, eps=med,
                         generator=torch.Generator().manual_seed(0)).success[ok].float().mean()
    assert fgm <= tr_rate, (float(fgm), float(tr_rate))
    assert pgd <= tr_rate + 0.05, (float(pgd), float(tr_rate))


def test_cnn_worst_case_target_needs_larger_norms(cnn_runs):
    _, _, ok, runs = cnn_runs
    best, worst = runs[("l2", "best")], runs[("l2", "worst")]
    assert worst.fooled[ok].all()
    assert worst.l2[ok].mean() >= best.l2[ok].mean()


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults_per_norm_and_objective():
    for norm, r in (("linf", 0.001), ("l2", 0.05)):
        atk, eps = build_attack(compose(["attack=trust_region", f"attack.norm={norm}"]).attack)
        assert isinstance(atk, TrustRegion) and eps is None
        assert atk.radius == r and atk.radius_min < atk.radius <= atk.radius_max
        assert atk.config()["objective"] == "logit margin z_t - z_y"
    atk, _ = build_attack(compose(["attack=trust_region", "attack.norm=l2", "attack.order=2"]).attack)
    assert atk.config()["objective"] == "softmax margin p_y - p_t"


@pytest.mark.parametrize("overrides,key", [
    (["attack.order=2"], "attack.norm"),                     # second order with the default linf
    (["attack.order=3"], "attack.order"),
    (["attack.target=median"], "attack.target"),
    (["attack.radius=-1"], "attack.radius"),
    (["attack.radius_min=0.5", "attack.radius_max=0.1"], "attack.radius_min"),
    (["attack.norm=l2", "attack.order=2", "attack.ratio=official"], "attack.ratio"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        build_attack(compose(["attack=trust_region", *overrides]).attack)


def test_eps_scores_minimal_norms(linear):
    model, x, y = linear
    atk = TrustRegion(norm="linf")
    free = atk(model, x, y)
    eps = float(free.norms.median())
    res = atk(model, x, y, eps=eps)
    assert torch.equal(res.x_adv, free.x_adv)                # epsilon does not change the method
    assert torch.equal(res.success, free.fooled & (free.norms <= eps * (1 + 1e-6) + 1e-7))
