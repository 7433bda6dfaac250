"""AutoAttack (through pyautoattack), our Square against pyautoattack's, and our PGD against torchattacks.

Every comparison recomputes predictions on the returned images itself; no attack's own success flag is used.
Sizes are small so the file runs in well under a minute and a half on 2 CPU cores; the full standard
AutoAttack on real points is marked slow.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from attacks.autoattack import AutoAttack
from attacks.pgd import PGD
from attacks.square import Square
from robustbench_lab.app.builders import build_attack
from robustbench_lab.core.norms import l2, linf

from conftest import compose


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: small-batch work runs on one thread


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def robust_acc(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy on the returned images, recomputed here (clean errors count as non-robust)."""
    return (model(x_adv).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def pts(fmnist_small):
    _, _, xt, yt = fmnist_small
    return xt, yt


# -- AutoAttack ---------------------------------------------------------------------------------------------
def test_apgd_ce_at_least_as_strong_as_pgd20(trained_small_cnn, pts):
    """APGD-CE (100 iterations, 1 restart, as in standard AutoAttack) vs our PGD-20 at the same eps, 100 points.

    Both are randomized, so an individual point can fall to one and not the other; one point (1%) of slack
    allows for that and nothing more. eps 0.1 leaves PGD-20 a non-trivial robust accuracy (~24% here), so
    the comparison is not won by both reaching 0.
    """
    m = trained_small_cnn
    xt, yt = pts
    x, y, eps = xt[:100], yt[:100], 0.1
    r_pgd = PGD(norm="linf", steps=20)(m, x, y, eps=eps, generator=gen())
    aa = AutoAttack(norm="linf", version="custom", attacks=["apgd-ce"], apgd_n_restarts=1)
    r_aa = aa(m, x, y, eps=eps, generator=gen())
    acc_pgd, acc_aa = robust_acc(m, r_pgd.x_adv, y), robust_acc(m, r_aa.x_adv, y)
    assert acc_pgd >= 0.10, f"eps too large for a meaningful comparison: PGD-20 robust accuracy {acc_pgd:.2f}"
    assert acc_aa <= acc_pgd + 0.01, (acc_aa, acc_pgd)
    assert linf(r_aa.x_adv - x).max() <= eps + 1e-6
    assert r_aa.n_backward > 0


def test_custom_cascade_adds_to_apgd_ce(trained_small_cnn, pts):
    """Same seed: the APGD-CE stage is identical, so adding APGD-T can only add successes, pointwise."""
    m = trained_small_cnn
    xt, yt = pts
    x, y, eps = xt[:24], yt[:24], 0.07
    kw = dict(norm="linf", version="custom", apgd_n_iter=20, apgd_n_restarts=1, n_target_classes=3)
    ce = AutoAttack(attacks=["apgd-ce"], **kw)(m, x, y, eps=eps, generator=gen(3))
    both = AutoAttack(attacks=["apgd-ce", "apgd-t"], **kw)(m, x, y, eps=eps, generator=gen(3))
    assert (both.success | ~ce.success).all()
    assert both.success.sum() >= ce.success.sum()


def test_autoattack_l2_respects_bound_and_breaks_points(trained_small_cnn, pts):
    m = trained_small_cnn
    xt, yt = pts
    x, y, eps = xt[:24], yt[:24], 1.5
    res = AutoAttack(norm="l2", version="custom", attacks=["apgd-ce"], apgd_n_iter=20, apgd_n_restarts=1)(
        m, x, y, eps=eps, generator=gen())
    assert (l2(res.x_adv - x) <= eps * (1 + 1e-5)).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    clean_ok = m(x).argmax(1) == y
    assert res.success[clean_ok].float().mean() > 0.3


def test_standard_version_plumbing(trained_small_cnn, pts):
    """The standard path (its checks, version settings, cascade and log) on a handful of points. At eps 0.3
    APGD-CE breaks every point, so the later components are skipped; the full path is the slow test below."""
    m = trained_small_cnn
    xt, yt = pts
    x, y = xt[:8], yt[:8]
    aa = AutoAttack(norm="linf")
    res = aa(m, x, y, eps=0.3, generator=gen())
    assert robust_acc(m, res.x_adv, y) == 0.0
    assert "using standard version including apgd-ce, apgd-t, fab-t, square" in aa.last_log
    assert "robust accuracy after APGD-CE" in aa.last_log
    assert "max Linf perturbation" in aa.last_log   # the package's final audit line


@pytest.mark.slow
def test_standard_autoattack_full(trained_small_cnn, pts):
    """All four components on real points (~15 min on a busy 2-core CPU for 16 points, most of it Square's
    5000 queries on the points that stay robust). Same seed: standard's successes include APGD-CE's."""
    m = trained_small_cnn
    xt, yt = pts
    x, y, eps = xt[:16], yt[:16], 0.1
    std = AutoAttack(norm="linf")
    r_std = std(m, x, y, eps=eps, generator=gen(1))
    r_ce = AutoAttack(norm="linf", version="custom", attacks=["apgd-ce"], apgd_n_restarts=1)(
        m, x, y, eps=eps, generator=gen(1))
    assert (r_std.success | ~r_ce.success).all()
    assert linf(r_std.x_adv - x).max() <= eps + 1e-6
    for comp in ("APGD-CE", "APGD-T", "FAB-T", "SQUARE"):
        assert comp in std.last_log or "no robust datapoints left" in std.last_log


def test_autoattack_log_captured_and_kept_off_root(trained_small_cnn, pts, caplog):
    m = trained_small_cnn
    xt, yt = pts
    aa = AutoAttack(norm="linf", version="custom", attacks=["apgd-ce"], apgd_n_iter=5, apgd_n_restarts=1)
    pyaa_logger = logging.getLogger("auto-attack")
    level, propagate = pyaa_logger.level, pyaa_logger.propagate
    with caplog.at_level(logging.DEBUG):
        aa(m, xt[:8], yt[:8], eps=0.1, generator=gen())
    log = aa.last_log
    assert isinstance(log, str) and log.strip()
    assert "apgd-ce" in log and "initial accuracy" in log and "robust accuracy" in log
    assert log.startswith("== autoattack version=custom attacks=apgd-ce")
    # the package's DEBUG progress stays in the attack's log, not in the run's log handlers
    assert not [r for r in caplog.records if r.name == "auto-attack" and r.levelno < logging.WARNING]
    assert (pyaa_logger.level, pyaa_logger.propagate) == (level, propagate)
    # ... except its progress (each component's start and robust accuracy), shown live on our logger
    live = [r.getMessage() for r in caplog.records if r.name == "attacks.autoattack" and r.levelno == logging.INFO]
    assert live == ["autoattack (8 points): running apgd-ce",
                    next(m for m in live if m.startswith("autoattack (8 points): robust accuracy after APGD-CE:"))]
    assert live[1].split(": ", 1)[1] in log                    # the same line the kept log holds
    # one entry per call; ``log`` accumulates until clear_log()
    aa(m, xt[8:12], yt[8:12], eps=0.1, generator=gen())
    assert aa.log.count("== autoattack") == 2 and aa.last_log.count("== autoattack") == 1
    aa.clear_log()
    assert aa.log == "" and aa.last_log == ""
    # the log is not a hyperparameter
    assert not any("log" in k for k in aa.config())


def test_autoattack_config_and_errors():
    atk, eps = build_attack(compose(["attack=autoattack"]).attack)
    assert isinstance(atk, AutoAttack) and atk.version == "standard" and eps == 0.1
    atk, _ = build_attack(compose(["attack=autoattack", "attack.version=custom",
                                   "attack.attacks=[apgd-ce,apgd-t]"]).attack)
    assert atk.attacks == ["apgd-ce", "apgd-t"]
    with pytest.raises(ValueError, match="attack.version"):
        AutoAttack(version="fast")
    with pytest.raises(ValueError, match="attack.attacks"):
        AutoAttack(version="standard", attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="attack.attacks"):
        AutoAttack(version="custom")
    with pytest.raises(ValueError, match="attack.attacks"):
        AutoAttack(version="custom", attacks=["pgd"])
    with pytest.raises(ValueError, match="attack.n_target_classes"):
        AutoAttack(n_target_classes=10)


# -- Square -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
def test_square_breaks_points_without_gradients(trained_small_cnn, pts, norm, eps):
    m = trained_small_cnn
    xt, yt = pts
    x, y = xt[:32], yt[:32]
    sq = Square(norm=norm, n_queries=300)
    res = sq(m, x, y, eps=eps, generator=gen())
    assert res.n_backward == 0                      # score-based: forward passes only
    # budget: 1 initial check + per restart (1 start + n_queries + 1 final) forward passes per example
    assert res.n_forward <= x.shape[0] * (1 + sq.n_restarts * (sq.n_queries + 2))
    d = res.x_adv - x
    bound = linf(d) if norm == "linf" else l2(d)
    assert (bound <= eps * (1 + 1e-5) + 1e-6).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    with torch.no_grad():
        clean_ok = m(x).argmax(1) == y
        fooled = m(res.x_adv).argmax(1) != y
        # baseline: random +-eps sign noise (L-inf) / a random direction of norm eps (L2), same budget
        noise = torch.randn(x.shape, generator=gen(1))
        noise = noise.sign() * eps if norm == "linf" else noise / l2(noise).view(-1, 1, 1, 1) * eps
        fooled_noise = m((x + noise).clamp(0, 1)).argmax(1) != y
    share = fooled[clean_ok].float().mean().item()
    # measured on the fixture model at 300 queries: ~0.28 for both norms (~0.6 at 1000 queries, L-inf)
    assert share > 0.2, share
    assert share > fooled_noise[clean_ok].float().mean().item() + 0.1


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
def test_square_agrees_with_autoattacks_square(trained_small_cnn, pts, norm, eps):
    """Our Square against ``pyautoattack.square`` (what AutoAttack runs), same points, same 100 queries.

    Ours draws a square per example (as the authors' code does) and, for L-inf, redraws signs that would not
    change the square; the package draws one square per batch. Measured on this fixture (200 points, seeds 0
    and 1): L-inf 0.555 / 0.540 ours vs 0.585 / 0.600 the package's; L2 0.635 / 0.665 vs 0.645 / 0.665. So:
    never weaker by more than 2 points in 100, and not more than 10 points stronger (a bigger gap would mean
    the two are not the same method)."""
    from pyautoattack.square import SquareAttack
    m = trained_small_cnn
    xt, yt = pts
    x, y = xt[:200], yt[:200]
    ours = Square(norm=norm, n_queries=100)(m, x, y, eps=eps, generator=gen())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = SquareAttack(m, norm={"linf": "Linf", "l2": "L2"}[norm], n_queries=100, eps=eps, p_init=0.8,
                           n_restarts=1, seed=0, loss="margin", resc_schedule=True, device=x.device)
        with torch.no_grad():
            x_ref = ref.perturb(x, y)
    bound = linf if norm == "linf" else l2
    assert (bound(x_ref - x) <= eps * (1 + 1e-5) + 1e-6).all()
    acc_ours, acc_ref = robust_acc(m, ours.x_adv, y), robust_acc(m, x_ref, y)
    assert acc_ref < robust_acc(m, x, y) - 0.1, "the budget breaks too little for a comparison"
    assert acc_ref - 0.10 <= acc_ours <= acc_ref + 0.02, (acc_ours, acc_ref)


def test_square_config_and_errors():
    atk, eps = build_attack(compose(["attack=square"]).attack)
    assert isinstance(atk, Square) and atk.n_queries == 1000 and atk.p_init == 0.8 and eps == 0.1
    with pytest.raises(ValueError, match="attack.n_queries"):
        Square(n_queries=0)
    with pytest.raises(ValueError, match="attack.p_init"):
        Square(p_init=1.5)
    with pytest.raises(ValueError, match="attack.loss"):
        Square(loss="dlr")


# -- shared: RNG, determinism, modes ------------------------------------------------------------------------
def _cheap_attacks():
    return [AutoAttack(norm="linf", version="custom", attacks=["apgd-ce", "square"], apgd_n_iter=5,
                       apgd_n_restarts=1, square_n_queries=20),
            Square(norm="linf", n_queries=20)]


@pytest.mark.parametrize("which", [0, 1], ids=["autoattack", "square"])
def test_global_rng_untouched(trained_small_cnn, pts, which):
    atk = _cheap_attacks()[which]
    xt, yt = pts
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(5)
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(5)
    atk(trained_small_cnn, xt[:8], yt[:8], eps=0.03, generator=gen())
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]


@pytest.mark.parametrize("which", [0, 1], ids=["autoattack", "square"])
def test_deterministic_under_generator(trained_small_cnn, pts, which):
    atk = _cheap_attacks()[which]
    xt, yt = pts
    x, y = xt[:16], yt[:16]
    a = atk(trained_small_cnn, x, y, eps=0.2, generator=gen(7)).x_adv
    b = atk(trained_small_cnn, x, y, eps=0.2, generator=gen(7)).x_adv
    c = atk(trained_small_cnn, x, y, eps=0.2, generator=gen(8)).x_adv
    assert torch.equal(a, b)
    assert not torch.equal(a, x)   # something was broken, so the next line can tell seeds apart
    assert not torch.equal(a, c)   # the seed really comes from the generator


class _ModeSpy(nn.Module):
    """Records, at every forward pass, whether any module of the wrapped model is in train mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen_train: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_train.append(any(mod.training for mod in self.model.modules()))
        return self.model(x)


@pytest.mark.parametrize("which", [0, 1], ids=["autoattack", "square"])
def test_model_in_eval_mode_throughout(trained_small_cnn, pts, which):
    atk = _cheap_attacks()[which]
    xt, yt = pts
    spy = _ModeSpy(trained_small_cnn)
    spy.train()
    try:
        with pytest.warns(UserWarning, match="train mode"):
            atk(spy, xt[:8], yt[:8], eps=0.03, generator=gen())
        assert spy.seen_train and not any(spy.seen_train)
        assert spy.training and trained_small_cnn.training   # the caller's mode is restored
    finally:
        trained_small_cnn.eval()


# -- reference: our PGD vs torchattacks.PGD -----------------------------------------------------------------
def test_our_pgd_at_least_as_strong_as_torchattacks(trained_small_cnn, pts):
    """Same budget (L-inf eps, step alpha = 2.5 eps / 20, 20 steps), 200 points.

    Without a random start both are deterministic and run the same iteration from the same point; ours keeps
    any misclassified iterate (torchattacks returns the last one), so it can never be weaker: no tolerance.
    With random starts (drawn from different streams) the two differ by sampling noise alone (one point of
    200 either way on this machine), so that comparison gets a tolerance of 3 points. eps 0.05 keeps both
    robust accuracies far from 0 so the checks can fail.
    """
    torchattacks = pytest.importorskip("torchattacks")
    m = trained_small_cnn
    xt, yt = pts
    x, y, eps, steps = xt[:200], yt[:200], 0.05, 20
    alpha = 2.5 * eps / steps
    for random_start, tolerance in ((False, 0.0), (True, 3 / 200)):
        ours = PGD(norm="linf", steps=steps, step_size=alpha, random_start=random_start)(m, x, y, eps=eps,
                                                                                       generator=gen())
        with torch.random.fork_rng(devices=[]):   # torchattacks draws its random start from the global RNG
            torch.manual_seed(1234)                # independent of our generator's draws
            ta = torchattacks.PGD(m, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
            x_ta = ta(x, y)
        assert linf(x_ta - x).max() <= eps + 1e-6
        acc_ours, acc_ta = robust_acc(m, ours.x_adv, y), robust_acc(m, x_ta, y)
        assert 0.1 < acc_ta < robust_acc(m, x, y), (acc_ta, "eps gives no room for a difference")
        assert acc_ours <= acc_ta + tolerance, (random_start, acc_ours, acc_ta)
    assert not m.training
