"""The gradient-masking checks of robustbench_lab.app.checks on JumpReLU retrofits of the trained small CNN.

k = 0 is the original network behind JumpReLU modules (and with an undefended source, so the transfer
check runs too): every check stays quiet. A large jump kills the input gradient of a large share of the
points: ``zero_gradients`` fires, and its value is the share of points whose input gradient is exactly
zero, counted here independently. On this network the dead points are almost all misclassified already,
so PGD (random start) stays as strong as Square and as PGD crafted on the original (gray-box): the attack
comparisons correctly stay quiet, and BPDA is no stronger than PGD. A jump above every pre-activation
makes the network constant: every gradient is zero and robust accuracy no longer reaches 0 at a large
epsilon, which ``eps_monotonicity`` flags.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from defenses.jumprelu.retrofit import retrofit
from robustbench_lab.app.builders import build_attack
from robustbench_lab.app.checks import run_checks
from robustbench_lab.core.evaluator import evaluate
from robustbench_lab.core.model import predict
from robustbench_lab.core.norms import l2

from conftest import compose

EPS = 0.1
MASKING = ("zero_gradients", "blackbox_stronger", "transfer_stronger", "eps_monotonicity")


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: small-batch work runs on one thread


@pytest.fixture(scope="module")
def pts(fmnist_small):
    _, _, xt, yt = fmnist_small
    return xt[:64], yt[:64]


def _attack(name: str, *over: str):
    return build_attack(compose([f"attack={name}", f"attack.eps={EPS}", *over]).attack)[0]


def _checks(model, x, y):
    atk = _attack("pgd")
    ev = evaluate(model, x, y, [atk], EPS, torch.Generator().manual_seed(0))
    res = run_checks(model, x, y, [atk], EPS, ev.robust, ev.x_adv, ev.n_nan, "quick",
                     torch.Generator().manual_seed(1))
    return {r.name: r for r in res}, float(ev.robust.float().mean())


def _zero_gradient_share(model, x, y) -> float:
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    return float((l2(g) == 0).float().mean())


def test_k0_retrofit_passes_every_check(trained_small_cnn, pts):
    res, _ = _checks(retrofit(trained_small_cnn, 0.0).eval(), *pts)
    assert set(MASKING) <= set(res)                      # transfer_stronger runs: the source is kept
    fired = [n for n, r in res.items() if r.fired]
    assert fired == [], {n: res[n].message for n in fired}


def test_large_jump_fires_zero_gradients_and_the_attack_comparisons_agree(trained_small_cnn, pts):
    x, y = pts
    model = retrofit(trained_small_cnn, 1.3).eval()
    acc = float((predict(model, x) == y).float().mean())
    assert acc > 0.25                                    # still far above chance (0.1): not a dead network
    res, pgd_ra = _checks(model, x, y)
    zg = res["zero_gradients"]
    assert zg.fired and zg.value["fraction_zero"] > 0.2
    assert zg.value["fraction_zero"] == _zero_gradient_share(model, x, y)
    assert "exactly zero input gradient" in zg.message
    # the comparisons that would expose exploitable masking: quiet, and the numbers agree
    assert not res["blackbox_stronger"].fired and not res["transfer_stronger"].fired
    assert res["blackbox_stronger"].value["square"] >= res["blackbox_stronger"].value["white_box"]
    assert res["transfer_stronger"].value["transfer"] >= res["transfer_stronger"].value["white_box"]
    ok = predict(model, x) == y
    bpda = _attack("pgd_bpda")(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(0))
    assert float((ok & ~bpda.success).float().mean()) >= pgd_ra - 1 / 64
    # the original network has no such points
    assert _zero_gradient_share(trained_small_cnn, x, y) == 0.0


def test_jump_above_every_preactivation_fires_zero_gradients_and_eps_monotonicity(trained_small_cnn, pts):
    x, y = pts
    model = retrofit(trained_small_cnn, 50.0).eval()
    assert predict(model, x).unique().numel() == 1       # a constant classifier
    res, _ = _checks(model, x, y)
    assert res["zero_gradients"].fired and res["zero_gradients"].value["fraction_zero"] == 1.0
    em = res["eps_monotonicity"]
    assert em.fired and em.value["robust_accuracy"][-1] > 0.05 and em.value["eps"][-1] == 0.5
