"""Sanity checks fire on the models they are meant to catch, and stay quiet on an ordinary model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robustbench_lab.app.builders import build_attack

from robustbench_lab.app.execute import run_task
from robustbench_lab.app.checks import audit, run_checks
from robustbench_lab.core.evaluator import evaluate
from robustbench_lab.core.norms import Norm

from conftest import compose, fashion_available


def _checks(model, x, y, eps=0.1, level="quick"):
    atk, _ = build_attack(compose(["attack=pgd", f"attack.eps={eps}"]).attack)
    g = torch.Generator().manual_seed(0)
    ev = evaluate(model, x, y, [atk], eps, g)
    return {r.name: r for r in run_checks(model, x, y, [atk], eps, ev.robust, ev.x_adv, ev.n_nan, level, g)}


class Softmaxed(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x).softmax(1)


class Noisy(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x + 0.05 * torch.randn_like(x))


class _Quantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g)   # the true derivative of rounding: zero almost everywhere


class Quantized(nn.Module):
    """Input quantization: shattered gradients (zero everywhere), robust-looking to gradient attacks."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(_Quantize.apply(x))


@pytest.fixture(scope="module")
def pts(fmnist_small):
    _, _, xt, yt = fmnist_small
    return xt[:64], yt[:64]


def test_ordinary_model_passes_every_check(trained_small_cnn, pts):
    res = _checks(trained_small_cnn, *pts)
    assert {"audit", "zero_gradients", "softmax_output", "randomized_output", "single_step_stronger",
            "not_converged", "blackbox_stronger", "eps_monotonicity"} <= set(res)
    fired = [n for n, r in res.items() if r.fired]
    assert fired == [], {n: res[n].message for n in fired}


def test_softmax_model_fires_softmax_check(trained_small_cnn, pts):
    assert _checks(Softmaxed(trained_small_cnn).eval(), *pts)["softmax_output"].fired


def test_randomized_model_fires(trained_small_cnn, pts):
    assert _checks(Noisy(trained_small_cnn).eval(), *pts)["randomized_output"].fired


def test_shattered_gradients_fire_masking_checks(trained_small_cnn, pts):
    res = _checks(Quantized(trained_small_cnn).eval(), *pts)
    assert res["zero_gradients"].fired
    assert res["zero_gradients"].value["fraction_zero"] == 1.0
    # with no gradient PGD is blind; the black-box attack and large epsilons expose it
    assert res["blackbox_stronger"].fired
    assert res["eps_monotonicity"].fired


class _QuantizeBPDA(_Quantize):
    """The same quantization forward, with a straight-through backward."""

    @staticmethod
    def backward(ctx, g):
        return g                      # straight-through surrogate: the identity's derivative


class QuantizedBPDA(Quantized):
    """Quantized input with a BPDA surrogate, switched on by attacks.adaptive.BPDA like JumpReLU's."""

    BPDA_SURROGATES = ("relu",)

    def __init__(self, m):
        super().__init__(m)
        self.bpda = None

    def forward(self, x):
        return self.m((_QuantizeBPDA if self.bpda else _Quantize).apply(x))


def test_bpda_stronger_fires_when_the_surrogate_gradient_breaks_what_white_box_cannot(trained_small_cnn, pts):
    res = _checks(QuantizedBPDA(trained_small_cnn).eval(), *pts)
    r = res["bpda_stronger"]
    assert r.fired, r.message
    assert r.value["bpda"] < r.value["white_box"] - 0.1
    # models without BPDA-capable modules do not get the check
    assert "bpda_stronger" not in _checks(trained_small_cnn, *pts)


def test_audit_detects_violations():
    x = torch.full((4, 1, 2, 2), 0.5)
    ok = audit(x, x + 0.05, Norm.LINF, 0.1, 0, True)
    assert not ok.fired and abs(ok.value["max_linf"] - 0.05) < 1e-6
    assert audit(x, x + 0.2, Norm.LINF, 0.1, 0, True).fired           # over epsilon
    assert audit(x, x + 0.6, Norm.LINF, None, 0, False).fired         # outside [0, 1]
    assert audit(x, x, Norm.LINF, 0.1, 2, True).fired                  # NaNs were produced


@pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")
def test_checks_recorded_in_metrics(tmp_root):
    cfg = compose(["model=small_cnn", "model.train.max_train=2000", "model.train.epochs=1", "data.n_eval=64",
                   "data.n_val=200", "progress=false", "logger=none", "checks=quick"])
    run_task(cfg, tmp_root / "r")
    m = json.loads((tmp_root / "r" / "metrics.json").read_text())
    assert set(m["checks"]) >= {"audit", "zero_gradients", "eps_monotonicity"}
    assert m["checks"]["zero_gradients"]["doc"] == "docs/checks/zero_gradients.md"
    assert m["audit"].startswith("max perturbation")
    assert "Sanity checks" in (tmp_root / "r" / "summary.md").read_text()


def _cascade_table(rows):
    """rows: attack -> (attacked, success) boolean lists over the same 10 points, in cascade order."""
    import pandas as pd
    clean = [True] * 9 + [False]
    return pd.concat([pd.DataFrame({"index": range(10), "attack": name, "clean_correct": clean,
                                    "attacked": att, "success": suc}) for name, (att, suc) in rows.items()])


def test_cascade_evidence_counts_points_the_white_box_attacks_missed():
    """BPDA and Square later in a cascade only see points PGD left robust: what they break, PGD missed."""
    from robustbench_lab.app.checks import _stronger, attack_kind, cascade_evidence
    atks = [build_attack(compose([f"attack={a}", "attack.eps=0.1"]).attack)[0] for a in ("pgd", "pgd_bpda", "square")]
    assert [attack_kind(a) for a in atks] == ["white_box", "bpda", "black_box"]
    T, F = True, False
    pgd = ([T] * 9 + [F], [T, T, T, T, F, F, F, F, F, F])
    bpda = ([F] * 4 + [T] * 5 + [F], [F] * 4 + [T, T, F, F, F, F])
    square = ([F] * 6 + [T] * 3 + [F], [F] * 6 + [T, F, F, F])
    table = _cascade_table({atks[0].name: pgd, atks[1].name: bpda, atks[2].name: square})
    cas = cascade_evidence(atks, table, 10)
    mask = cas.pop("white_box_mask")
    assert mask.tolist() == [F] * 4 + [T] * 5 + [F]        # robust after PGD alone: 5 of 10
    assert cas["bpda_extra"] == 2 and cas["black_box_extra"] == 1 and cas["bpda_extra_fraction"] == 0.2
    fired, value, msg = _stronger("bpda", "bpda", 0.5, 0.5, cas)   # the probe alone would stay quiet
    assert fired and value["cascade_extra_broken"] == 2 and "2 points" in msg
    # without a white-box attack before them, adaptive/black-box successes testify to nothing
    cas2 = cascade_evidence(atks[1:], table[table["attack"] != atks[0].name], 10)
    assert cas2 == {"white_box_mask": None}
    assert not _stronger("bpda", "bpda", 0.5, 0.5, cas2)[0]
