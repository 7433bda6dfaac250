"""The attack contract, checked over every registered attack config: what an attack must achieve (success,
norm bound, box), not merely that it ran."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class

from robustbench_lab.app.builders import build_attack
from robustbench_lab.core.attack_base import AttackFamily
from robustbench_lab.core.norms import Norm, l2, linf, norm_of

from conftest import ROOT, compose

ATTACK_CONFIGS = sorted(p.stem for p in (ROOT / "robustbench_lab" / "conf" / "attack").glob("*.yaml"))


def _supported(name: str) -> list[str]:
    cls = get_class(compose([f"attack={name}"]).attack._target_)
    return [n.value for n in cls.supported_norms]


# (attack config, norm, eps) cases: every attack under each norm it supports
CASES = [(a, n, {"linf": 0.1, "l2": 1.5, "l1": 8.0}[n]) for a in ATTACK_CONFIGS for n in _supported(a)]


# The contract does not depend on the budget: expensive attacks run at a reduced one here (their strength
# is tested in their own files).
FAST = {"autoattack": ["attack.version=custom", "attack.attacks=[apgd-ce,apgd-t]", "attack.apgd_n_iter=20",
                       "attack.n_target_classes=3"],
        "apgd": ["attack.n_iter=20"],
        "apgd_t": ["attack.n_iter=20", "attack.n_target_classes=3"],
        "square": ["attack.n_queries=300"],
        "cw": ["attack.binary_search_steps=4", "attack.steps=40", "attack.initial_const=1.0", "attack.lr=0.05"],
        "ddn": ["attack.steps=30"],
        "fmn": ["attack.steps=30"],
        "trust_region": ["attack.iterations=50"]}


def make(name: str, norm: str | None, eps: float):
    norm = norm or _supported(name)[0]
    cfg = compose([f"attack={name}", f"attack.norm={norm}", f"attack.eps={eps}", *FAST.get(name, [])])
    built = build_attack(cfg.attack)
    if getattr(built[0], "requires_source_model", False):
        pytest.skip(f"{name} needs a defended model with an undefended source (tests/test_defenses.py)")
    return built


@pytest.fixture(scope="module")
def batch(fmnist_small):
    _, _, xt, yt = fmnist_small
    return xt[:64], yt[:64]


@pytest.mark.parametrize("name,norm,eps", CASES)
def test_norm_bound_box_and_recomputed_success(trained_small_cnn, batch, name, norm, eps):
    atk, _ = make(name, norm, eps)
    x, y = batch
    res = atk(trained_small_cnn, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
    assert res.x_adv.shape == x.shape
    assert torch.isfinite(res.x_adv).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    d = res.x_adv - x
    bound = norm_of(d, Norm(norm))
    if atk.family == AttackFamily.FIXED_EPS:
        assert (bound <= eps * (1 + 1e-5) + 1e-6).all(), float(bound.max())
    assert torch.allclose(res.l2, l2(d)) and torch.allclose(res.linf, linf(d))
    # the method's own output already lies in the ball and the box: the template's clipping repairs nothing
    assert res.raw_ball_violation <= 1e-6 and res.raw_box_violation <= 1e-6, (res.raw_ball_violation,
                                                                              res.raw_box_violation)
    # success is recomputed on the returned tensor, never taken from the attack
    with torch.no_grad():
        pred = trained_small_cnn(res.x_adv).argmax(1)
    assert torch.equal(res.adv_pred, pred)
    expected = pred != y
    if atk.family == AttackFamily.MINIMIZATION:
        expected &= bound <= eps * (1 + 1e-6) + 1e-7
    assert torch.equal(res.success, expected)
    # a real attack at this budget fools a real share of a small undefended model
    clean_ok = trained_small_cnn(x).argmax(1) == y
    assert res.success[clean_ok].float().mean() > 0.3
    assert res.n_forward >= x.shape[0]
    if getattr(atk, "gradient_free", False):
        assert res.n_backward == 0   # a black-box attack must not use gradients
    else:
        assert res.n_backward >= x.shape[0]


@pytest.mark.parametrize("name", ATTACK_CONFIGS)
def test_model_state_restored_and_untouched(trained_small_cnn, batch, name):
    atk, eps = make(name, None, 0.05)
    m = trained_small_cnn
    m.train()
    for p in m.parameters():
        p.requires_grad_(True)
        p.grad = None
    before = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        with pytest.warns(UserWarning, match="train mode"):
            atk(m, *batch, eps=eps, generator=torch.Generator().manual_seed(0))
        assert m.training and all(mod.training for mod in m.modules())
        assert all(p.requires_grad for p in m.parameters())
        assert all(p.grad is None for p in m.parameters())
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k
    finally:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)


@pytest.mark.parametrize("name", ATTACK_CONFIGS)
def test_deterministic_under_seed(trained_small_cnn, batch, name):
    atk, eps = make(name, None, 0.05)
    runs = [atk(trained_small_cnn, *batch, eps=eps, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    assert torch.equal(runs[0].success, runs[1].success)


def test_global_rng_untouched(trained_small_cnn, batch):
    atk, eps = make("pgd", "linf", 0.05)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    atk(trained_small_cnn, *batch, eps=eps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)


def test_pgd_stronger_than_fgsm_and_restarts_help(trained_small_cnn, fmnist_small):
    _, _, xt, yt = fmnist_small
    x, y = xt[:200], yt[:200]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    fgsm, _ = make("fgsm", "linf", 0.05)
    pgd, _ = make("pgd", "linf", 0.05)
    r_f = fgsm(trained_small_cnn, x, y, eps=0.05, generator=g())
    r_p = pgd(trained_small_cnn, x, y, eps=0.05, generator=g())
    assert r_p.success.sum() > r_f.success.sum()
    # restarts keep the per-example worst case: never fewer successes than one restart
    pgd3, _ = build_attack(compose(["attack=pgd", "attack.eps=0.02", "attack.restarts=3"]).attack)
    pgd1, _ = build_attack(compose(["attack=pgd", "attack.eps=0.02", "attack.restarts=1"]).attack)
    s3 = pgd3(trained_small_cnn, x, y, eps=0.02, generator=g()).success
    s1 = pgd1(trained_small_cnn, x, y, eps=0.02, generator=g()).success
    assert (s3 | ~s1).all() and s3.sum() >= s1.sum()


def test_counts_match_method(trained_small_cnn, batch):
    pgd, _ = build_attack(compose(["attack=pgd", "attack.steps=7", "attack.eps=0.001"]).attack)
    x, y = batch
    res = pgd(trained_small_cnn, x, y, eps=0.001, generator=torch.Generator().manual_seed(0))
    # 7 gradient steps per example; 8 forward passes (the last iterate is checked) for unbroken points
    assert res.n_backward == 7 * x.shape[0]
    assert res.n_forward == 8 * x.shape[0]


@pytest.mark.parametrize("name", ATTACK_CONFIGS)
def test_unsupported_norm_is_a_config_error(name):
    bad = [n for n in ("linf", "l2") if n not in _supported(name)]
    if not bad:
        pytest.skip("supports every norm")
    with pytest.raises(ValueError, match="attack.norm"):
        make(name, bad[0], 0.1)


def test_bad_inputs_raise(trained_small_cnn, batch):
    atk, _ = make("pgd", "linf", 0.1)
    x, y = batch
    with pytest.raises(ValueError, match="bounds"):
        atk(trained_small_cnn, x * 3 - 1, y, eps=0.1)
    with pytest.raises(ValueError, match="labels"):
        atk(trained_small_cnn, x, y[:3], eps=0.1)
    with pytest.raises(ValueError, match="attack.eps"):
        atk(trained_small_cnn, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="attack.eps"):
        atk(trained_small_cnn, x, y, eps=None)
    with pytest.raises(ValueError, match="attack.norm"):
        Norm.parse("l3")
