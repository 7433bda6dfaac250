"""task=linearize end to end on a tiny ResNet (depth 14, width 2: 6 units, 1568 / 784 / 392 dims per stage)
trained for one short epoch on a slice of the default data: the tables, plots and metrics it writes hold
what the analysis promises, checked against independent computations on the zoo's modules; cells resume;
bad values stop the run with a ConfigError naming the key before any data is read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from omegaconf import OmegaConf

from robustbench_lab.app import schema
from robustbench_lab.app.builders import build_model
from robustbench_lab.app.cells import relevant_config
from robustbench_lab.app.execute import execute
from robustbench_lab.app.linearize import operator_factory, parse_options
from robustbench_lab.core.cache import load_weights
from robustbench_lab.core.data import get_card
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.zoo import BasicBlock
from robustbench_lab.linearization.analyses.tables import spectrum_stats
from robustbench_lab.linearization.operators import TorchJacobian
from robustbench_lab.linearization.options import LinearizeOptions, as_plain
from robustbench_lab.linearization.spectra import singular_values
from robustbench_lab.linearization.units import unit_function

from conftest import ROOT, compose, fashion_available

pytestmark = [pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed"),
              pytest.mark.usefixtures("one_thread")]

TINY = ["task=linearize", "model=resnet20", "+model.kwargs.depth=14", "+model.kwargs.width=2",
        # ~5 s of training, ~55% test accuracy: enough correctly classified images
        "model.train.max_train=6000", "model.train.epochs=2", "model.train.lr=0.1",
        "data.n_eval=64", "data.n_val=200", "progress=false", "logger=none",
        "linearize.boundary=both", "linearize.n_images=2", "linearize.k=3",
        "linearize.units=1",                      # one unit per stage: s1u1, s2u1, s3u1
        "linearize.explicit_max=1000",            # stage-1 units (1568 dims) go to Lanczos, the rest explicit
        "linearize.which=LM", "linearize.stages.which=LM",   # the slow bottom end: test_lanczos_* below
        "linearize.explicit_units=[s1u2]", "linearize.explicit_images=1",
        "linearize.stages.n_images=1", "linearize.stages.k=3",
        "linearize.sweep.unit=s3u2", "linearize.sweep.n_images=1",
        "linearize.perturbation.attack.iterations=30"]
TOL = 1e-3


def _paths(root: Path) -> list[str]:
    return [f"paths.root_dir={root}", f"paths.cache_dir={root}/cache"]


@pytest.fixture(scope="module")
def lin(tmp_path_factory):
    root = tmp_path_factory.mktemp("lin")
    cfg = compose(TINY + _paths(root))
    run_dir = root / "outputs" / "runs" / "lin"
    execute(cfg, run_dir)
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"root": root, "cfg": cfg, "run_dir": run_dir, "metrics": m}


def _trained_model(lin) -> torch.nn.Module:
    """The run's network, loaded from the cached checkpoint it used (independently of the analysis code)."""
    model = build_model(lin["cfg"], get_card("fashion_mnist"))
    load_weights(model, Path(lin["metrics"]["checkpoint"]), what="test")
    return model.eval()


def _block(net, name: str):
    s, u = name[1:].split("u")
    return net.stages[int(s) - 1][int(u) - 1]


def _unit_input(net, xn: torch.Tensor, name: str) -> torch.Tensor:
    """Input of unit ``name`` for normalized inputs ``xn``, through the zoo's own modules."""
    h = net.stem(xn)
    for si, stage in enumerate(net.stages):
        for ui, blk in enumerate(stage):
            if f"s{si + 1}u{ui + 1}" == name:
                return h
            h = blk(h)
    raise KeyError(name)


def test_outputs_complete_and_tables_one_row_per_unit(lin):
    m, d = lin["metrics"], lin["run_dir"]
    assert m["task"] == "linearize" and m["boundary"] == "pre+post" and m["block"] == "BasicBlock"
    assert m["n_units"] == 6 and m["n_images"] == 2
    for name in m["result_files"]:
        assert (d / name).is_file(), name
    for name in ("unit_spectra.csv", "unit_spectra_pre.png", "unit_spectra_post.png", "stage_spectra.csv",
                 "scale_sweep.csv", "scale_sweep.png", "propagation.csv", "propagation.png", "energy.csv",
                 "energy.png", "summary.md", "singular_values.npz", "perturbations.npz"):
        assert name in m["result_files"], name
    assert not (d / ".staging").exists()
    assert m["units"] == ["s1u1", "s2u1", "s3u1"]
    units = pd.read_csv(d / "unit_spectra.csv")
    assert len(units) == 6 and set(units["boundary"]) == {"pre", "post"}
    for b in ("pre", "post"):
        assert list(units[units["boundary"] == b]["unit"]) == ["s1u1", "s2u1", "s3u1"]
    assert (units["n_images"] == 2).all() and (units["block"] == "BasicBlock").all()
    for col in ("frac_one_lo", "frac_one_hi"):
        assert units[col].between(0, 1).all(), col
    assert (units["frac_one_lo"] <= units["frac_one_hi"] + 1e-12).all()
    # units with 1568 input dims (> explicit_max) get partial Lanczos spectra: exact fraction unknown (NaN)
    big = units[units["n_in"] > 1000]
    assert list(big["unit"].unique()) == ["s1u1", "s2u1"]
    assert (big["method"] == "lanczos").all() and big["frac_one"].isna().all() and (~big["complete"]).all()
    rest = units[units["n_in"] <= 1000]
    assert rest["method"].isin(["explicit", "lowrank", "explicit+lowrank"]).all() and rest["complete"].all()
    assert np.allclose(rest["frac_one"], rest["frac_one_lo"]) and np.allclose(rest["frac_one"], rest["frac_one_hi"])
    # after the post-addition ReLU, the rows of inactive outputs are zero: singular values 0
    assert (units[units["boundary"] == "post"]["sigma_min"] <= 1e-4).all()
    summary = (d / "summary.md").read_text()
    assert summary.startswith("# Linearization of resnet20 (BasicBlock)") and "boundary" in summary
    stages = pd.read_csv(d / "stage_spectra.csv")
    assert len(stages) == 6 and set(stages["stage"]) == {1, 2, 3}
    assert list(stages[stages["boundary"] == "pre"].sort_values("stage")["n_in"]) == [1568, 1568, 784]


def test_explicit_spectrum_matches_an_independent_jacobian(lin):
    """The stored spectra of s3u1 (a downsampling unit) and s1u2 (explicit_units), first image, equal the SVD
    of the Jacobian computed here with torch.autograd on the zoo's block at the unit input reached through
    the zoo's own modules, at both boundaries."""
    m, d = lin["metrics"], lin["run_dir"]
    model = _trained_model(lin)
    net = model.net
    pert = np.load(d / "perturbations.npz")
    x = torch.from_numpy(pert["x"][:1])
    idx = int(m["image_indices"][0])
    sv = np.load(d / "singular_values.npz")
    for level, name in (("unit", "s3u1"), ("unit_explicit", "s1u2")):
        blk = _block(net, name)
        with torch.no_grad():
            x0 = _unit_input(net, model.normalize(x), name)[0]
        for b, fn in (("pre", blk.pre_activation), ("post", blk.forward)):
            jac = torch.autograd.functional.jacobian(lambda z: fn(z[None])[0], x0)
            ref = torch.linalg.svdvals(jac.reshape(-1, x0.numel()).double()).numpy()
            got = sv[f"{level}/{b}/{name}/trained/img{idx}"]
            assert got.shape == ref.shape
            np.testing.assert_allclose(np.sort(got)[::-1], ref, atol=2e-4 * ref.max())


def test_perturbations_have_equal_norm_and_propagate_through_the_stem(lin):
    d = lin["run_dir"]
    pert = np.load(d / "perturbations.npz")
    x, dr, da = (torch.from_numpy(pert[k]) for k in ("x", "d_random", "d_adversarial"))
    nr, na = dr.flatten(1).norm(dim=1), da.flatten(1).norm(dim=1)
    assert (na > 0).all()
    torch.testing.assert_close(nr, na, rtol=1e-5, atol=0)
    # the perturbations are different directions (the random one is not the adversarial one rescaled)
    cos = (dr.flatten(1) * da.flatten(1)).sum(1) / (nr * na)
    assert (cos.abs() < 0.5).all()
    prop = pd.read_csv(d / "propagation.csv")
    assert set(prop["kind"]) == {"random", "adversarial"}
    n_states = 1 + 6 + 1   # stem, units, logits
    assert len(prop) == 2 * 2 * n_states
    model = _trained_model(lin)
    for kind, dd in (("random", dr), ("adversarial", da)):
        with torch.no_grad():
            want = (model.net.stem(model.normalize(x + dd)) - model.net.stem(model.normalize(x))).flatten(1).norm(dim=1)
        got = prop[(prop["kind"] == kind) & (prop["state"] == "stem")].sort_values("image")
        order = np.argsort(pert["index"])
        np.testing.assert_allclose(got["diff_l2"].to_numpy(), want.numpy()[order], rtol=1e-4)
        np.testing.assert_allclose(got["input_l2"].to_numpy(), nr.numpy()[order], rtol=1e-5)
        # gain at the stem is relative to the input perturbation
        np.testing.assert_allclose(got["gain"].to_numpy(), (want / nr).numpy()[order], rtol=1e-4)
        # logits: the same computation through the whole model
        with torch.no_grad():
            wl = (model(x + dd) - model(x)).flatten(1).norm(dim=1)
        gl = prop[(prop["kind"] == kind) & (prop["state"] == "logits")].sort_values("image")
        np.testing.assert_allclose(gl["diff_l2"].to_numpy(), wl.numpy()[order], rtol=1e-4, atol=1e-6)


def test_skip_scale_changes_the_fraction_equal_to_one(lin):
    sw = pd.read_csv(lin["run_dir"] / "scale_sweep.csv")
    pre = sw[(sw["boundary"] == "pre") & (sw["sweep"] == "skip")].set_index("skip_scale")
    assert set(pre.index) == {0.0, 0.5, 0.9, 1.0, 1.1, 2.0}
    assert pre.loc[1.0, "frac_one"] != pre.loc[0.0, "frac_one"]
    assert (pre["frac_eq_lambda"].between(0, 1)).all()
    # at lambda = 1 "equal to lambda" and "equal to 1" are the same count
    assert pre.loc[1.0, "frac_eq_lambda"] == pre.loc[1.0, "frac_one"]
    w = sw[(sw["boundary"] == "pre") & (sw["sweep"] == "weight")].set_index("weight_scale")
    assert set(w.index) == {0.5, 1.0, 2.0}
    # the weight sweep at x1 is the unscaled unit: the same spectrum as lambda = 1
    assert w.loc[1.0, "top1"] == pytest.approx(pre.loc[1.0, "top1"], rel=1e-6)
    # scaling restored: the unit-spectra table (computed before the sweep) and the trained weights agree
    units = pd.read_csv(lin["run_dir"] / "unit_spectra.csv")
    assert (units["top1"] > 0).all()


def test_energy_fractions_and_chance(lin):
    e = pd.read_csv(lin["run_dir"] / "energy.csv")
    assert len(e) == 6
    for col in ("random_mean", "adversarial_mean"):
        assert e[col].between(0, 1 + 1e-6).all(), col
    np.testing.assert_allclose(e["chance"], e["k"] / e["n_in"])


def _small_unit(boundary: str, channels: int = 2, size: int = 8, seed: int = 0):
    """A random BasicBlock (BatchNorm statistics randomized, eval mode) at a random nonnegative input."""
    torch.manual_seed(seed)
    blk = BasicBlock(channels, channels).eval()
    for bn in (blk.bn1, blk.bn2):
        bn.weight.data.uniform_(0.2, 1.0)
        bn.bias.data.uniform_(-0.3, 0.3)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    x0 = torch.randn(channels, size, size).relu()
    return blk, x0, TorchJacobian(unit_function(blk, boundary), x0, dtype=torch.float64)


@pytest.mark.parametrize("boundary", ["pre", "post"])
def test_lanczos_ends_and_bounds_agree_with_the_explicit_spectrum(boundary):
    blk, x0, op = _small_unit(boundary)
    full = singular_values(op, x0, method="explicit", k=4, explicit_max=10_000, block=blk, boundary=boundary)
    part = singular_values(op, x0, method="lanczos", k=4, explicit_max=10_000, block=blk, boundary=boundary,
                           which="both")
    assert full.complete and not part.complete and full.n == part.n == 128
    np.testing.assert_allclose(part.top, full.top[:4], rtol=1e-6)
    if boundary == "pre":
        np.testing.assert_allclose(part.bottom, full.top[-4:], rtol=1e-5, atol=1e-9)
        assert part.n_zero == 0
    else:   # rows of inactive outputs are zero: at least that many exact zeros, found without Lanczos
        assert part.n_zero >= 4 and (part.bottom == 0).all() and "exact zeros" in part.note
        assert int(np.sum(full.top < 1e-9)) >= part.n_zero
    for tol in (1e-3, 0.1, 0.5, 2.0):
        exact = spectrum_stats(full, tol)
        b = spectrum_stats(part, tol)
        assert exact["frac_lo"] == exact["frac"] == exact["frac_hi"]
        assert 0 <= b["frac_lo"] <= exact["frac"] + 1e-12 and exact["frac"] <= b["frac_hi"] + 1e-12 <= 1 + 1e-12
        assert b["max"] == pytest.approx(exact["max"]) and b["min"] == pytest.approx(exact["min"], abs=1e-9)


def test_lanczos_that_does_not_converge_leaves_the_end_unknown():
    blk, x0, op = _small_unit("pre", channels=4, size=16)
    sp = singular_values(op, x0, method="lanczos", k=3, explicit_max=100, block=blk, boundary="pre", which="SM",
                         maxiter=1)
    assert sp.top.size == 0 and sp.bottom.size == 0 and "not converged" in sp.note
    st = spectrum_stats(sp, 1e-3)
    assert np.isnan(st["min"]) and np.isnan(st["max"]) and st["frac_lo"] == 0.0 and st["frac_hi"] == 1.0


def test_jax_backend_gives_the_torch_spectrum():
    pytest.importorskip("jax")
    blk, x0, op_t = _small_unit("post")
    op_j = operator_factory("jax")(unit_function(blk, "post"), x0, batch_size=64, dtype=torch.float64)
    a = singular_values(op_t, x0, method="explicit", k=4, explicit_max=10_000, block=blk, boundary="post")
    b = singular_values(op_j, x0, method="explicit", k=4, explicit_max=10_000, block=blk, boundary="post")
    np.testing.assert_allclose(b.top, a.top, rtol=1e-6, atol=1e-9)
    assert a.n_zero == b.n_zero > 0


def test_jax_backend_without_jax_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)   # import jax -> ImportError
    with pytest.raises(ConfigError, match="jax is not installed") as ei:
        operator_factory("jax")
    assert ei.value.key == "linearize.backend"


def test_cell_is_restored_with_its_files(lin, capsys):
    out = lin["root"] / "outputs" / "runs" / "again"
    execute(lin["cfg"], out)
    assert "done before" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m.get("restored_from_cell")
    for name in lin["metrics"]["result_files"]:
        assert (out / name).is_file(), name


def test_evaluation_cell_keys_unchanged_by_the_linearize_node():
    """Adding task/linearize to the config must not change the keys of stored evaluation cells."""
    rc = relevant_config(compose(["logger=none"]))
    assert "task" not in rc and "linearize" not in rc
    assert "linearize" in relevant_config(compose(["logger=none", "task=linearize"]))


@pytest.mark.parametrize("override,key", [
    ("task=explain", "task"), ("linearize.backend=tensorflow", "linearize.backend"),
    ("linearize.boundary=middle", "linearize.boundary"), ("linearize.method=qr", "linearize.method"),
    ("linearize.units=[s1u1,s9u9]", "linearize.units[1]"), ("linearize.sweep.unit=s7u1", "linearize.sweep.unit"),
    ("linearize.analyses=[units,magic]", "linearize.analyses[1]"), ("linearize.n_images=0", "linearize.n_images"),
    ("linearize.perturbation.attack.norm=linf", "linearize.perturbation.attack.norm"),
    ("model=small_cnn", "model.name"),
])
def test_bad_value_is_a_config_error_before_any_work(tmp_path, override, key):
    base = [o for o in TINY if not (override.startswith("model=") and o.lstrip("+").startswith("model"))]
    cfg = compose(base + _paths(tmp_path) + [override])
    with pytest.raises(ConfigError) as ei:
        execute(cfg, tmp_path / "run")
    assert ei.value.key == key and f"'{key}'" in str(ei.value)
    assert not (tmp_path / "cache").exists()          # nothing trained
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_options_are_defined_once():
    """LinearizeOptions is the one definition of the linearize node: the config file documents the same
    defaults, the schema is derived from it, and the parsed default node is the dataclass' defaults."""
    defaults = as_plain(LinearizeOptions())
    assert OmegaConf.to_container(OmegaConf.load(ROOT / "robustbench_lab" / "conf" / "linearize" / "default.yaml")) == defaults
    assert OmegaConf.to_container(OmegaConf.structured(schema.LinearizeSchema)) == defaults
    assert parse_options(compose(["logger=none"])) == LinearizeOptions()
    assert LinearizeOptions.from_dict(defaults) == LinearizeOptions()
    opts = parse_options(compose(["logger=none", "linearize.boundary=both", "linearize.stages.k=3",
                                  "linearize.sweep.skip_scales=[0,2]", "linearize.perturbation.l2=0.5"]))
    assert opts.boundaries == ("pre", "post") and opts.stages.k == 3 and opts.sweep.skip_scales == (0.0, 2.0)
    assert opts.perturbation.l2 == 0.5


@pytest.mark.parametrize("node,key", [
    ({"stages": {"k": 0}}, "linearize.stages.k"), ({"sweep": {"weight_scales": [-1.0]}}, "linearize.sweep.weight_scales"),
    ({"tol": 0}, "linearize.tol"), ({"lanczos_maxiter": 0}, "linearize.lanczos_maxiter"),
    ({"units": 0}, "linearize.units"), ({"dtype": "float16"}, "linearize.dtype"),
    ({"sweep": {"untis": 1}}, "linearize.sweep.untis")])
def test_bad_option_names_its_full_key(node, key):
    with pytest.raises(ConfigError) as ei:
        LinearizeOptions.from_dict(node)
    assert ei.value.key == key


def test_run_py_bad_boundary_exits_nonzero_naming_the_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, *_paths(tmp_path), "linearize.boundary=middle",
                        f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120, env=env,
                       cwd=str(tmp_path))
    assert p.returncode != 0
    assert "linearize.boundary" in p.stderr and "'middle'" in p.stderr and "'both'" in p.stderr
