"""CW-L2, CW-L-inf and DeepFool: closed-form minimal perturbations on a linear classifier, agreement with
Foolbox's reference CW-L2 at the same budget, the minimization contract (CW keeps its smallest
adversarial, so its norms never grow over the binary search; points misclassified on arrival come back
unchanged), and CW-L-inf's loss checked against the CW margin's gradient worked out by hand."""

from __future__ import annotations

import time

import pytest
import torch

from attacks.cw import CarliniWagnerL2, CWLinf
from attacks.deepfool import DeepFool
from attacks.fgsm import FGSM
from robustbench_lab.app.builders import build_attack
from robustbench_lab.core.attack_base import margin_loss
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.norms import Norm
from robustbench_lab.core.zoo import LinearClassifier

from conftest import compose

# The Foolbox comparison budget: reduced from the defaults (9 x 100) so that both runs fit in ~20 s.
CMP_BUDGET = dict(binary_search_steps=5, steps=50, initial_const=1e-3, lr=0.01, confidence=0.0,
                  abort_early=True)
N_CMP = 100


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: small-batch work runs on one thread


# ------------------------------------------------------------------------------------- linear classifier
@pytest.fixture(scope="module")
def linear():
    """A 4-class linear classifier on 1x8x8 inputs near 0.5, with its closed-form minimal perturbations.

    Rows of W are orthogonal with equal norms, so ||w_y - w_j|| is the same for every pair and the class
    with the second-highest logit is also the closest boundary: CW follows the gradient of the runner-up's
    margin and, being a local method, otherwise stops at the runner-up's hyperplane (with random rows one
    point in 40 ended 8.8% above the global minimum, at the runner-up's boundary). Inputs sit along the
    class directions, so every class is represented and the distances are 0.1-0.35 (L2).
    """
    g = torch.Generator().manual_seed(0)
    d, k, b = 64, 4, 40
    w = 3.0 * torch.linalg.qr(torch.randn(d, k, generator=g)).Q.T          # (k, d), orthogonal rows
    net = LinearClassifier(1, k, d)
    with torch.no_grad():
        net.fc.weight.copy_(w)
        net.fc.bias.copy_(-0.5 * w.sum(1))                                 # decision regions meet at 0.5
    model = Classifier(net, (0.0,), (1.0,), k).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cls = torch.arange(b) % k
    scale = 0.3 + 0.7 * torch.rand(b, 1, generator=g)
    x = 0.5 + 0.5 * scale * w[cls] / w[cls].norm(dim=1, keepdim=True) + 0.02 * torch.randn(b, d, generator=g)
    x = x.view(b, 1, 8, 8)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    assert torch.bincount(y, minlength=k).min() > 0
    minimal, inside = {}, {}
    for norm in (Norm.L2, Norm.LINF):
        diff = w[None] - w[y][:, None, :]                                  # (b, k, d): w_j - w_y
        dist = (z.gather(1, y[:, None]) - z) / diff.norm(p=norm.dual, dim=2).clamp_min(1e-12)
        dist[torch.arange(b), y] = float("inf")
        dmin, j = dist.min(1)
        wd = diff[torch.arange(b), j]
        step = wd / wd.norm(dim=1, keepdim=True) if norm is Norm.L2 else wd.sign()
        x_min = x.flatten(1) + dmin[:, None] * step                         # the minimizer itself
        minimal[norm] = dmin
        inside[norm] = bool((x_min.min() > 0) & (x_min.max() < 1))
    return model, x, y, minimal, inside


@pytest.mark.parametrize("attack", [DeepFool(norm="l2"), DeepFool(norm="linf"), CarliniWagnerL2()],
                         ids=["deepfool-l2", "deepfool-linf", "cw-l2"])
def test_linear_closed_form(linear, attack):
    model, x, y, minimal, inside = linear
    assert inside[attack.norm], "the closed-form minimizer must lie in the box for it to be the minimum"
    res = attack(model, x, y)
    assert res.fooled.all()
    ratio = res.norms / minimal[attack.norm]
    # never below the true minimum (float slack), and within 5% of it
    assert ratio.min() >= 1 - 1e-4, float(ratio.min())
    assert ratio.max() <= 1.05, float(ratio.max())


# ------------------------------------------------------------------------------- CW's binary search
def _search_states(model, x, y, max_steps, **kwargs):
    """Per example, the L2 norm CW returns after 1, 2, ..., ``max_steps`` binary-search steps (+inf where
    nothing was found), as a (max_steps, B) tensor.

    Runs the attack once per step count and checks that each run is the start of the next (the inputs of
    every forward pass but the template's final check are identical, in order), so that row k is the state
    of one search after k steps. Needs ``max_steps`` <= 9: from 10 steps on, the last step reuses the
    smallest successful constant and the runs stop being prefixes of each other.
    """
    assert max_steps <= 9
    states, previous = [], None
    for k in range(1, max_steps + 1):
        seen = []
        hook = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        try:
            res = CarliniWagnerL2(binary_search_steps=k, **kwargs)(model, x, y)
        finally:
            hook.remove()
        seen.pop()                                      # the template's verification pass
        if previous is not None:
            assert len(seen) > len(previous)
            assert all(torch.equal(a, b) for a, b in zip(previous, seen)), f"{k} steps do not extend {k - 1}"
        previous = seen
        states.append(torch.where(res.fooled, res.l2, torch.full_like(res.l2, float("inf"))))
    return torch.stack(states)


@pytest.mark.parametrize("case", ["linear", "cnn"])
def test_cw_norms_never_increase_over_binary_search_steps(request, case):
    """Per example, the norm CW returns after k + 1 binary-search steps is at most the one after k: a later
    search step (another constant c) may only replace the adversarial by a smaller one. Non-trivial here:
    points are found at different steps and many norms shrink after they are first found."""
    if case == "linear":
        model, x, y, _, _ = request.getfixturevalue("linear")
        norms = _search_states(model, x, y, 9)
    else:   # a few points at a small budget (lr raised so that most are found within it)
        model = request.getfixturevalue("trained_small_cnn")
        _, _, xt, yt = request.getfixturevalue("fmnist_small")
        x, y = xt[:24], yt[:24]
        norms = _search_states(model, x, y, 7, steps=30, lr=0.05)
    later, earlier = norms[1:], norms[:-1]
    grew = later > earlier
    assert not grew.any(), f"{int(grew.sum())} norms grew from one search step to the next: " \
        f"{[(int(k) + 2, int(i)) for k, i in grew.nonzero()[:5]]} (search step, example)"
    found = torch.isfinite(norms)
    assert found[-1].sum() >= 0.75 * len(y)
    assert (found[-1] & ~found[0]).any()                                   # found only after c has grown
    assert ((later < earlier) & torch.isfinite(earlier)).sum() >= 10       # refined after first found


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_bisection_reaches_the_closed_form(linear, norm):
    """With the bisection (default) DeepFool's norm is the closed-form minimum within 1e-3 relative
    (measured: 6e-5 at most); without it the overshoot of the accumulated step shows (2.0-2.7% above)."""
    model, x, y, minimal, inside = linear
    assert inside[Norm.parse(norm)]
    res = DeepFool(norm=norm)(model, x, y)
    plain = DeepFool(norm=norm, bisection_steps=0)(model, x, y)
    assert res.fooled.all() and plain.fooled.all()
    ratio, ratio0 = res.norms / minimal[res.norm], plain.norms / minimal[res.norm]
    assert ratio.min() >= 1 - 1e-4, float(ratio.min())
    assert ratio.max() <= 1 + 1e-3, float(ratio.max())
    assert ratio0.min() > 1 + 1e-3                          # what the bisection removed
    assert (res.norms <= plain.norms).all()


def test_deepfool_counts_on_linear(linear):
    """A linear model is solved in one step. The clean pass serves the check, the candidates and the first
    step (c - 1 backward passes); one forward pass at the new point finds it fooled; the bisection adds its
    forward passes; no point is passed forward twice."""
    model, x, y, _, _ = linear
    k, b = model.num_classes, x.shape[0]
    for steps in (10, 0):
        seen = []
        hook = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        try:
            res = DeepFool(norm="l2", bisection_steps=steps)(model, x, y)
        finally:
            hook.remove()
        seen.pop()                                          # the template's verification pass
        assert [s.shape[0] for s in seen] == [b] * (2 + steps)
        assert res.n_forward == (2 + steps) * b
        assert res.n_backward == (k - 1) * b
        rows = torch.cat([s.flatten(1) for s in seen])
        assert torch.unique(rows, dim=0).shape[0] == rows.shape[0], "some point was passed forward twice"


# ------------------------------------------------------------------------------- against the reference
@pytest.fixture(scope="module")
def cmp_batch(trained_small_cnn, fmnist_small):
    _, _, xt, yt = fmnist_small
    x, y = xt[:N_CMP], yt[:N_CMP]
    with torch.no_grad():
        ok = trained_small_cnn(x).argmax(1) == y
    return x, y, ok


@pytest.fixture(scope="module")
def ours_cw(trained_small_cnn, cmp_batch):
    x, y, _ = cmp_batch
    t0 = time.perf_counter()
    res = CarliniWagnerL2(**CMP_BUDGET)(trained_small_cnn, x, y)
    return res, time.perf_counter() - t0


def _median_radius(norms: torch.Tensor, found: torch.Tensor, ok: torch.Tensor) -> float:
    """Median over the clean-correct points of the norm found, +inf where the attack found nothing."""
    return torch.where(found, norms, torch.full_like(norms, float("inf")))[ok].median().item()


def test_cw_matches_foolbox(trained_small_cnn, cmp_batch, ours_cw):
    fb = pytest.importorskip("foolbox")
    x, y, ok = cmp_batch
    ours, t_ours = ours_cw
    fmodel = fb.PyTorchModel(trained_small_cnn, bounds=(0, 1))
    b = CMP_BUDGET
    ref = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=b["binary_search_steps"], steps=b["steps"],
                                           stepsize=b["lr"], confidence=b["confidence"],
                                           initial_const=b["initial_const"], abort_early=b["abort_early"])
    t0 = time.perf_counter()
    _, adv, success = ref(fmodel, x, y, epsilons=None)
    t_ref = time.perf_counter() - t0
    ref_l2 = (adv - x).flatten(1).norm(dim=1)
    # Foolbox returns an all-zero image where it found nothing (which may happen to be misclassified)
    ref_found = success & (adv.flatten(1).abs().amax(1) > 0)
    ours_found = ours.fooled
    both = ok & ours_found & ref_found
    print(f"\nCW-L2 {b['binary_search_steps']}x{b['steps']} on {int(ok.sum())} clean-correct points: "
          f"success ours {ours_found[ok].float().mean():.3f} foolbox {ref_found[ok].float().mean():.3f}; "
          f"median L2 on both ours {ours.l2[both].median():.4f} foolbox {ref_l2[both].median():.4f}; "
          f"time ours {t_ours:.1f}s foolbox {t_ref:.1f}s")
    assert ours_found[ok].float().mean() >= ref_found[ok].float().mean() - 0.02
    assert both.sum() >= 0.5 * ok.sum()
    assert ours.l2[both].median() <= 1.05 * ref_l2[both].median()
    assert _median_radius(ours.l2, ours_found, ok) <= 1.05 * _median_radius(ref_l2, ref_found, ok)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_matches_foolbox(trained_small_cnn, cmp_batch, norm):
    """Same steps, candidates and overshoot as Foolbox's DeepFool; ours stops each example once fooled
    (Foolbox keeps stepping every example until the whole batch is fooled), so ours is never larger."""
    fb = pytest.importorskip("foolbox")
    x, y, ok = cmp_batch
    x, y, ok = x[:30], y[:30], ok[:30]
    ours = DeepFool(norm=norm, steps=50, candidates=10, overshoot=0.02)(trained_small_cnn, x, y)
    cls = fb.attacks.L2DeepFoolAttack if norm == "l2" else fb.attacks.LinfDeepFoolAttack
    fmodel = fb.PyTorchModel(trained_small_cnn, bounds=(0, 1))
    _, adv, success = cls(steps=50, candidates=10, overshoot=0.02)(fmodel, x, y, epsilons=None)
    ref = (adv - x).flatten(1).norm(p=Norm.parse(norm).p, dim=1)
    print(f"\nDeepFool-{norm} on {int(ok.sum())} points: median ours {ours.norms[ok].median():.4f} "
          f"foolbox {ref[ok].median():.4f}")
    assert ours.fooled[ok].all() and success[ok].all()
    assert ours.norms[ok].median() <= 1.05 * ref[ok].median()


def test_cw_keeps_smallest_and_leaves_misclassified(trained_small_cnn, cmp_batch, ours_cw):
    """Foolbox-style minimization test: CW's norms are at most those of a large-eps FGSM adversarial on the
    points both fool; points misclassified on arrival come back bit-identical."""
    x, y, ok = cmp_batch
    ours, _ = ours_cw
    start = FGSM(norm="l2")(trained_small_cnn, x, y, eps=4.0)
    both = ok & ours.fooled & start.fooled
    print(f"\nFGSM-L2 eps 4 fooled {int(start.fooled[ok].sum())}/{int(ok.sum())}; on {int(both.sum())} fooled by both, "
          f"median L2 CW {ours.l2[both].median():.3f} FGSM {start.l2[both].median():.3f}")
    assert both.sum() >= 0.5 * ok.sum()
    assert (ours.l2[both] <= start.l2[both]).all()
    assert (~ok).any()
    assert torch.equal(ours.x_adv[~ok], x[~ok])
    assert torch.equal(ours.l2[~ok], torch.zeros(int((~ok).sum())))


def test_deepfool_leaves_misclassified_unchanged(trained_small_cnn, cmp_batch):
    x, y, ok = cmp_batch
    res = DeepFool(norm="linf", steps=3)(trained_small_cnn, x[:32], y[:32])
    mis = ~ok[:32]
    assert mis.any()
    assert torch.equal(res.x_adv[mis], x[:32][mis])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_bisected_points_are_adversarial_in_the_box_and_no_farther(trained_small_cnn, cmp_batch, norm):
    """On the CNN: every returned point is adversarial by the template's own forward pass, inside the box as
    returned, and no farther from x than the crossing iterate returned without bisection, example by
    example, and nearer for a quarter at least. (DeepFool's iterates converge onto the boundary, so its last
    step is often a stall step of ~1e-4 whose adversarial end already is the nearest point a probe could
    beat: measured 47-53% (L2) and 97% (L-inf) of these points nearer.) Over several steps each forward pass
    is at a new point (the next step's logits come from the pass that checked the point)."""
    x, y, ok = cmp_batch
    x, y, ok = x[:40], y[:40], ok[:40]
    seen = []
    hook = trained_small_cnn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        res = DeepFool(norm=norm)(trained_small_cnn, x, y)
    finally:
        hook.remove()
    plain = DeepFool(norm=norm, bisection_steps=0)(trained_small_cnn, x, y)
    assert res.fooled[ok].all() and plain.fooled[ok].all()
    assert res.raw_box_violation == 0 and res.n_projected == 0
    assert (res.norms <= plain.norms).all(), float((res.norms - plain.norms).max())
    assert (res.norms[ok] < plain.norms[ok]).float().mean() >= 0.25
    rows = torch.cat([s.flatten(1) for s in seen[:-1]])
    assert len(seen) > 2 + 10                              # several steps, then the bisection
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0] == res.n_forward


# ------------------------------------------------------------------------------------------- CW-L-inf
@pytest.fixture(scope="module")
def relu_mlp():
    """A 16-8-5 ReLU network on 1x4x4 inputs and 24 points it classifies, with its weights for hand gradients.

    The logits are piecewise linear, so the gradient of z_j - z_y is W1^T (relu'(h) * (W2[j] - W2[y])): no
    autograd needed to know what the attack's gradient must be.
    """
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = 0.2 + 0.6 * torch.rand(24, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


def _hand_logits_and_grads(net, x):
    """Logits (B, K) and the input gradient of every logit (B, K, D), from the weights."""
    w1, b1, w2, b2 = net[1].weight, net[1].bias, net[3].weight, net[3].bias
    h = x.flatten(1) @ w1.T + b1
    z = h.clamp_min(0) @ w2.T + b2
    dz = torch.einsum("kh,bh,hd->bkd", w2, (h > 0).to(x.dtype), w1)
    return z, dz


def _hand_margin_step(net, x, y, step, norm):
    """x + step * dir(grad m) with m = max_{j != y} z_j - z_y, the CW margin, and dir the norm's ascent
    direction; also the CE-loss step, to show the two differ on these points."""
    z, dz = _hand_logits_and_grads(net, x)
    rows = torch.arange(len(y))
    other = z.clone()
    other[rows, y] = float("-inf")
    j = other.argmax(1)
    g_margin = dz[rows, j] - dz[rows, y]
    g_ce = torch.einsum("bk,bkd->bd", z.softmax(1), dz) - dz[rows, y]

    def step_along(gr):
        d = gr.sign() if norm == "linf" else gr / gr.norm(dim=1, keepdim=True)
        return (x.flatten(1) + step * d).clamp(0, 1).view_as(x)
    return step_along(g_margin), step_along(g_ce), (other.amax(1) - z[rows, y])


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_cw_linf_first_step_ascends_the_cw_margin(relu_mlp, norm, eps):
    """CW-L-inf's first step (no random start) is the ascent step of the CW margin max_{j != y} z_j - z_y,
    with that margin's gradient worked out by hand from the weights; the cross-entropy step differs on
    these points, so a different loss could not pass."""
    net, x, y = relu_mlp
    step = eps / 2                                                # inside the ball: no projection to mimic
    expected, ce_step, m0 = _hand_margin_step(net, x, y, step, norm)
    assert not torch.allclose(expected, ce_step), "the points do not tell the margin from cross-entropy"
    with torch.no_grad():
        m1 = margin_loss(net(expected), y)
    assert torch.allclose(m0, margin_loss(net(x), y))            # the hand margin is the library's
    assert (m1 > m0).all(), "the step must raise the margin, or PGD keeps the start point"
    atk = CWLinf(norm=norm, steps=1, step_size=step, random_start=False)
    res = atk(net, x, y, eps=eps)
    torch.testing.assert_close(res.x_adv, expected, rtol=0, atol=1e-6)


def test_cw_linf_config():
    atk, eps = build_attack(compose(["attack=cw_linf"]).attack)
    assert isinstance(atk, CWLinf) and atk.name == "cw_linf" and atk.loss == "margin"
    assert atk.norm is Norm.LINF and eps == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="attack.loss"):
        CWLinf(loss="ce")


def test_bad_hyperparameters_raise():
    with pytest.raises(ConfigError, match="attack.norm"):
        CarliniWagnerL2(norm="linf")
    with pytest.raises(ConfigError, match="attack.binary_search_steps"):
        CarliniWagnerL2(binary_search_steps=0)
    with pytest.raises(ConfigError, match="attack.initial_const"):
        CarliniWagnerL2(initial_const=0.0)
    with pytest.raises(ConfigError, match="attack.candidates"):
        DeepFool(candidates=1)
    with pytest.raises(ConfigError, match="attack.overshoot"):
        DeepFool(overshoot=-0.1)
