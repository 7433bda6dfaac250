"""L1-APGD (attacks/apgd.py with norm l1; Croce & Hein, "Mind the box", ICML 2021) against the authors'
code (``pyautoattack.autopgd_base`` with norm 'L1'), on the fixture model and real Fashion-MNIST points.

Three levels, as for L-inf and L2 in test_apgd.py: the sparse step and the review interval by hand; from the
same starting point, our iterates follow the authors' trajectory; from our own random starts, the robust
accuracy equals theirs within the seed-to-seed variation of either and is no worse than a plain L1 PGD.
Every point is checked inside the L1 ball and the box by the test itself, and every success is recomputed on
the returned images. Batch independence and targeted mode in L1 are tested with the other norms in
test_apgd.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.apgd import APGD, APGDT, l1_review_every, sparse_direction, targeted_dlr_loss
from robustbench_lab.core.norms import Norm, normalize_grad, project

pyaa = pytest.importorskip("pyautoattack.autopgd_base", reason="pyautoattack is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: small-batch work runs on one thread

# L1 budgets on 28x28 inputs in [0, 1]: 5 breaks about 40% of the fixture model's correct points, 8 about 70%
EPS_SAME_START = 5.0
EPS = 8.0


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def n_robust(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> int:
    """Points still classified correctly on the returned images (clean errors count as broken)."""
    return int((model(x_adv).argmax(1) == y).sum())


def assert_in_l1_ball_and_box(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    """The exact L1 norm of each returned perturbation (in float64, from the float32 values) is at most eps,
    and every pixel lies in [0, 1]."""
    dist = (x_adv.double() - x.double()).flatten(1).abs().sum(1)
    assert (dist <= eps).all(), float(dist.max() - eps)
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.fixture(scope="module")
def pts(fmnist_small):
    _, _, xt, yt = fmnist_small
    return xt, yt


# -- the sparse step and the review interval ---------------------------------------------------------------
def test_sparse_direction_moves_the_top_coordinates_with_unit_l1_norm():
    g = torch.tensor([[0.1, -3.0, 2.0, 0.0, -0.5, 1.0, 2.0, 0.2, -0.3, 0.05]])
    # share 0.2 of 10 coordinates: the 2 largest |g| (3.0 and the two tied 2.0: ties are all kept)
    d = sparse_direction(g, torch.tensor([0.2]))
    assert torch.equal(d, torch.tensor([[0, -1, 1, 0, 0, 0, 1, 0, 0, 0]]) / 3.0)
    d = sparse_direction(g, torch.tensor([0.45]))     # 10 - floor(5.5) = 5 coordinates
    assert torch.equal(d != 0, g.abs() >= 0.5) and d.abs().sum() == pytest.approx(1.0)
    assert torch.equal(sparse_direction(g, torch.tensor([0.0])), torch.tensor([[0, -1.0, 0, 0, 0, 0, 0, 0, 0, 0]]))
    d = sparse_direction(g.repeat(2, 1).view(2, 1, 2, 5), torch.tensor([0.0, 1.0]))   # per-example shares
    assert d.shape == (2, 1, 2, 5) and int((d[0] != 0).sum()) == 1 and int((d[1] != 0).sum()) == 9   # g_3 = 0
    # the authors review every int(0.04 * n_iter) iterations, at least 1
    assert [l1_review_every(n) for n in (100, 1000, 50, 25, 24, 1)] == [4, 40, 2, 1, 1, 1]


# -- from the same start, the authors' trajectory ------------------------------------------------------------
def _authors_run(model, x, y, eps, start_noise, target, targeted):
    """The authors' single L1 run from x + their projection of ``start_noise``: their start is a Gaussian
    draw, so the draw is handed to them (a start passed as ``x_init`` would also change their sparsity
    schedule's initial values)."""
    ref = (pyaa.APGDAttack_targeted if targeted else pyaa.APGDAttack)(model, n_iter=100, norm="L1", eps=eps,
                                                                     device=x.device)
    ref.init_hyperparam(x)
    ref.y_target = target
    randn = torch.randn
    torch.randn = lambda *a, **k: start_noise.clone()
    try:
        _, robust, loss, _ = ref.attack_single_run(x, y)
    finally:
        torch.randn = randn
    return robust.bool(), loss


@pytest.mark.parametrize("targeted", [False, True], ids=["ce", "t"])
def test_same_start_follows_the_authors_trajectory(trained_small_cnn, pts, monkeypatch, targeted):
    """Both codes from the same start (100 clean-correct points, L1 eps 5, 100 iterations; APGD-CE, and
    APGD-T towards the runner-up class).

    With the authors' float32 projection put in place of ours, our step, sparsity and review rules retrace
    their run: equal best loss on at least 90% of the points neither breaks (measured: 55 of 56 for CE, 55
    of 55 for APGD-T), and the same points broken (1 may differ; measured: none differ). A changed detail
    breaks this: a review every 5 iterations instead of 4, a first share of 0.1 instead of 0.2, a division by
    2 instead of 1.5, a step floor of eps / 5, or a reset below 0.90 instead of 0.95 of the last sparsity
    left 9, 6, 6, 30 and 44 of the 56 CE points equal. With our exact projection (float64 sorting) the
    discrete choice of the top coordinates amplifies last-bit differences and the trajectories part
    (measured: 28 of 56 CE points, 26 of 54 APGD-T points equal), but the points broken stay the same
    (measured: none differ for CE, 3 for APGD-T; at most 4 allowed)."""
    m = trained_small_cnn
    xt, yt = pts
    with torch.no_grad():
        ok = m(xt).argmax(1) == yt
        x, y = xt[ok][:100], yt[ok][:100]
        target = m(x).sort(dim=1)[1][:, -2]
    noise = torch.randn(x.shape, generator=gen(11))
    x0 = (x + noise + pyaa.L1_projection(x, noise, EPS_SAME_START)).clamp(0, 1)
    robust_ref, loss_ref = _authors_run(m, x, y, EPS_SAME_START, noise, target, targeted)

    def ours_robust_and_loss(**patch):
        atk = APGDT(norm="l1", n_target_classes=1) if targeted else APGD(norm="l1")
        monkeypatch.setattr(atk, "_start", lambda x_, eps_, rng_: x0.clone())
        for name, fn in patch.items():
            monkeypatch.setattr(atk, name, fn)
        res = atk(m, x, y, eps=EPS_SAME_START, generator=gen())
        with torch.no_grad():
            logits = m(res.x_adv)
        loss = targeted_dlr_loss(logits, y, target) if targeted else F.cross_entropy(logits, y, reduction="none")
        return logits.argmax(1) == y, loss

    robust, loss = ours_robust_and_loss(_project=lambda z, x_, eps_: x_ + (z - x_) + pyaa.L1_projection(x_, z - x_, eps_))
    assert 20 <= int(robust.sum()) <= 90, "the budget must break some points and not all"
    assert int((robust != robust_ref).sum()) <= 1
    both = robust & robust_ref
    same = ((loss - loss_ref).abs() < 1e-4)[both]
    assert same.float().mean() >= 0.9, (int(same.sum()), int(both.sum()))
    robust, _ = ours_robust_and_loss()
    assert int((robust != robust_ref).sum()) <= 4


# -- from our own random starts: robust accuracy -------------------------------------------------------------
@pytest.fixture(scope="module")
def l1_run(trained_small_cnn, pts):
    """Our APGD-CE, L1 eps 8, on the first 200 test points (100 iterations, 1 restart, seed 0)."""
    xt, yt = pts
    x, y = xt[:200], yt[:200]
    return x, y, APGD(norm="l1")(trained_small_cnn, x, y, eps=EPS, generator=gen())


def test_l1_apgd_agrees_with_the_authors(trained_small_cnn, l1_run):
    """Robust accuracy of our L1 APGD-CE and pyautoattack's ``APGDAttack(norm='L1')`` (loss ce, 100
    iterations, 1 restart), L1 eps 8, the same 200 points (clean accuracy 0.805).

    Measured points still robust, seeds 0-9: ours 50, 49, 51, 52, 52, 48, 53, 48, 52, 54 (mean 50.9, standard
    deviation 2.1); the authors' 50, 50, 50, 53, 54, 54, 47, 49, 48, 53 (mean 50.8, 2.5). The largest
    difference between two of these twenty runs is 7 points; the tolerance is 8 (4% of the points), about
    2.5 standard deviations of the difference between one run of each (3.3). Robust accuracy is a coarse view
    (the same-start test above is the sharp one); the plain L1 PGD of the next test leaves 58 to 105."""
    m = trained_small_cnn
    x, y, res = l1_run
    assert_in_l1_ball_and_box(res.x_adv, x, EPS)
    assert res.raw_ball_violation <= 1e-6 and res.raw_box_violation <= 1e-6 and res.n_projected == 0
    with torch.random.fork_rng(devices=[]):
        x_ref = pyaa.APGDAttack(m, n_iter=100, norm="L1", n_restarts=1, eps=EPS, seed=0, loss="ce",
                                device=x.device).perturb(x, y)
    ours, theirs = n_robust(m, res.x_adv, y), n_robust(m, x_ref, y)
    assert n_robust(m, x, y) - theirs >= 80, "the budget breaks too little for a comparison"
    assert abs(ours - theirs) <= 8, (ours, theirs)


def l1_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step: float) -> torch.Tensor:
    """Plain L1 PGD on the CE loss from the clean point: ``steps`` gradient steps of L1 length ``step``
    along grad / ||grad||_1, each followed by the exact projection onto the L1 ball intersected with the box;
    returns the first misclassified iterate of each point, else its last. At most ``steps`` backward passes
    per point."""
    out, x_adv = x.clone(), x.clone()
    todo = torch.arange(x.shape[0])                 # points not yet misclassified: only these are stepped
    for _ in range(steps):
        xa = x_adv[todo].requires_grad_(True)
        logits = model(xa)
        grad = torch.autograd.grad(F.cross_entropy(logits, y[todo], reduction="sum"), xa)[0]
        with torch.no_grad():
            fooled = logits.argmax(1) != y[todo]
            out[todo[fooled]] = xa[fooled]
            x_adv[todo] = project(xa + step * normalize_grad(grad, Norm.L1), x[todo], eps, Norm.L1)
            todo = todo[~fooled]
    out[todo] = x_adv[todo]
    return out


def test_l1_apgd_at_least_as_strong_as_plain_l1_pgd(trained_small_cnn, l1_run):
    """Plain L1 PGD (``l1_pgd``, 100 steps: APGD's budget) at the same eps and points, with its strongest
    step of those measured: steps of 0.05, 0.1, 0.25, 0.5, 1, 2 and 4 eps left 105, 92, 66, 58, 59, 58 and 61
    points robust; 0.5 eps is used. One point of slack for APGD's random start, no more. Our APGD-CE left
    48-54 over seeds 0-9 (previous test). At L1 eps 5 the two are level (PGD's best 93, APGD 87-96 over
    seeds 0-14), at eps 3 APGD leads by 1-2 points (118-119 against 120), and with 20 iterations at eps 5
    by 4 (97 against 101)."""
    m = trained_small_cnn
    x, y, res = l1_run
    x_pgd = l1_pgd(m, x, y, EPS, steps=100, step=0.5 * EPS)
    assert_in_l1_ball_and_box(x_pgd, x, EPS * (1 + 1e-6))
    assert n_robust(m, res.x_adv, y) <= n_robust(m, x_pgd, y) + 1
