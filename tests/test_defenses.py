"""Defenses: JumpReLU retrofitting and its tuning, the adaptive attack wrappers (BPDA, transfer), and
adversarial training (PGD/FGSM-RS, TRADES). Small models and slices of data, so the file runs in about a
minute on 2 CPU cores."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.adaptive import BPDA, Transfer, bpda_mode
from attacks.fgsm import FGSM
from attacks.pgd import PGD
from defenses.adv_training import AdversarialTraining
from defenses.jumprelu.activation import JumpReLU
from defenses.jumprelu.defense import JumpReLUDefense
from defenses.jumprelu.intervals import median_coverage, median_interval, median_rank, wilson_interval
from defenses.jumprelu.retrofit import keep_undefended, retrofit
from defenses.jumprelu.plot import plot_tradeoff
from defenses.jumprelu.tuning import choose_jump
from robustbench_lab.app.builders import build_attack, build_defense, checkpoint_spec
from robustbench_lab.app.execute import run_task
from robustbench_lab.core import plotstyle
from robustbench_lab.core.cache import content_key
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.results import ResultWriter
from robustbench_lab.core.recipe import Recipe

from conftest import compose, fashion_available


def _relus(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, nn.ReLU)]


def _mlp(seed: int, hidden: int = 32) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10)),
                      (0.286,), (0.353,), 10).eval()


# --------------------------------------------------------------------------------------------- JumpReLU
def test_retrofit_replaces_every_relu_and_leaves_weights_and_original(trained_small_cnn):
    m = trained_small_cnn
    before = {k: v.clone() for k, v in m.state_dict().items()}
    n_relu = len(_relus(m))
    assert n_relu >= 3
    d = retrofit(m, 0.3)
    assert not _relus(d)
    jumps = [x for x in d.modules() if isinstance(x, JumpReLU)]
    assert len(jumps) == n_relu and all(j.jump == 0.3 for j in jumps)
    # weights unchanged, but copies (the defended model owns its parameters)
    sd = d.state_dict()
    assert sd.keys() == before.keys()
    assert all(torch.equal(sd[k], before[k]) for k in before)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(d.parameters(), m.parameters()))
    # the original is untouched and kept as the undefended source (a reference, not a submodule)
    assert len(_relus(m)) == n_relu and not any(isinstance(x, JumpReLU) for x in m.modules())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert d.undefended is m
    assert not any(k.startswith("undefended") for k in sd)


def test_retrofit_with_zero_jump_is_exactly_the_original(trained_small_cnn, fmnist_small):
    x = fmnist_small[2][:128]
    with torch.no_grad():
        assert torch.equal(retrofit(trained_small_cnn, 0.0)(x), trained_small_cnn(x))
        assert not torch.equal(retrofit(trained_small_cnn, 0.5)(x), trained_small_cnn(x))


def test_retrofit_rejects_models_without_relu_modules():
    with pytest.raises(ValueError, match="no nn.ReLU"):
        retrofit(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), 0.1)
    with pytest.raises(ConfigError, match="defense.jump"):
        retrofit(_mlp(0), -0.1)


def test_bpda_gradient_is_finite_and_nonzero_where_the_jump_gradient_is_zero():
    k = 0.5
    x = torch.tensor([-0.3, 0.1, 0.3, 0.45, 0.7])   # the first four: no gradient through the jump
    plain = JumpReLU(k)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(plain(xg).sum(), xg)
    assert torch.equal(g, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    for surrogate, tau in (("relu", 0.1), ("sigmoid", 0.1), ("sigmoid", 1.0)):
        m = JumpReLU(k, bpda=surrogate, tau=tau)
        xg = x.clone().requires_grad_(True)
        out = m(xg)
        assert torch.equal(out.detach(), plain(x))                  # forward unchanged
        (g,) = torch.autograd.grad(out.sum(), xg)
        assert torch.isfinite(g).all()
        assert (g[1:4] != 0).all(), (surrogate, g)                  # 0 < x < k: the surrogate passes gradient
    s = torch.sigmoid((x - k) / 0.1)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(JumpReLU(k, bpda="sigmoid", tau=0.1)(xg).sum(), xg)
    assert torch.allclose(g, s + x * s * (1 - s) / 0.1)

    # a whole network whose every hidden unit is below the jump: the input gradient vanishes exactly,
    # BPDA's does not; the BPDA mode is switched on only inside the context and restored after
    d = retrofit(_mlp(0), 100.0)
    xb, yb = torch.rand(8, 1, 28, 28), torch.arange(8)

    def input_grad() -> torch.Tensor:
        xi = xb.clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(F.cross_entropy(d(xi), yb), xi)
        return gi

    assert torch.count_nonzero(input_grad()) == 0
    with bpda_mode(d, "relu") as mods:
        assert len(mods) == 1 and all(m.bpda == "relu" for m in mods)
        gi = input_grad()
    assert torch.isfinite(gi).all() and torch.count_nonzero(gi) > 0
    assert all(m.bpda is None for m in d.modules() if isinstance(m, JumpReLU))


def test_bpda_attack_switches_modules_during_the_run_and_restores_them():
    seen: list = []
    spent: list = []

    class Spy(PGD):
        def run(self, model, x, y, eps, generator):
            seen.extend(m.bpda for m in model.modules() if isinstance(m, JumpReLU))
            out = super().run(model, x, y, eps, generator)
            spent.append(model.n_backward)   # the base's passes, on the template's counting proxy
            return out

    d = retrofit(_mlp(1), 0.2)
    atk = BPDA(base=Spy(steps=3), surrogate="sigmoid", tau=0.2)
    assert atk.family == atk.base.family and atk.norm is atk.base.norm and atk.name == "pgd_bpda"
    res = atk(d, torch.rand(6, 1, 28, 28), torch.arange(6), eps=0.1, generator=torch.Generator().manual_seed(0))
    assert seen == ["sigmoid"]
    assert all(m.bpda is None and m.tau == 0.1 for m in d.modules() if isinstance(m, JumpReLU))
    assert res.n_backward == spent[0] and 6 <= spent[0] <= 3 * 6   # PGD stops stepping points it has fooled
    with pytest.raises(ConfigError, match="attack.surrogate"):
        BPDA(base=PGD(), surrogate="tanh")
    with pytest.raises(ConfigError, match="attack.norm"):
        BPDA(base=PGD(norm="linf"), norm="l2")


def test_bpda_is_the_base_attack_on_a_model_without_jumps(trained_small_cnn, fmnist_small):
    x, y = fmnist_small[2][:32], fmnist_small[3][:32]
    a = BPDA(base=PGD(steps=5))(trained_small_cnn, x, y, eps=0.05, generator=torch.Generator().manual_seed(3))
    b = PGD(steps=5)(trained_small_cnn, x, y, eps=0.05, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)


def test_transfer_crafts_on_the_undefended_source_and_scores_on_the_defended_model():
    defended, source = _mlp(10), _mlp(11)             # two different networks
    keep_undefended(defended, source)
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    base = PGD(steps=4)
    res = Transfer(base=base)(defended, x, y, eps=0.1, generator=torch.Generator().manual_seed(5))
    on_source = base(source, x, y, eps=0.1, generator=torch.Generator().manual_seed(5))
    on_defended = base(defended, x, y, eps=0.1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(res.x_adv, on_source.x_adv)
    assert not torch.equal(res.x_adv, on_defended.x_adv)
    with torch.no_grad():
        assert torch.equal(res.adv_pred, defended(res.x_adv).argmax(1))   # success is the defended model's
    assert res.n_backward == on_source.n_backward > 0                     # crafting cost is counted
    with pytest.raises(ValueError, match="undefended"):
        Transfer(base=base)(source, x, y, eps=0.1)
    assert Transfer.requires_source_model


def test_attack_wrapper_configs_follow_the_norm_and_record_the_base():
    for name in ("pgd_bpda", "pgd_transfer"):
        atk, eps = build_attack(compose([f"attack={name}", "attack.norm=l2", "attack.eps=1.5"]).attack)
        assert atk.name == name and eps == 1.5 and atk.norm.value == "l2" and atk.base.norm.value == "l2"
        cfg = atk.config()
        assert cfg["base"]["class"] == "attacks.pgd.PGD" and cfg["base"]["steps"] == 20


# ------------------------------------------------------------------------------------------------ tuning
def _threshold_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model whose clean accuracy is known in closed form as a function of the jump k.

    One hidden unit h = JumpReLU_k(v) of the input value v; logits (1e-4, h): class 1 iff h > 1e-4.
    100 points of class 1 with v = 0.005, 0.015, ..., 0.995 and 50 points of class 0 with v = 0:
    accuracy(k) = (50 + #{v > k}) / 150, so the drop from k = 0 is #{v <= k} / 150 = 100 k / 150 on the grid.
    """
    lin1, lin2 = nn.Linear(1, 1), nn.Linear(1, 2)
    with torch.no_grad():
        lin1.weight.fill_(1.0), lin1.bias.zero_()
        lin2.weight.copy_(torch.tensor([[0.0], [1.0]])), lin2.bias.copy_(torch.tensor([1e-4, 0.0]))
    model = Classifier(nn.Sequential(nn.Flatten(), lin1, nn.ReLU(), lin2), (0.0,), (1.0,), 2).eval()
    v = torch.cat([(torch.arange(100) + 0.5) / 100, torch.zeros(50)])
    y = torch.cat([torch.ones(100, dtype=torch.long), torch.zeros(50, dtype=torch.long)])
    return model, v.view(-1, 1, 1, 1), y


def test_auto_jump_picks_the_largest_admissible_k_on_a_model_with_known_accuracy(tmp_path):
    model, x, y = _threshold_model()
    grid = [0.1, 0.02, 0.04, 0.06, 0.08]               # unsorted, without 0: 0 is added as the reference
    d = JumpReLUDefense(jump="auto", grid=grid, max_accuracy_drop=0.03, tradeoff_attack=None)
    writer = ResultWriter(tmp_path)
    defended = d.transform(model, {"splits": SimpleNamespace(x_val=x, y_val=y), "device": torch.device("cpu"),
                                   "writer": writer, "seed": 0})
    t = d.tradeoff
    assert t["k"].tolist() == [0.0, 0.02, 0.04, 0.06, 0.08, 0.1]
    expected = [(50 + sum(1 for i in range(100) if (i + 0.5) / 100 > k)) / 150 for k in t["k"]]
    assert t["val_accuracy"].tolist() == pytest.approx(expected)
    assert d.chosen == 0.04                            # drop 4/150 = 0.027 <= 0.03 < 6/150
    assert t["admissible"].tolist() == [True, True, True, False, False, False]
    assert all(m.jump == 0.04 for m in defended.modules() if isinstance(m, JumpReLU))
    assert defended.undefended is model
    desc = d.describe()
    assert desc["jump"] == 0.04 and desc["val_accuracy_k0"] == 1.0 and len(desc["tradeoff"]) == 6
    assert (tmp_path / ".staging" / "jumprelu_tradeoff.csv").is_file()
    assert (tmp_path / ".staging" / "jumprelu_tradeoff.png").stat().st_size > 1000
    # the ReLU's input is v itself: 100 positive values (i + 0.5) / 100, whose quantiles are known
    (pre,) = desc["preactivation_quantiles"]
    assert pre["module"] == "net.2" and pre["n"] == 150 and pre["positive_share"] == pytest.approx(100 / 150)
    assert pre["q0.5"] == pytest.approx(0.5)
    assert pre["q0.1"] == pytest.approx(0.005 + 0.01 * 0.1 * 99)      # linear interpolation at rank 9.9
    # "largest admissible", not "last before the first inadmissible one"
    assert choose_jump([0, 0.1, 0.2, 0.3], [0.9, 0.85, 0.895, 0.8], 0.9, 0.01) == 0.2


def test_auto_jump_tuning_is_stored_and_reused_only_for_the_same_model_data_and_settings(tmp_path, monkeypatch):
    """A sweep's cells that share a model tune once: the second transform adopts the stored table (no
    measurement), a change of weights, data or settings measures again, and a damaged file is re-measured."""
    model, x, y = _threshold_model()
    ctx = {"splits": SimpleNamespace(x_val=x, y_val=y), "device": torch.device("cpu"), "seed": 0,
           "cache_dir": tmp_path}
    kw = dict(jump="auto", grid=[0.02, 0.04, 0.06], max_accuracy_drop=0.03, tradeoff_attack=None)
    first = JumpReLUDefense(**kw)
    first.transform(model, ctx)
    stored = list((tmp_path / "jumprelu").glob("*.json"))
    assert len(stored) == 1 and first.chosen == 0.04

    calls = []
    real_tune = JumpReLUDefense.tune
    monkeypatch.setattr(JumpReLUDefense, "tune", lambda self, *a, **k: calls.append(1) or real_tune(self, *a, **k))
    again = JumpReLUDefense(**kw)
    defended = again.transform(model, ctx)
    assert calls == [] and again.chosen == 0.04
    pd.testing.assert_frame_equal(again.tradeoff, first.tradeoff, check_dtype=False)
    assert all(m.jump == 0.04 for m in defended.modules() if isinstance(m, JumpReLU))
    assert again.describe()["tradeoff"] == first.describe()["tradeoff"]

    JumpReLUDefense(**{**kw, "max_accuracy_drop": 0.05}).transform(model, ctx)          # another setting
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.net[1].bias.fill_(0.01)                                                    # other weights
    JumpReLUDefense(**kw).transform(other, ctx)
    JumpReLUDefense(**kw).transform(model, {**ctx, "splits": SimpleNamespace(x_val=x[:120], y_val=y[:120])})
    JumpReLUDefense(**kw, reuse_tuning=False).transform(model, ctx)                      # opted out
    assert len(calls) == 4 and len(list((tmp_path / "jumprelu").glob("*.json"))) == 4
    stored[0].write_text("{not json")                                                    # damaged: measured again
    assert JumpReLUDefense(**kw).transform(model, ctx) is not None and len(calls) == 5
    with pytest.raises(ConfigError, match="defense.reuse_tuning"):
        JumpReLUDefense(reuse_tuning="yes")


def test_jumprelu_config_errors_name_the_key():
    for kw, key in (({"jump": "big"}, "defense.jump"), ({"jump": -1.0}, "defense.jump"),
                    ({"grid": []}, "defense.grid"), ({"max_accuracy_drop": 2}, "defense.max_accuracy_drop"),
                    ({"tradeoff_attack": PGD(), "tradeoff_eps": None}, "defense.tradeoff_eps")):
        with pytest.raises(ConfigError, match=key):
            JumpReLUDefense(**kw)
    d = JumpReLUDefense(jump="auto")
    with pytest.raises(ConfigError, match="data.n_val"):
        d.transform(_mlp(0), {"splits": SimpleNamespace(x_val=torch.zeros(0, 1, 28, 28), y_val=torch.zeros(0))})


# ---------------------------------------------------------------------------------- adversarial training
def _train_eval(procedure, fmnist_small, steps: int = 240) -> tuple[float, float]:
    """Train a small MLP for ``steps`` batches of 50 on 3000 points; clean and PGD-10 (eps 0.1) accuracy."""
    from robustbench_lab.core import data as data_mod
    from robustbench_lab.core.train import train
    x, y, xt, yt = fmnist_small
    splits = data_mod.Splits(data_mod.get_card("fashion_mnist"), x[:3000], y[:3000], x[:0], y[:0], xt, yt,
                             torch.arange(0), torch.arange(300))
    model = _mlp(0, hidden=64).train()
    train(model, splits, Recipe(epochs=steps * 50 // 3000, batch_size=50, lr=0.05, augment=False),
          torch.device("cpu"), seed=0, procedure=procedure, progress=False)
    xe, ye = xt[:300], yt[:300]
    with torch.no_grad():
        clean = float((model(xe).argmax(1) == ye).float().mean())
    res = PGD(steps=10)(model, xe, ye, eps=0.1, generator=torch.Generator().manual_seed(0))
    return clean, float(((model(xe).argmax(1) == ye) & ~res.success).float().mean())


def test_adversarial_training_raises_robust_accuracy_over_standard_training(fmnist_small):
    std_clean, std_rob = _train_eval(None, fmnist_small)
    at = AdversarialTraining(attack=FGSM(random_start=True, step_scale=1.25), eps=0.1)
    at_clean, at_rob = _train_eval(at.training_procedure(), fmnist_small)
    tr = AdversarialTraining(attack=PGD(steps=3, rel_stepsize=0.5), eps=0.1, method="trades", beta=6.0)
    tr_clean, tr_rob = _train_eval(tr.training_procedure(), fmnist_small)
    assert std_clean > 0.7 and at_clean > 0.55 and tr_clean > 0.55, (std_clean, at_clean, tr_clean)
    assert at_rob > std_rob + 0.15, (std_rob, at_rob)
    assert tr_rob > std_rob + 0.15, (std_rob, tr_rob)


def test_adversarial_training_enters_the_checkpoint_key():
    def key(over: list[str]) -> str:
        cfg = compose(over)
        return content_key(checkpoint_spec(cfg, Recipe.from_config(cfg.model.train), build_defense(cfg.defense)))

    base = ["model=small_cnn"]
    keys = {key(base), key(base + ["defense=adv_training"]), key(base + ["defense=trades"]),
            key(base + ["defense=adv_training", "defense.eps=0.05"]),
            key(base + ["defense=trades", "defense.beta=1.0"]),
            key(base + ["defense=adv_training", "defense.attack.step_scale=1.0"])}
    assert len(keys) == 6
    # a transform-only defense shares the standard checkpoint
    assert key(base + ["defense=jumprelu"]) == key(base)
    spec = build_defense(compose(["defense=trades"]).defense).training_procedure().spec()
    assert spec["method"] == "trades" and spec["beta"] == 6.0 and spec["attack"]["class"] == "attacks.pgd.PGD"
    with pytest.raises(ConfigError, match="defense.method"):
        AdversarialTraining(attack=PGD(), eps=0.1, method="mart")
    with pytest.raises(ConfigError, match="defense.eps"):
        AdversarialTraining(attack=PGD(), eps=0)


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")
def test_jumprelu_run_writes_the_tradeoff_and_evaluates_adaptive_attacks(tmp_root):
    cfg = compose(["defense=jumprelu", "model=small_cnn", "model.train.max_train=3000", "model.train.epochs=1",
                   "data.n_eval=48", "data.n_val=400", "progress=false", "logger=none", "checks=none",
                   "attacks=[pgd,pgd_bpda,pgd_transfer]", "attack.eps=0.05",
                   "defense.grid=[0.25,0.5,1.0]", "defense.tradeoff_n=24", "defense.tradeoff_attack.steps=10"])
    out = tmp_root / "run"
    m = run_task(cfg, out)
    t = pd.read_csv(out / "jumprelu_tradeoff.csv")
    assert t["k"].tolist() == [0.0, 0.25, 0.5, 1.0]
    assert {"val_accuracy", "accuracy_drop", "admissible", "chosen", "zero_grad_fraction", "median_min_l2",
            "attack_success_rate"} <= set(t.columns)
    assert t["chosen"].sum() == 1 and t.loc[t["chosen"], "k"].item() == m["defense_config"]["jump"]
    assert (out / "jumprelu_tradeoff.png").stat().st_size > 1000
    assert m["defense"] == "jumprelu" and m["attacks"] == ["pgd", "pgd_bpda", "pgd_transfer"]
    assert m["attack_config"]["pgd_transfer"]["base"]["class"] == "attacks.pgd.PGD"
    assert math.isfinite(m["robust_accuracy"]) and m["robust_accuracy"] <= m["clean_accuracy"]


def test_tradeoff_attacks_graybox_and_bpda_equal_whitebox_at_k0(trained_small_cnn, fmnist_small, tmp_path):
    """At k = 0 the retrofit is the original model: a transfer from it and BPDA through the ReLU surrogate
    are the white-box attack itself (same generator), so all three robust accuracies agree; at a large k
    the white-box attack on the jump model loses its gradients and the adaptive ones must not do worse.
    Every measure carries its interval, which holds the point estimate, and its count of points."""
    from attacks.adaptive import BPDA, Transfer
    from attacks.deepfool import DeepFool

    _, _, xt, yt = fmnist_small
    x, y = xt[:40], yt[:40]
    spec = {"pgd": {"attack": PGD(norm="linf", steps=10), "eps": 0.1},
            "pgd_graybox": {"attack": Transfer(base=PGD(norm="linf", steps=10)), "eps": 0.1},
            "pgd_bpda": {"attack": BPDA(base=PGD(norm="linf", steps=10)), "eps": 0.1},
            "df": {"attack": DeepFool(norm="l2", steps=20), "eps": None}}
    d = JumpReLUDefense(jump="auto", grid=[0.0, 3.0], max_accuracy_drop=1.0, tradeoff_attacks=spec, tradeoff_n=40)
    t = d.tune(trained_small_cnn, x, y).set_index("k")
    assert {"pgd_robust_accuracy", "pgd_graybox_robust_accuracy", "pgd_bpda_robust_accuracy",
            "df_median_min_l2", "df_attack_success_rate"} <= set(t.columns)
    k0 = t.loc[0.0]
    assert k0["pgd_robust_accuracy"] < 0.5 * k0["val_accuracy"]        # a real attack on this model
    assert k0["pgd_graybox_robust_accuracy"] == k0["pgd_robust_accuracy"]
    assert k0["pgd_bpda_robust_accuracy"] == k0["pgd_robust_accuracy"]
    assert np.isfinite(k0["df_median_min_l2"])
    big = t.loc[3.0]
    assert big["zero_grad_fraction"] > 0.5
    assert big["pgd_bpda_robust_accuracy"] <= big["pgd_robust_accuracy"]
    desc = d.describe()
    assert desc["tradeoff_attacks"]["pgd_graybox"]["attack"] == "pgd_transfer"
    # every robust accuracy and median carries its 95% interval and the points behind it
    for k, row in t.iterrows():
        n_ok = int(round(float((retrofit(trained_small_cnn, k)(x).argmax(1) == y).sum())))
        for col, n in [(f"{a}_robust_accuracy", 40) for a in spec] + [("df_median_min_l2", n_ok)]:
            lo, hi = row[f"{col}_ci_low"], row[f"{col}_ci_high"]
            assert row[f"{col}_n"] == n and lo <= row[col] <= hi, (k, col)
            if col.endswith("robust_accuracy"):
                assert (lo, hi) == pytest.approx(wilson_interval(round(row[col] * 40), 40))
        assert row["df_median_min_l2_ci_low"] < row["df_median_min_l2_ci_high"]
    with plotstyle.capture() as saved:
        plot_tradeoff(tmp_path / "t.png", t.reset_index(), 1.0)
    labels = [tx.get_text() for ax in saved[0][1].axes if ax.get_legend() for tx in ax.get_legend().get_texts()]
    assert plotstyle.words("df_median_min_l2") in labels
    assert not any("ci" in lab or lab.endswith(" n") for lab in labels)       # intervals are bands, not curves


# ------------------------------------------------------------------------------------ intervals
def test_wilson_interval_matches_its_formula_and_covers_about_95_percent():
    z = 1.959963984540054                       # the 97.5% normal quantile
    for k, n in ((0, 64), (32, 64), (64, 64), (3, 200)):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(0, 64) == (0.0, pytest.approx(z * z / (64 + z * z)))     # 0.057, not Wald's [0, 0]
    # exact coverage: sum of Binomial(n, p) probabilities of the counts whose interval holds p. Wilson's is
    # nominal only on average over p (0.940 at p = 0.5, 0.967 at p = 0.1 for n = 64)
    for n, p in ((64, 0.5), (64, 0.1), (200, 0.7)):
        cover = sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)
                    if wilson_interval(k, n)[0] <= p <= wilson_interval(k, n)[1])
        assert abs(cover - 0.95) < 0.02, (n, p, cover)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_median_interval_is_the_order_statistic_interval_with_its_stated_coverage():
    def cdf(j: int, n: int) -> float:          # P(B <= j), B ~ Binomial(n, 1/2), exactly
        return sum(math.comb(n, i) for i in range(j + 1)) / 2 ** n

    sample = np.random.default_rng(0).permutation(np.r_[np.arange(1.0, 61.0), [np.inf] * 4])   # 4 never fooled
    l = max(j for j in range(1, 33) if cdf(j - 1, 64) <= 0.025)
    assert l == median_rank(64) == 24
    assert median_interval(sample) == (24.0, 41.0)                  # x_(24), x_(64 + 1 - 24) of 1..60, inf x 4
    lo, hi = median_interval(sample)
    assert lo <= float(torch.tensor(sample).median()) <= hi         # the table's point estimate lies inside
    assert median_coverage(64) == pytest.approx(1 - 2 * cdf(23, 64)) and median_coverage(64) >= 0.95
    assert 1 - 2 * cdf(24, 64) < 0.95                              # one rank inwards would fall short
    # upper bound +inf when the never-fooled points reach rank n + 1 - l: honest, not a number
    assert median_interval(np.r_[np.arange(1.0, 41.0), [np.inf] * 24])[1] == math.inf
    assert median_interval([1.0, 2.0, 3.0]) == (-math.inf, math.inf)   # n < 6: no interval reaches 95%
    # coverage over repeated samples of a law with a known median (exponential: ln 2), against the exact one
    rng = np.random.default_rng(1)
    draws = rng.exponential(size=(4000, 25))
    hits = np.array([lo <= math.log(2) <= hi for lo, hi in map(median_interval, draws)])
    exact = median_coverage(25)
    assert exact >= 0.95 and abs(hits.mean() - exact) < 3 * math.sqrt(exact * (1 - exact) / len(hits))


def test_tradeoff_attacks_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"defense.tradeoff_attacks.p.eps"):
        JumpReLUDefense(tradeoff_attacks={"p": {"attack": PGD(), "eps": None}})
    with pytest.raises(ConfigError, match=r"defense.tradeoff_attacks.p"):
        JumpReLUDefense(tradeoff_attacks={"p": {"atack": PGD(), "eps": 0.1}})
