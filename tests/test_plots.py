"""Every kind of figure the project draws, rendered from small synthetic sweeps and results, read back from
the saved figure: axis labels, legend entries in words (not column names), text at 9 pt or more, error bars
only where more than one seed (or image) ran and never of zero length, distinct colours for distinct
entries, no legend over the data; and the tables: caption, mean ± CI cells, escaped names, right-aligned
numbers."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_hex

from robustbench_lab.app.report import aggregate
from robustbench_lab.core import plotstyle, tables
from robustbench_lab.core.results import plot_curve, plot_examples
from robustbench_lab.linearization.analyses import plots as lin
from robustbench_lab.linearization.spectra import Spectrum

from test_sweep import _fake_run   # one writer of a finished cell's metrics.json for both files


# ------------------------------------------------------------------------------------------------ checks
def _bars(fig) -> list[float]:
    """Lengths (display units) of every error bar drawn in ``fig``."""
    from matplotlib.container import ErrorbarContainer
    out = []
    for ax in fig.axes:
        for c in ax.containers:
            if isinstance(c, ErrorbarContainer):
                for coll in c.lines[2]:
                    out += [float(np.hypot(*(s[1] - s[0]))) for s in coll.get_segments()]
    return out


def _colour(handle) -> str:
    for get in ("get_color", "get_facecolor"):
        if hasattr(handle, get):
            c = getattr(handle, get)()
            c = np.asarray(c, dtype=float) if not isinstance(c, str) else c
            return to_hex(c[0] if not isinstance(c, str) and c.ndim == 2 else c, keep_alpha=False)
    raise AssertionError(f"no colour for {handle!r}")


def check(fig, *, bars: bool | None = None, words: tuple[str, ...] = ()) -> list[str]:
    """The rules every figure keeps; returns its legend texts."""
    plotstyle.drawn(fig)
    assert plotstyle.small_texts(fig) == [], plotstyle.small_texts(fig)
    texts = []
    for ax in fig.axes:
        has_data = ax.get_lines() or ax.collections or ax.patches
        if has_data and ax.get_visible() and not ax.images:
            assert ax.get_ylabel().strip(), "an axes with data but no y label"
            assert not plotstyle.is_column_name(ax.get_ylabel()) and not plotstyle.is_column_name(ax.get_xlabel())
        leg = ax.get_legend()
        if leg is None:
            continue
        assert not plotstyle.covers_data(leg), f"the legend covers data: {[t.get_text() for t in leg.get_texts()]}"
        labels = [t.get_text() for t in leg.get_texts()]
        assert all(not plotstyle.is_column_name(t) for t in labels), labels
        colours = [_colour(h) for h in leg.legend_handles]
        assert len(set(colours)) == len(colours), f"shared colours in {list(zip(labels, colours))}"
        texts += labels
    for w in words:
        assert any(w in t for t in texts), (w, texts)
    lengths = _bars(fig)
    assert all(v > 0 for v in lengths), "an error bar of zero length"
    if bars is not None:
        assert bool(lengths) == bars, f"error bars drawn: {len(lengths)}, expected {'some' if bars else 'none'}"
    return texts


def _xlabels(fig) -> list[str]:
    return [ax.get_xlabel() for ax in fig.axes]


# ------------------------------------------------------------------------------------------------ sweeps
def _sweep(root: Path, seeds: int) -> Path:
    """PGD and FGSM at three epsilons, with and without JumpReLU, and a trust-region (minimal-norm) run."""
    for s in range(seeds):
        for atk, base in (("pgd", 0.5), ("fgsm", 0.6)):
            for eps in (0.05, 0.1, 0.2):
                for defense, off in (("none", 0.0), ("jumprelu", 0.1)):
                    _fake_run(root / f"{atk}_{eps}_{defense}_{s}", seed=s, attack=atk, eps=eps, defense=defense,
                              robust_accuracy=base + off - eps + 0.03 * s, clean_accuracy=0.9 - off / 2 + 0.01 * s,
                              grad_evals_per_example=20 if atk == "pgd" else 1, median_l2=1 + eps + 0.1 * s)
        d = root / f"tr_{s}"
        _fake_run(d, attack="trust_region", eps=None, seed=s, robust_accuracy=0.0, median_l2=0.8 + 0.05 * s)
        pd.DataFrame({"eps": [0.0, 0.05, 0.1, 0.2], "robust_accuracy": [0.9, 0.5 - 0.02 * s, 0.2, 0.0]}).to_csv(
            d / "robust_accuracy_curve.csv", index=False)
    return root


@pytest.mark.parametrize("seeds", [1, 3])
def test_sweep_report_figures(tmp_path, seeds):
    with plotstyle.capture() as saved:
        w = aggregate([_sweep(tmp_path / "sweep", seeds)], tmp_path / "out")
    figs = {p.stem: f for p, f in saved}
    assert set(figs) == {"robust_vs_eps", "clean_vs_robust", "cost_vs_size", "seed_spread"}
    assert all(w[k].stat().st_size > 1000 for k in figs)
    several = seeds > 1
    texts = check(figs["robust_vs_eps"], bars=several,
                  words=("PGD / no defense", "FGSM / JumpReLU", "Trust region / no defense (minimal norm)"))
    assert len(texts) == 5 and _xlabels(figs["robust_vs_eps"]) == ["Epsilon (L-inf)"]
    assert figs["robust_vs_eps"].axes[0].get_ylabel() == "Robust accuracy"
    check(figs["clean_vs_robust"], bars=several, words=("PGD / JumpReLU",))
    assert _xlabels(figs["clean_vs_robust"]) == ["Clean accuracy"]
    check(figs["cost_vs_size"], bars=several, words=("PGD", "FGSM", "Trust region"))
    assert figs["cost_vs_size"].axes[0].get_ylabel() == "Median L2 of successful perturbations"
    check(figs["seed_spread"], bars=several, words=("Each seed", "Mean over seeds"))
    ticks = [t.get_text() for t in figs["seed_spread"].axes[0].get_xticklabels()]
    assert "PGD / no defense, eps 0.1" in ticks and "Trust region / no defense, minimal norm" in ticks

    md, tex = w["md"].read_text(), w["tex"].read_text()
    assert "Table: Mean over seeds" in md and "| Robust accuracy |" in md and "robust_accuracy" not in md
    assert r"\caption{Mean over seeds" in tex and r"fashion\_mnist" in tex and r"trust\_region" in tex
    if several:   # 0.5 - 0.1 + (0, 0.03, 0.06): mean 0.43, sd 0.03, t(0.975, 2) 4.303 -> 0.0745
        assert "| 0.430 ± 0.075 |" in md and r"0.430 $\pm$ 0.075" in tex
    else:         # one seed: the value alone, never "± 0" or "± nan"
        cells = [ln for ln in md.splitlines() if ln.startswith("| ")]
        assert not any("±" in ln for ln in cells) and "| 0.4 |" in md
        assert not any(r"\pm" in ln for ln in tex.splitlines() if ln.endswith(r"\\"))


def test_per_run_figures(tmp_path):
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    curve = pd.DataFrame({"eps": np.linspace(0, 0.5, 21), "robust_accuracy": np.linspace(0.9, 0.0, 21)})
    with plotstyle.capture() as saved:
        plot_examples(tmp_path / "examples.png", x, x.flip(-1), np.arange(8), np.arange(8),
                      np.array([0, 2, 2, 3, 9, 5, 6, 1]), names)
        plot_curve(tmp_path / "robust_accuracy_curve.png", curve, "trust_region on resnet20/fashion_mnist",
                   "epsilon (l2)")
    (_, ex), (_, cu) = saved
    check(ex, bars=False)
    titles = [ax.get_title() for ax in ex.axes]
    assert "Ankle boot" in titles and "T-shirt/\ntop" in titles
    assert [ax.get_ylabel() for ax in ex.axes if ax.get_ylabel()] == ["clean", "adversarial"] * 2
    check(cu, bars=False)
    assert cu.axes[0].get_xlabel() == "Epsilon (L2)" and cu.axes[0].get_ylabel() == "Robust accuracy"


def test_jumprelu_tradeoff_figure(tmp_path):
    from defenses.jumprelu.plot import plot_tradeoff
    k = np.array([0.0, 0.1, 0.2, 0.4])
    table = pd.DataFrame({"k": k, "val_accuracy": [0.92, 0.915, 0.91, 0.6], "chosen": [False, False, True, False],
                          "pgd_robust_accuracy": [0.0, 0.02, 0.05, 0.1], "pgd_graybox_robust_accuracy": [0, 0.1, 0.2, 0.3],
                          "tr_l2_robust_accuracy": [0.0, 0.0, 0.0, 0.0], "tr_l2_median_min_l2": [0.2, 0.25, 0.3, np.inf],
                          "deepfool_l2_median_min_l2": [0.25, 0.4, 0.9, 2.0]})
    with plotstyle.capture() as saved:
        plot_tradeoff(tmp_path / "t.png", table, 0.01)
    texts = check(saved[0][1], bars=False, words=("PGD: robust accuracy", "PGD gray-box: robust accuracy",
                                                  "TR L2: median minimal L2", "DeepFool L2: median minimal L2",
                                                  "Chosen k = 0.2"))
    assert not any("TR L2: robust" in t for t in texts)   # a minimizer's "robust accuracy" is no accuracy at a budget


def _ng_summary(seeds: int) -> pd.DataFrame:
    rows = []
    for i, (arm, role, target, level, predictor) in enumerate([
            ("ng_v1", "guided", "V1-like Gabor bank (model-derived)", 1.0, "direct"),
            ("ng_stage2", "guided", "resnet20 stage 2 (model-derived)", 2.0, "direct"),
            ("ng_stage3", "guided", "resnet20 stage 3 (model-derived)", 3.0, "direct"),
            ("ng_stage3_predictor", "guided (trained predictor)", "resnet20 stage 3 (model-derived)", 3.0, "trained"),
            ("ng_baseline_alpha0", "control: alpha=0", "resnet20 stage 3 (model-derived)", None, "direct"),
            ("ng_shuffled", "control: shuffled predictor", "resnet20 stage 3 (model-derived)", None, "shuffled")]):
        r = {"arm": arm, "role": role, "target": target, "source_kind": "surrogate", "level": level, "alpha": 0.9,
             "predictor": predictor, "weight_decay": 5e-4, "n_seeds": seeds, "clean_accuracy": 0.8 - 0.01 * i,
             "smoothness_score": 1.0 + 0.2 * i, "rsa": 0.5, "robust@0.02": 0.7 - 0.01 * i, "robust@0.05": 0.5 - 0.01 * i,
             "smooth@0.02": 1.0, "smooth@0.05": 1.2}
        if seeds > 1:
            r.update({"clean_accuracy_sd": 0.01, "smoothness_score_sd": 0.1, "robust@0.02_sd": 0.02,
                      "robust@0.05_sd": 0.03})
        rows.append(r)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seeds", [1, 3])
def test_neural_guidance_figures_and_table(tmp_path, seeds):
    plot = importlib.import_module("experiments.neural_guidance_hierarchy.plot")
    with plotstyle.capture() as saved:
        w = plot.write_summary(_ng_summary(seeds), tmp_path, eps=0.05)
    figs = {p.stem: f for p, f in saved}
    assert set(figs) == {"ng_robust_vs_eps", "ng_smoothness_by_level", "ng_robust_by_level"}
    texts = check(figs["ng_robust_vs_eps"], bars=seeds > 1,
                  words=("V1-like Gabor bank (model-derived)", "resnet20 stage 3 (model-derived), trained predictor",
                         "Control: no guidance (alpha = 0), weight decay 0.0005", "Control: shuffled predictor"))
    assert len(texts) == 6
    for name in ("ng_smoothness_by_level", "ng_robust_by_level"):
        check(figs[name], bars=seeds > 1, words=("Guided (exact targets)", "Control: shuffled predictor"))
    md = w["md"].read_text()
    assert "Table: Per arm: mean over seeds" in md and "NOT brain data" in md and "smooth@" not in md
    if seeds > 1:   # sd 0.02 over 3 seeds: 95% half-width 4.303 * 0.02 / sqrt(3) = 0.0497
        assert "| 0.700 ± 0.050 |" in md and "_sd" not in md
    else:
        assert not any("±" in ln for ln in md.splitlines() if ln.startswith("| "))


def test_acl_variants_figure_and_tables(tmp_path):
    summ = importlib.import_module("experiments.acl_variants.summarize")
    rows = [{"arm": arm, "label": summ.LABELS[arm], "protocol": "aff", "seed": seed, "n_examples": 500,
             "attack": "pgd", "eps": 0.1, "clean_accuracy": clean + 0.01 * seed, "robust_accuracy": rob + 0.02 * seed,
             "selected_epoch": 3, "val_robust_accuracy": 0.6, "pretrain_final_nt_xent": None,
             "pretrain_seconds": 0.0, "finetune_seconds": 10.0}
            for arm, clean, rob, seeds in (("none", 0.74, 0.58, [0]), ("simclr", 0.73, 0.59, [0, 1, 2]),
                                           ("ds", 0.77, 0.62, [0, 1, 2]))
            for seed in seeds]
    with plotstyle.capture() as saved:
        w = summ.write(rows, tmp_path)
    fig = saved[0][1]
    check(fig, words=("Clean accuracy (mean over seeds)", "PGD robust accuracy (mean over seeds)", "Each seed"))
    # bars for the two three-seed arms only (clean and robust each): 4 bars; none for the one-seed arm
    assert len(_bars(fig)) == 4
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks[0].endswith("(1 seed)") and ticks[1].endswith("(3 seeds)")
    md = w["md"].read_text()
    # ds robust over seeds 0.62, 0.64, 0.66: sd 0.02 -> 0.0497; the one-seed arm has no interval
    assert "Table: One row per run." in md and "| 0.640 ± 0.050 |" in md
    assert "| no pre-training (TRADES from scratch) | aff | 1 | 0.740 | 0.580 |" in md


# ------------------------------------------------------------------------------------------ linearization
def _spectrum(rng, n: int, complete: bool = True) -> Spectrum:
    v = np.sort(rng.uniform(0.0, 2.0, n))[::-1]
    if complete:
        return Spectrum(v, "explicit", 0.0, True, n, n_in=n, n_out=n)
    return Spectrum(np.concatenate([v[:3], v[-3:]]), "lanczos", 0.0, False, n, n_in=n, n_out=n, n_top=3)


@pytest.mark.parametrize("n_images", [1, 2])
def test_linearization_figures(tmp_path, n_images):
    rng = np.random.default_rng(0)
    cap = lin.Caption("resnet20 / fashion_mnist", "BasicBlock")
    units = ["s1u1", "s1u2", "s2u1", "s2u2", "s3u1"]
    starts = [1.5, 3.5]
    agg = pd.DataFrame([{"boundary": b, "unit": u, "random_mean": 0.01 * (i + 1), "adversarial_mean": 0.1 * (i + 1),
                         "random_std": 0.002 if n_images > 1 else math.nan,
                         "adversarial_std": 0.02 if n_images > 1 else math.nan, "chance": 0.005}
                        for b in ("pre", "post") for i, u in enumerate(units)])
    names = ["stem", *units, "logits"]
    prop = pd.DataFrame([{"image": im, "kind": kind, "state_index": j, "state": s,
                          "diff_l2": (1 + j) * (3 if kind == "adversarial" else 1) * (1 + 0.1 * im), "gain": 1.1}
                         for im in range(n_images) for kind in ("random", "adversarial") for j, s in enumerate(names)])
    pooled = {(b, u): [_spectrum(rng, 40, complete=i > 1) for _ in range(n_images)]
              for b in ("pre", "post") for i, u in enumerate(units)}
    explicit = {(b, "s1u2"): [_spectrum(rng, 40)] for b in ("pre", "post")}
    bands = pd.DataFrame({"frac_one": [math.nan, math.nan, 0.1, 0.2, 0.3], "frac_one_lo": [0.0, 0.0, 0.1, 0.2, 0.3],
                          "frac_one_hi": [0.6, 0.5, 0.1, 0.2, 0.3]})
    stage_pooled = {(b, s): [_spectrum(rng, 30, complete=s > 0)] for b in ("pre", "post") for s in range(3)}
    settings = [("skip", 0.0, 1.0), ("skip", 0.5, 1.0), ("skip", 1.0, 1.0), ("weight", 1.0, 0.5), ("weight", 1.0, 2.0)]
    curves = {(b, *s): [_spectrum(rng, 30) for _ in range(n_images)] for b in ("pre", "post") for s in settings}
    with plotstyle.capture() as saved:
        lin.plot_energy(tmp_path / "energy.png", agg, ["pre", "post"], 3, cap, starts, n_images)
        lin.plot_propagation(tmp_path / "propagation.png", prop, names, [1.5, 3.5, 5.5], cap)
        lin.plot_unit_bands(tmp_path / "unit_spectra_pre.png", "pre", bands, pooled, explicit, units, starts, 0.01,
                            cap, n_images, 1, 3, "LM")
        lin.plot_histograms(tmp_path / "unit_histograms_pre.png", "pre",
                            {u: pooled[("pre", u)] for u in units[2:]} | {"s1u2": explicit[("pre", "s1u2")]}, 0.01, cap)
        lin.plot_stage_spectra(tmp_path / "stage_spectra.png", stage_pooled, ["pre", "post"], [0, 1, 2], cap, 3,
                               "LM", n_images)
        lin.plot_scale_sweep(tmp_path / "scale_sweep.png", curves, settings, ["pre", "post"], "s3u1", "BasicBlock",
                             cap, n_images)
    figs = {p.stem: f for p, f in saved}
    check(figs["energy"], bars=n_images > 1, words=("Random perturbation (mean over images)", "k / n"))
    check(figs["propagation"], bars=False, words=("Adversarial perturbation",))
    check(figs["unit_spectra_pre"], bars=False, words=("complete spectra", "explicit units' complete spectra",
                                                       "Lanczos top/bottom-3", "fraction within 0.01 of 1",
                                                       "its bounds (partial spectra)"))
    check(figs["unit_histograms_pre"], bars=False)
    assert len([ax for ax in figs["unit_histograms_pre"].axes if ax.get_visible() and ax.patches]) == 4
    check(figs["stage_spectra"], bars=False, words=("complete spectrum", "Lanczos top/bottom-3 (which=LM)"))
    check(figs["scale_sweep"], bars=False, words=("lambda = 0.5", "weights x 2"))


# ------------------------------------------------------------------------------------------------- rules
def test_style_rules_themselves(tmp_path):
    assert plotstyle.words("robust_accuracy") == "Robust accuracy"
    assert plotstyle.words("attack_success_rate") == "Attack success rate"
    assert plotstyle.words("pgd_graybox_robust_accuracy") == "PGD gray-box: robust accuracy"
    assert plotstyle.words("trust_region") == "Trust region" and plotstyle.words("none") == "no defense"
    assert plotstyle.words("attack.steps") == "attack.steps"          # a config key stays as users type it
    assert len(set(plotstyle.colors(30))) == 30
    with plotstyle.style() as plt:
        fig, ax = plt.subplots()
        assert not plotstyle.seed_errorbars(ax, [0, 1], [0.5, 0.6], [0.1, 0.1], 1, "k")          # one seed
        assert not plotstyle.seed_errorbars(ax, [0, 1], [0.5, 0.6], [np.nan, np.nan], 3, "k")    # unknown spread
        assert plotstyle.seed_errorbars(ax, [0, 1], [0.5, 0.6], [0.1, np.nan], [3, 3], "k")
        assert len(_bars(fig)) == 1
        plt.close(fig)
        # a legend that would sit on the data is moved outside the axes, and then covers nothing
        fig, ax = plt.subplots(figsize=(4, 3))
        xs = np.linspace(0, 1, 60)
        for i in range(8):
            ax.plot(xs, np.full_like(xs, i / 7), label=f"curve number {i}")
        leg = plotstyle.legend(ax)
        plotstyle.drawn(fig)
        assert plotstyle.covers_data(leg)
        with plotstyle.capture() as saved:
            plotstyle.save(fig, tmp_path / "legend_check.png")
        leg = saved[0][1].axes[0].get_legend()
        assert leg.get_bbox_to_anchor().x0 > saved[0][1].axes[0].get_window_extent().x1
        assert not plotstyle.covers_data(leg)


def test_tables_escape_caption_and_intervals():
    df = pd.DataFrame({"attack": ["pgd|fast*", "cw_l2 & 50%"], "robust_accuracy": [0.5, 0.25],
                       "robust_accuracy_ci95": [0.0249, math.nan], "n_seeds": [3, 1]})
    shown = tables.with_intervals(df)
    assert list(shown.columns) == ["attack", "robust_accuracy", "n_seeds"]
    md = tables.markdown(shown, "Robust accuracy; ± 95% CI")
    lines = md.splitlines()
    assert lines[0] == "Table: Robust accuracy; ± 95% CI"
    assert lines[2] == "| Attack | Robust accuracy | Seeds |" and lines[3] == "|---|---:|---:|"
    assert lines[4] == r"| pgd\|fast\* | 0.500 ± 0.025 | 3 |" and lines[5] == "| cw_l2 & 50% | 0.25 | 1 |"
    tex = tables.latex(shown, "Robust accuracy; ± 95% CI_x", label="tab:t")
    assert r"\caption{Robust accuracy; $\pm$ 95\% CI\_x}" in tex and r"\label{tab:t}" in tex
    assert r"\begin{tabular}{lrr}" in tex and r"cw\_l2 \& 50\%" in tex and r"0.500 $\pm$ 0.025" in tex
    assert r"\toprule" in tex and r"Robust accuracy" in tex
