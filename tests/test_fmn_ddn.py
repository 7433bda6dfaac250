"""FMN and DDN, and the L1 threat model: closed-form minimal perturbations on a two-class linear model for
every norm, strength against our DeepFool and trust-region attacks on the small CNN, the exact projections
onto the L1 (and L2) ball intersected with the box checked against their optimality conditions and an
independent reference, and the L1 columns of the tables and summaries."""

from __future__ import annotations

import math

import pytest
import torch

from attacks.ddn import DDN
from attacks.deepfool import DeepFool
from attacks.fmn import FMN
from attacks.trust_region import TrustRegion
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.evaluator import evaluate, summarize
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.norms import (Norm, l1, norm_of, normalize_grad, project, project_ball, project_l1_box,
                                        project_l2_box, random_in_ball)
from robustbench_lab.core.results import summary_markdown
from robustbench_lab.core.zoo import LinearClassifier

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: small-batch work runs on one thread


# ------------------------------------------------------------------------------------- linear classifier
@pytest.fixture(scope="module")
def linear2():
    """A two-class linear classifier f(x) = w.(x - 0.5) on 1x8x8 inputs, 40 points near 0.5 at L2
    distances 0.04-0.1 from the boundary (half on each side), with the closed-form minimal perturbation
    |f(x)| / ||w||_q per norm (q the dual norm) and whether each norm's minimizer lies inside the box (then
    the box does not bind and the closed form is the minimum over the box too). DDN's radius shrinks by
    0.95 per step from 1, so distances are kept well above 0.95^100 = 0.006."""
    g = torch.Generator().manual_seed(0)
    d, b = 64, 40
    w = torch.randn(d, generator=g)
    net = LinearClassifier(1, 2, d)
    with torch.no_grad():
        net.fc.weight.copy_(torch.stack([-w / 2, w / 2]))
        net.fc.bias.copy_(torch.stack([w.sum() / 4, -w.sum() / 4]))
    model = Classifier(net, (0.0,), (1.0,), 2).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = 0.5 + 0.05 * torch.randn(b, d, generator=g)
    side = torch.where(torch.arange(b) % 2 == 0, 1.0, -1.0)
    target = (0.04 + 0.06 * torch.rand(b, generator=g)) * w.norm() * side
    x = (x + ((target - (x - 0.5) @ w) / w.norm() ** 2)[:, None] * w).view(b, 1, 8, 8)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    assert torch.equal(y, (side > 0).long())
    f = (z[:, 1] - z[:, 0]).abs()
    minimal = {Norm.L2: f / w.norm(), Norm.LINF: f / w.abs().sum(), Norm.L1: f / w.abs().max()}
    step = {Norm.L2: w / w.norm(), Norm.LINF: w.sign(), Norm.L1: torch.zeros(d)}
    step[Norm.L1][w.abs().argmax()] = w.sign()[w.abs().argmax()]
    inside = {}
    for norm, u in step.items():
        x_min = x.flatten(1) - (side * minimal[norm])[:, None] * u   # towards the other class
        inside[norm] = bool((x_min.min() > 0) & (x_min.max() < 1))
    return model, x, y, minimal, inside


@pytest.mark.parametrize("attack", [FMN(norm="l2"), FMN(norm="linf"), FMN(norm="l1"), DDN()],
                         ids=["fmn-l2", "fmn-linf", "fmn-l1", "ddn"])
def test_linear_closed_form(linear2, attack):
    """Every point is fooled, in the box, within 1% of the minimal norm for FMN (its epsilon step anneals
    to 0.1%; measured: at most 1.0008x) and within 1 / (1 - gamma) = 1.053x for DDN (its radius moves in
    fixed 5% steps, so the last non-adversarial radius bounds the best; measured: at most 1.006x)."""
    model, x, y, minimal, inside = linear2
    assert inside[attack.norm], "the closed-form minimizer must lie in the box for it to be the minimum"
    res = attack(model, x, y)
    assert res.fooled.all() and res.success.all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1 and res.raw_box_violation == 0
    ratio = res.norms / minimal[attack.norm]
    assert ratio.min() >= 1 - 1e-4, float(ratio.min())
    assert ratio.max() <= (1.01 if isinstance(attack, FMN) else 1 / (1 - attack.gamma)), float(ratio.max())


def test_fmn_projections_agree_for_linf(linear2):
    """For L-inf the ball and the box commute: the exact and the authors' clip projection are one method."""
    model, x, y, _, _ = linear2
    a, b = (FMN(norm="linf", steps=20, projection=p)(model, x, y) for p in ("exact", "clip"))
    assert torch.equal(a.x_adv, b.x_adv)


def test_ddn_zero_gradient_uses_per_example_streams():
    """Where the loss is flat DDN steps in a random direction, drawn from the example's own stream: the same
    example gets the same result alone and inside a batch, and the call is repeatable."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1), torch.nn.ReLU(), torch.nn.Linear(1, 2))
    with torch.no_grad():   # flat (dead ReLU) while sum(x) < 9, then class 1 wins quickly
        net[1].weight.fill_(1.0)
        net[1].bias.fill_(-9.0)
        net[3].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        net[3].bias.copy_(torch.tensor([0.1, -0.1]))
    model = Classifier(net, (0.0,), (1.0,), 2).eval()
    x = 0.3 + 0.2 * torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(6, dtype=torch.long)
    atk = DDN(steps=30)
    full = atk(model, x, y, generator=torch.Generator().manual_seed(3))
    again = atk(model, x, y, generator=torch.Generator().manual_seed(3))
    alone = atk(model, x[2:3], y[2:3], generator=torch.Generator().manual_seed(3), ids=torch.tensor([2]))
    assert full.fooled.any()   # the random directions did reach the region where the gradient lives
    assert torch.equal(full.x_adv, again.x_adv)
    assert torch.equal(alone.x_adv[0], full.x_adv[2])


# ------------------------------------------------------------------------------------- small CNN
@pytest.fixture(scope="module")
def cnn_runs(trained_small_cnn, fmnist_small):
    """Each attack at its default budget on the first 64 test points (55 clean-correct)."""
    _, _, xt, yt = fmnist_small
    x, y = xt[:64], yt[:64]
    attacks = {"fmn-l2": FMN(norm="l2"), "ddn": DDN(), "deepfool-l2": DeepFool(norm="l2"),
               "tr-l2": TrustRegion(norm="l2"), "fmn-linf": FMN(norm="linf"), "deepfool-linf": DeepFool(norm="linf"),
               "tr-linf": TrustRegion(norm="linf"), "fmn-l1": FMN(norm="l1")}
    with torch.no_grad():
        cc = trained_small_cnn(x).argmax(1) == y
    out = {}
    for name, atk in attacks.items():
        res = atk(trained_small_cnn, x, y, generator=torch.Generator().manual_seed(0))
        out[name] = (res.success[cc], res.norms[cc])
    return out


@pytest.mark.parametrize("name", ["fmn-l2", "ddn", "fmn-linf", "fmn-l1"])
def test_cnn_success(cnn_runs, name):
    """Nearly every clean-correct point is broken at the default budget (measured: all 83, for each)."""
    success, _ = cnn_runs[name]
    assert success.float().mean() >= 0.98, float(success.float().mean())


@pytest.mark.parametrize("name,norm", [("fmn-l2", "l2"), ("ddn", "l2"), ("fmn-linf", "linf")])
def test_cnn_norms_against_deepfool_and_trust_region(cnn_runs, name, norm):
    """Median norm at most DeepFool's; per point, typically at most the trust-region attack's (the median
    over points of ours / TR is <= 1), and the median at most 1.05x TR's.

    Measured on the two models this fixture turns out to be (its training is bit-reproducible only at a
    fixed thread count, and which test module trains it first decides that count), on these 55 points:
    ratio of medians to DeepFool 0.87-0.95; to TR 0.97-1.03; median over points of the per-point ratio to
    TR 0.96-0.98 (FMN-L2 0.97, DDN 0.98, FMN-L-inf 0.96 on both). The per-point ratio is the stable
    statistic (the median of 55 norms moved by 3% between the two models), so it carries the tight bound
    and the ratio of medians the 5% one."""
    keys = (name, f"tr-{norm}", f"deepfool-{norm}")
    both = cnn_runs[keys[0]][0] & cnn_runs[keys[1]][0] & cnn_runs[keys[2]][0]   # measured: all 55
    assert both.float().mean() >= 0.95
    ours, tr, df = (cnn_runs[k][1][both] for k in keys)
    assert ours.median() <= df.median(), (float(ours.median()), float(df.median()))
    assert (ours / tr).median() <= 1.0, float((ours / tr).median())
    assert ours.median() <= 1.05 * tr.median(), (float(ours.median()), float(tr.median()))


# ------------------------------------------------------------------------------------- projections
def _instances(seed: int, b: int = 16, d: int = 60):
    """Random projection problems: v (b, d), radius, and box bounds lo <= 0 <= hi from a clean point with
    saturated pixels (exact 0 and 1), in float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, d, generator=g, dtype=torch.float64)
    x = torch.where(x < 0.2, 0.0, torch.where(x > 0.85, 1.0, x))
    v = 0.4 * torch.randn(b, d, generator=g, dtype=torch.float64)
    eps = 4 * torch.rand(b, generator=g, dtype=torch.float64)
    eps[0] = 0.0
    return v, eps, -x, 1 - x


def _kkt_l1(v, d, eps, lo, hi, tol=1e-9):
    """Check that d (one row) solves min ||d - v||_2 s.t. ||d||_1 <= eps, lo <= d <= hi: feasibility and a
    multiplier lam >= 0 with v_i - d_i = lam sign(d_i) where d_i is strictly inside its bounds and nonzero,
    |v_i| <= lam where d_i = 0 and the box would let it move, v_i - d_i beyond lam (on d_i's side) where
    d_i sits at a bound, and complementary slackness (lam > 0 only if ||d||_1 = eps)."""
    assert (d >= lo - tol).all() and (d <= hi + tol).all()
    assert d.abs().sum() <= eps + tol
    r = v - d
    room = torch.where(v >= 0, hi, -lo)          # how far v's side of the box lets coordinate i move
    zero = (d.abs() <= tol) & (room > tol)       # (a pixel saturated on v's side is held by the box alone)
    at_bound = (d.abs() > tol) & (((d - lo).abs() <= tol) | ((hi - d).abs() <= tol))
    free = (d.abs() > tol) & ~at_bound
    assert (r[free] * d[free].sign() >= -tol).all()
    low = max([0.0] + v[zero].abs().tolist() + (r[free].abs()).tolist())
    high = min([math.inf] + (r[at_bound] * d[at_bound].sign()).tolist() + (r[free].abs()).tolist())
    assert low <= high + 1e-7, (low, high)
    if low > 1e-7:
        assert abs(float(d.abs().sum()) - float(eps)) <= 1e-7 * max(1.0, float(eps))


def _bisection(v, eps, lo, hi, norm):
    """Reference: the same KKT form, its multiplier found by 200 bisection steps (independent code)."""
    if norm is Norm.L1:
        shrink = lambda lam: torch.minimum(torch.maximum((v.abs() - lam).clamp_min(0) * v.sign(), lo), hi)  # noqa: E731
        size = lambda d: d.abs().sum()  # noqa: E731
        top = float(v.abs().max())
    else:
        shrink = lambda lam: torch.minimum(torch.maximum(v / (1 + lam), lo), hi)  # noqa: E731
        size = lambda d: d.norm()  # noqa: E731
        top = 1e12
    if size(shrink(0.0)) <= eps:
        return shrink(0.0)
    a, b = 0.0, top
    for _ in range(200):
        m = (a + b) / 2
        a, b = (m, b) if size(shrink(m)) > eps else (a, m)
    return shrink(b)


@pytest.mark.parametrize("seed", range(5))
def test_l1_box_projection_is_exact(seed):
    v, eps, lo, hi = _instances(seed)
    d = project_l1_box(v, eps, lo, hi)
    for i in range(v.shape[0]):
        _kkt_l1(v[i], d[i], eps[i], lo[i], hi[i])
        assert torch.allclose(d[i], _bisection(v[i], eps[i], lo[i], hi[i], Norm.L1), atol=1e-9)
    assert torch.equal(d[0], torch.zeros_like(d[0]))   # eps = 0


@pytest.mark.parametrize("seed", range(3))
def test_l2_box_projection_is_exact(seed):
    v, eps, lo, hi = _instances(seed)
    d = project_l2_box(v, eps, lo, hi)
    for i in range(v.shape[0]):
        assert torch.allclose(d[i], _bisection(v[i], eps[i], lo[i], hi[i], Norm.L2), atol=1e-9)
        assert d[i].norm() <= eps[i] + 1e-12 and (d[i] >= lo[i]).all() and (d[i] <= hi[i]).all()


@pytest.mark.parametrize("norm", [Norm.L1, Norm.L2])
def test_projection_keeps_feasible_points_and_beats_clipping(norm):
    """A feasible point comes back bit for bit; an infeasible one lands in the ball and the box, and no
    farther from where it was than the feasible point that ball-then-clip gives."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 6, 6, generator=g)
    x = torch.where(x < 0.3, 0.0, x)
    inside = (x + 0.01 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert torch.equal(project(inside, x, 100.0, norm, exact=True), inside)
    far = x + 0.3 * torch.randn(x.shape, generator=g)
    eps = torch.full((8,), 0.5 * float(norm_of(far - x, norm).min()))
    exact = project(far, x, eps, norm, exact=True)
    clipped = (x + project_ball(far - x, eps, norm)).clamp(0, 1)
    assert exact.min() >= 0 and exact.max() <= 1
    assert (norm_of(exact - x, norm) <= eps * (1 + 1e-5)).all()
    assert (norm_of(clipped - x, norm) < eps * (1 - 1e-3)).all()   # the box did bind here
    assert ((exact - far).flatten(1).norm(dim=1) <= (clipped - far).flatten(1).norm(dim=1) + 1e-6).all()


def test_l1_helpers():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(5, 1, 4, 4, generator=g)
    assert torch.allclose(l1(normalize_grad(grad, Norm.L1)), torch.ones(5))
    assert Norm.parse("L1") is Norm.L1 and Norm.L1.dual == math.inf and Norm.L1.p == 1
    # uniform in the L1 ball of R^d: every point inside, and E||r||_1 = eps d / (d + 1)
    r = random_in_ball(torch.zeros(4000, 1, 2, 2), 2.0, Norm.L1, torch.Generator().manual_seed(0))
    assert (l1(r) <= 2.0 + 1e-6).all()
    assert abs(float(l1(r).mean()) - 2.0 * 4 / 5) < 0.02


# ------------------------------------------------------------------------------------- tables, summaries
def test_l1_columns_and_summary(linear2):
    model, x, y, minimal, _ = linear2
    ev = evaluate(model, x, y, [FMN(norm="l1", steps=30)], None, torch.Generator().manual_seed(0))
    assert ev.ensemble == "l1"
    assert {"l1", "rel_l1", "l2", "linf", "rel_l2", "rel_linf"} <= set(ev.table.columns)
    pe = ev.per_example()
    assert torch.allclose(torch.tensor(pe["l1"].to_numpy(), dtype=torch.float32), l1(ev.x_adv - x))
    m = summarize(ev, [FMN(norm="l1")], None)
    assert m["median_l1"] == pytest.approx(float(pe.loc[pe["broken_by"].notna(), "l1"].median()))
    assert m["median_l1"] >= float(minimal[Norm.L1].median()) * (1 - 1e-4)
    md = summary_markdown({**m, "attack": "fmn", "defense": "none", "model": "linear", "dataset": "toy",
                           "norm": "l1", "eps": None, "seed": 0, "seconds": 0.0})
    assert "median L1" in md
    # an L2 run keeps its table as it was: no L1 columns or metrics appear
    ev2 = evaluate(model, x, y, [FMN(norm="l2", steps=10)], None, torch.Generator().manual_seed(0))
    assert "l1" not in ev2.table.columns and "median_l1" not in summarize(ev2, [FMN()], None)


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="attack.projection"):
        FMN(projection="nearest")
    with pytest.raises(ConfigError, match="attack.gamma_final"):
        FMN(gamma_init=0.01, gamma_final=0.05)
    with pytest.raises(ConfigError, match="attack.norm"):
        DDN(norm="linf")
    with pytest.raises(ConfigError, match="attack.levels"):
        DDN(levels=1)


@pytest.mark.parametrize("norm,eps", [(Norm.L1, 8.0), (Norm.L1, 20.0), (Norm.L2, 1.0)])
def test_projection_lands_inside_the_ball_in_float32(norm, eps):
    """x + d rounds in float32; before the final shrink, 103 of these 500 rows at L1 eps 20 had a norm a few
    ulps above eps (up to 3.8e-6), which the template's audit reports as an attack bug."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(500, 1, 28, 28, generator=g)
    xa = (x + torch.randn(500, 1, 28, 28, generator=g)).clamp(0, 1)
    p = project(xa, x, eps, norm, exact=True)
    assert (norm_of(p - x, norm) <= eps).all()                              # as the template computes it
    assert (norm_of(p.double() - x.double(), norm) <= eps).all()            # and exactly
    assert ((p >= 0) & (p <= 1)).all()
