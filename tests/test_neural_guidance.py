"""Neural guidance (the package defenses/neural_guidance/, robustbench_lab/core/analyses.py):
the loss, the head, the target sources (Gabor bank, model stages, measured-data files and their validation),
the controls, the checkpoint key, and the analyses. Tiny nets and data made here; ~30 s at one thread."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses.neural_guidance.defense import NeuralGuidance
from defenses.neural_guidance.features import FeatureTap, resolve_layer
from defenses.neural_guidance.gabor import GaborBank, V1GaborTarget
from defenses.neural_guidance.model_stage import ModelStageTarget, network_stages
from defenses.neural_guidance.neural_file import FileTarget, full_training_set, load_neural_file
from defenses.neural_guidance.pipeline import ResponsePipeline
from defenses.neural_guidance.predictor import PredictorSettings, predictor_recipe, shuffled_pairs, train_predictor
from defenses.neural_guidance.procedure import NeuralGuidanceProcedure
from defenses.neural_guidance.target import MODEL_DERIVED, FittedTarget
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.analyses import robustness_profile, rsa
from robustbench_lab.app.builders import build_defense, checkpoint_spec
from robustbench_lab.core.cache import content_key, save_weights
from robustbench_lab.core.defense_base import NoDefense
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.recipe import Recipe
from robustbench_lab.core.train import train
from robustbench_lab.core import zoo
from robustbench_lab.core.zoo import SmallCNN

from conftest import ROOT, compose, fashion_available

pytestmark = pytest.mark.usefixtures("one_thread")

CARD = data_mod.get_card("fashion_mnist")
CPU = torch.device("cpu")


def tiny_splits(n_train: int = 240, n_val: int = 0, n_test: int = 60, seed: int = 0,
                structured: bool = True) -> data_mod.Splits:
    """uint8 images of the Fashion-MNIST card's shape; ``n_val`` of the training set held out. Structured:
    images in an 8-dimensional subspace (blocky patterns), so image -> response maps are learnable from few
    examples; else i.i.d. pixel noise."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val
    if structured:
        basis = F.interpolate(torch.randn(8, 1, 4, 4, generator=g).sign(), size=28, mode="nearest")
        coef = torch.randn(n + n_test, 8, generator=g)
        xf = 0.5 + 0.05 * torch.einsum("nj,jchw->nchw", coef, basis)
    else:
        xf = torch.rand(n + n_test, 1, 28, 28, generator=g)
    x = (xf.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.randint(0, 10, (n + n_test,), generator=g)
    val_idx = torch.randperm(n, generator=g)[:n_val].sort().values
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val_idx] = True
    tr = (~is_val).nonzero().flatten()
    return data_mod.Splits(CARD, x[:n][tr], y[:n][tr], x[:n][val_idx], y[:n][val_idx], x[n:], y[n:], val_idx,
                           torch.arange(n_test))


def tanh_mlp(seed: int = 0, hidden: int = 16) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.Tanh(), nn.Linear(hidden, 10)),
                      (0.5,), (0.5,), 10)


class LinearOfFeatures(nn.Module):
    """A known target: A @ penultimate(model(x)) + b, computed on a frozen copy of the features."""

    def __init__(self, model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.model, self.a, self.b = model, a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tap = FeatureTap(self.model, "penultimate", 1)
        with tap:
            self.model(x)
        return tap.features @ self.a.T + self.b


def fitted_stub(target: nn.Module, k: int) -> FittedTarget:
    return FittedTarget(target, ResponsePipeline(k, k), None, {})


# ------------------------------------------------------------------------------------------- the loss
def test_loss_is_exactly_cross_entropy_at_alpha_zero_and_the_weighted_sum_otherwise():
    model = tanh_mlp()
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    g = torch.Generator().manual_seed(0)
    p0 = NeuralGuidanceProcedure(None, PredictorSettings(), alpha=0.0)
    assert torch.equal(p0.loss(model, x, y, g), F.cross_entropy(model(x), y))   # no target needed, bit-exact
    a, b = torch.randn(3, 16), torch.randn(3)
    p = NeuralGuidanceProcedure(None, PredictorSettings(), alpha=0.3)
    p.use_target(fitted_stub(LinearOfFeatures(tanh_mlp(seed=1), a, b), 3))
    p.prepare(model, tiny_splits(20), CPU)
    tap = FeatureTap(model, "penultimate", 1)
    with tap:
        logits = model(x)
    with torch.no_grad():
        t = p.fitted.target(x)
    expect = 0.7 * F.cross_entropy(logits, y) + 0.3 * ((p.head(tap.features) - t) ** 2).mean()
    assert torch.allclose(p.loss(model, x, y, g), expect, atol=1e-6)
    # the defense shares the standard checkpoint at alpha = 0 (no training procedure at all)
    # target_scale=unit divides every target by the RMS of the source's fit scores (one number)
    pu = NeuralGuidanceProcedure(None, PredictorSettings(), alpha=0.3, target_scale="unit")
    stub = fitted_stub(LinearOfFeatures(tanh_mlp(seed=1), a, b), 3)
    stub.info["score_rms"] = 4.0
    pu.use_target(stub)
    pu.prepare(model, tiny_splits(20), CPU)
    assert pu.scale == 0.25 and p.scale == 1.0
    # a diverging loss is an error, not a NaN checkpoint
    p.fitted.target = LinearOfFeatures(tanh_mlp(seed=1), a * float("inf"), b)
    with pytest.raises(FloatingPointError, match="diverged"):
        p.loss(model, x, y, g)
    assert NeuralGuidance(neural_target=V1GaborTarget(), alpha=0.0).training_procedure() is None
    assert isinstance(NeuralGuidance(neural_target=V1GaborTarget()).training_procedure(), NeuralGuidanceProcedure)


def test_head_layer_resolution_penultimate_and_named_layers():
    m = Classifier(SmallCNN(1, 10, width=4), (0.5,), (0.5,), 10)
    assert resolve_layer(m, "penultimate")[:1] == ("net.classifier.3",)
    assert resolve_layer(m, "features.5")[0] == "net.features.5"   # "net." may be omitted
    tap = FeatureTap(m, "net.features.5", 2)
    with tap:
        m(torch.rand(3, 1, 28, 28))
    assert tap.features.shape == (3, 8 * 2 * 2)                  # 4-D output pooled to 2 x 2
    assert not m.net.features[5]._forward_hooks                   # removed on exit
    with pytest.raises(ConfigError, match="defense.layer"):
        resolve_layer(m, "net.nope")


def test_neural_head_regresses_a_known_linear_target_through_the_training_loop():
    """Frozen trunk, alpha = 1: the shared loop trains only the head (its parameters() hook) and the head
    recovers the linear map from the features to the target."""
    model = tanh_mlp(seed=0)
    for q in model.parameters():
        q.requires_grad_(False)
    a, b = torch.randn(4, 16), torch.randn(4)
    p = NeuralGuidanceProcedure(None, PredictorSettings(), alpha=1.0, seed=3)
    p.use_target(fitted_stub(LinearOfFeatures(model, a, b), 4))
    splits = tiny_splits(256, structured=False)
    train(model, splits, Recipe(epochs=60, batch_size=64, optimizer="adam", lr=0.05, weight_decay=0.0,
                                schedule="constant", augment=False), CPU, seed=0, procedure=p, progress=False)
    first, last = np.mean(p.stats["mse"][:4]), np.mean(p.stats["mse"][-4:])
    assert last < 1e-3 * first, (first, last)
    assert torch.allclose(p.head.weight, a, atol=0.05) and torch.allclose(p.head.bias, b, atol=0.05)
    assert all(not q.requires_grad for q in model.parameters())


# ------------------------------------------------------------------------------------------ Gabor bank
def test_gabor_bank_is_deterministic_and_tuned_as_configured():
    orients, freqs = 6, [0.08, 0.17, 0.31]
    b1, b2 = GaborBank(orients, freqs), GaborBank(orients, freqs)
    x = torch.rand(2, 1, 28, 28)
    assert all(torch.equal(t1, t2) for t1, t2 in zip(b1.state_dict().values(), b2.state_dict().values()))
    assert torch.equal(b1(x), b2(x))
    ks = b1.kernels()
    assert len(ks) == orients * len(freqs)
    n = 256
    fx, fy = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n))
    for k in ks:
        quad = np.zeros((n, n), dtype=complex)
        s = k["even"].shape[0]
        quad[:s, :s] = k["even"] + 1j * k["odd"]          # spectrum of exp(i 2 pi f x'): one peak
        spec = np.abs(np.fft.fft2(quad))
        i = np.unravel_index(spec.argmax(), spec.shape)
        f_meas, theta_meas = math.hypot(fx[i], fy[i]), math.degrees(math.atan2(fy[i], fx[i])) % 180
        assert abs(f_meas - k["frequency"]) < 1.5 / n, (k["frequency"], f_meas)
        d = abs(theta_meas - k["orientation"]) % 180
        assert min(d, 180 - d) < 2.0, (k["orientation"], theta_meas)
        assert abs(k["even"].sum()) < 1e-5 and abs(k["odd"].sum()) < 1e-5     # no DC response
    # cells: simple = rectified phase responses, complex = quadrature energy of the same pair
    out = b1(x)
    assert out.shape == (2, b1.n_cells, 28, 28) and b1.n_cells == len(freqs) * orients * 5
    simple = out.view(2, len(freqs) * orients, 5, 28, 28)
    assert (simple[:, :, :4] >= 0).all()
    s0, s90, s180, s270, cx = simple.unbind(2)
    assert torch.allclose(cx, torch.sqrt((s0 - s180) ** 2 + (s270 - s90) ** 2) / math.sqrt(2), atol=1e-5)
    with pytest.raises(ConfigError, match="frequencies"):
        GaborBank(4, [0.7])


# ---------------------------------------------------------------------------------------- model stages
def _source_file(tmp_path: Path) -> tuple[Path, Classifier]:
    torch.manual_seed(5)
    src = Classifier(SmallCNN(1, 10, width=4), CARD.mean, CARD.std, 10)
    path = tmp_path / "source.safetensors"
    save_weights(src, path)
    return path, src


def test_model_stage_targets_come_from_a_frozen_network(tmp_path):
    path, src = _source_file(tmp_path)
    assert network_stages("small_cnn") == ["net.features.2", "net.features.5", "net.classifier.2"]
    data = {"name": "fashion_mnist", "n_val": 0, "split_seed": 0}
    with pytest.raises(ConfigError, match=r"defense.neural_target.stage.*allowed: 1, 2, 3"):
        ModelStageTarget(stage=4, source={"name": "small_cnn", "kwargs": {"width": 4}, "checkpoint": str(path)},
                         data=data)
    source = ModelStageTarget(stage=2, source={"name": "small_cnn", "kwargs": {"width": 4}, "checkpoint": str(path)},
                              data=data, pool=2, n_fit=120, n_heldout=20, max_components=16)
    assert source.label.endswith(MODEL_DERIVED) and source.source_kind == "surrogate"
    splits = tiny_splits(200)
    torch.manual_seed(0)
    guided = Classifier(SmallCNN(1, 10, width=4), CARD.mean, CARD.std, 10)
    before = {k: v.clone() for k, v in guided.state_dict().items()}
    p = NeuralGuidanceProcedure(source, PredictorSettings(mode="direct"), alpha=0.9)
    train(guided, splits, Recipe(epochs=1, batch_size=50, lr=0.05, augment=False), CPU, seed=0, procedure=p,
          progress=False)
    net = source._net
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in net.state_dict().items())   # unchanged
    assert not any(q.requires_grad for q in net.parameters()) and not net.training
    assert any(not torch.equal(v, before[k]) for k, v in guided.state_dict().items())      # the guided model trained
    # the target is exactly the pipeline of the source's pooled stage-2 output
    x = data_mod.to_float(splits.x_test[:8])
    with torch.no_grad():
        feats = F.adaptive_avg_pool2d(src.net.features[:6](src.normalize(x)), 2).flatten(1)
        assert torch.allclose(p.fitted.target(x), p.fitted.pipeline(feats), atol=1e-5)


# ------------------------------------------------------------------------------------------ file data
def _write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _neural_arrays(splits: data_mod.Splits, n: int = 120, units: int = 24, repeats: int = 3, seed: int = 0):
    """Responses linear in the images plus repeat noise, for the first ``n`` training-set ids."""
    rng = np.random.default_rng(seed)
    full = full_training_set(splits)
    ids = rng.permutation(full.shape[0])[:n]
    imgs = full[ids].float().div(255).flatten(1).numpy()
    w = rng.normal(size=(784, units)) / 28
    clean = imgs @ w
    resp = clean[:, None, :] + 0.05 * rng.normal(size=(n, repeats, units))
    return ids, full[ids].numpy(), resp.astype(np.float32)


def test_file_source_pipeline_predictor_and_equivalent_id_and_image_files(tmp_path):
    splits = tiny_splits(240, n_val=40)
    ids, imgs, resp = _neural_arrays(splits)
    f_ids = _write_npz(tmp_path / "v1.npz", responses=resp, image_ids=ids, region=np.array("V1"))
    f_img = _write_npz(tmp_path / "v1_img.npz", responses=resp, images=imgs[:, 0], region=np.array("V1"))
    d = load_neural_file(f_ids)
    assert d.region == "V1" and d.n_repeats == 3 and np.allclose(d.responses, resp.mean(1))
    spec = PredictorSettings(mode="trained", model="linear", epochs=40, lr=0.01, batch_size=32, weight_decay=0.0)
    fits = [FileTarget(path=str(f), holdout_fraction=0.2).fit(splits, CPU, spec) for f in (f_ids, f_img)]
    for a, b in zip(fits[0].pipeline.state_dict().values(), fits[1].pipeline.state_dict().values()):
        assert torch.equal(a, b)                         # ids and images describe the same stimuli
    fit = fits[0]
    assert fit.heldout[0].shape == (24, 1, 28, 28) and fit.info["n_fit"] == 96
    assert fit.info["explained_variance"] >= 0.95 and fit.target(fit.heldout[0]).shape == (24, fit.n_components)
    assert fit.info["target_heldout_r"] > 0.8, fit.info      # the predictor learned the image -> response map
    with pytest.raises(ConfigError, match="predictor.mode"):
        NeuralGuidance(neural_target=FileTarget(path=str(f_ids)), predictor={"mode": "direct"})
    with pytest.raises(ConfigError, match="region"):
        FileTarget(path=str(f_ids), region="V4")


@pytest.mark.parametrize("case,arrays,npz_key,words", [
    ("nan", lambda r, i, im: {"responses": np.where(np.arange(r.size).reshape(r.shape) == 7, np.nan, r),
                              "image_ids": i}, "responses", "finite"),
    ("1d responses", lambda r, i, im: {"responses": r[:, 0, 0], "image_ids": i}, "responses", "n_units"),
    ("no ids", lambda r, i, im: {"responses": r}, "image_ids", "exactly one of"),
    ("ids and images", lambda r, i, im: {"responses": r, "image_ids": i, "images": im}, "images", "exactly one of"),
    ("short ids", lambda r, i, im: {"responses": r, "image_ids": i[:-1]}, "image_ids", "one id per response row"),
    ("float ids", lambda r, i, im: {"responses": r, "image_ids": i.astype(float)}, "image_ids", "integer"),
    ("repeated ids", lambda r, i, im: {"responses": r, "image_ids": np.r_[i[:-1], i[:1]]}, "image_ids", "unique"),
    ("object array", lambda r, i, im: {"responses": r, "image_ids": i, "region": np.array([{"a": 1}], dtype=object)},
     "region", "pickle"),
    ("bad images", lambda r, i, im: {"responses": r, "images": im[:, :, :5]}, "images", "shape"),
])
def test_bad_neural_files_raise_errors_naming_file_key_and_expectation(tmp_path, case, arrays, npz_key, words):
    splits = tiny_splits(240)
    ids, imgs, resp = _neural_arrays(splits, n=30)
    path = _write_npz(tmp_path / "bad.npz", **arrays(resp, ids, imgs))
    with pytest.raises(ConfigError) as e:
        FileTarget(path=str(path)).images(splits)
    msg = str(e.value)
    assert str(path) in msg and f"key '{npz_key}'" in msg and words in msg and "defense.neural_target.path" in msg, msg


def test_missing_ids_and_missing_files_are_clear_errors(tmp_path):
    splits = tiny_splits(240)
    ids, _, resp = _neural_arrays(splits, n=30)
    path = _write_npz(tmp_path / "far.npz", responses=resp, image_ids=np.r_[ids[:-1], 10_000])
    with pytest.raises(ConfigError, match=r"key 'image_ids'.*\[0, 239\].*10000"):
        FileTarget(path=str(path)).fit(splits, CPU, None)
    with pytest.raises(ConfigError, match="defense.neural_target.path"):
        FileTarget(path=str(tmp_path / "absent.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="could not be read"):
        FileTarget(path=str(tmp_path / "junk.npz"))


# ------------------------------------------------------------------------------------------- controls
def test_shuffled_control_permutes_the_targets_and_loses_the_image_information(tmp_path):
    scores = torch.randn(50, 6)
    perm_targets, perm = shuffled_pairs(scores, seed=0)
    assert torch.equal(perm_targets, scores[perm]) and sorted(perm.tolist()) == list(range(50))
    assert (perm != torch.arange(50)).float().mean() > 0.9
    assert torch.equal(shuffled_pairs(scores, seed=0)[1], perm)          # a fixed permutation
    splits = tiny_splits(240, n_val=40)
    ids, _, resp = _neural_arrays(splits)
    f = _write_npz(tmp_path / "it.npz", responses=resp, image_ids=ids)
    kw = dict(model="linear", epochs=40, lr=0.01, batch_size=32, weight_decay=0.0)
    true = FileTarget(path=str(f), holdout_fraction=0.2).fit(splits, CPU, PredictorSettings(mode="trained", **kw))
    shuf = FileTarget(path=str(f), holdout_fraction=0.2).fit(splits, CPU, PredictorSettings(mode="shuffled", **kw))
    rand = FileTarget(path=str(f), holdout_fraction=0.2).fit(splits, CPU, PredictorSettings(mode="random", model="linear"))
    assert shuf.info["shuffled_fixed_points"] <= 5
    assert true.info["target_heldout_r"] > shuf.info["target_heldout_r"] + 0.4, (true.info, shuf.info)
    assert true.info["target_heldout_r"] > rand.info["target_heldout_r"] + 0.4, (true.info, rand.info)


def test_predictor_trains_on_the_core_loop_with_its_own_seed_only():
    """The predictor's recipe is Adam at a constant rate without augmentation; training is reproducible from
    spec.seed alone, leaves the global RNG untouched and returns a frozen model with one loss per epoch."""
    spec = PredictorSettings(mode="trained", model="linear", epochs=3, batch_size=16, lr=0.01, weight_decay=0.0, seed=2)
    r = predictor_recipe(spec)
    assert (r.optimizer, r.schedule, r.augment, r.epochs, r.batch_size, r.lr) == ("adam", "constant", False, 3, 16, 0.01)
    images = tiny_splits(60).x_train
    targets = torch.randn(images.shape[0], 5, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    m1, info1 = train_predictor(spec, CARD, images, targets, CPU)
    assert torch.equal(torch.random.get_rng_state(), state)
    m2, info2 = train_predictor(spec, CARD, images, targets, CPU)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert info1 == info2 and len(info1["predictor_train_loss"]) == 3
    assert not m1.training and not any(q.requires_grad for q in m1.parameters())


# -------------------------------------------------------------------------------- configs and the key
def test_configs_controls_and_checkpoint_keys():
    def key(over: list[str]) -> str:
        cfg = compose(["model=small_cnn"] + over)
        return content_key(checkpoint_spec(cfg, Recipe.from_config(cfg.model.train), build_defense(cfg.defense)))

    std = key([])
    assert key(["+defense/neural_guidance_arm=baseline"]) == std                     # alpha = 0 is standard training
    assert key(["+defense/neural_guidance_arm=weight_decay"]) != std
    guided = {key(["+defense/neural_guidance_arm=" + a]) for a in
              ("random_predictor", "shuffled", "stage3_predictor", "v1_gabor", "stage1", "stage2", "stage3")}
    assert len(guided) == 7 and std not in guided
    assert key(["defense=neural_guidance"]) == key(["defense=neural_guidance", "defense.analysis.n=7"])
    assert key(["defense=neural_guidance"]) != key(["defense=neural_guidance", "defense.alpha=0.5"])
    assert key(["defense=neural_guidance"]) != key(["defense=neural_guidance", "defense.target_scale=unit"])
    exp = compose(["experiment=neural_guidance_hierarchy", "+defense/neural_guidance_arm=stage2"])
    assert exp.defense.target_scale == "unit" and list(exp.defense.analysis.eps) == [0.01, 0.02, 0.05, 0.1]
    assert exp.defense.neural_target.stage == 2 and exp.model.name == "small_cnn"
    for arm in ("shuffled", "stage1", "v1_gabor", "random_predictor"):
        cfg = compose(["+defense/neural_guidance_arm=" + arm])
        d = build_defense(cfg.defense)
        assert cfg.defense.name.endswith(MODEL_DERIVED) and d.describe()["source_kind"] == "surrogate"
        assert d.describe()["target_label"].endswith(MODEL_DERIVED)
    # the stage source is the main job's network: the same checkpoint key as `python run.py`
    cfg = compose([])
    main_key = content_key(checkpoint_spec(cfg, Recipe.from_config(cfg.model.train), NoDefense()))
    src = build_defense(compose(["+defense/neural_guidance_arm=stage2"]).defense).source
    assert content_key(src.source_spec()) == main_key
    with pytest.raises(ConfigError, match="defense.alpha"):
        build_defense(compose(["defense=neural_guidance", "defense.alpha=1.5"]).defense)
    with pytest.raises(ConfigError, match="defense.predictor.mode"):
        build_defense(compose(["defense=neural_guidance", "defense.predictor.mode=magic"]).defense)


def test_the_source_network_and_its_recipe_come_from_a_model_card_in_the_config():
    """The stage source's model card (name, kwargs, train recipe) is composed by Hydra from robustbench_lab/conf/model: another
    source model brings its own recipe, so its key is that of `python run.py model=<name>`."""
    over = ["defense=neural_guidance", "defense/neural_target=model_stage"]
    src = build_defense(compose(over + ["model@defense.neural_target.source=small_cnn"]).defense).source
    cfg = compose(["model=small_cnn"])
    assert src.recipe == Recipe.from_config(cfg.model.train)
    assert content_key(src.source_spec()) == content_key(checkpoint_spec(cfg, src.recipe, NoDefense()))
    with pytest.raises(ConfigError, match=r"defense.neural_target.source.train.lr"):
        build_defense(compose(over + ["defense.neural_target.source.train.lr=0"]).defense)
    with pytest.raises(ConfigError, match=r"defense.neural_target.source.name.*a network with stages"):
        build_defense(compose(over + ["model@defense.neural_target.source=linear"]).defense)


@pytest.mark.parametrize("name", [n for n in zoo.available() if zoo.get_card(n).stages])
def test_every_model_card_names_stage_modules_its_network_has(name):
    net = zoo.build_classifier(name, data_mod.get_card("cifar10"))
    modules = dict(net.named_modules())
    assert all(s in modules for s in network_stages(name)), (name, network_stages(name))


def test_the_old_arm_group_spelling_names_the_new_one():
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), "+neural_guidance_arm=baseline"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "write +defense/neural_guidance_arm=baseline" in p.stderr, p.stderr


# ------------------------------------------------------------------------------------------- analyses
def test_rsa_and_robustness_profile_properties():
    from attacks.pgd import PGD
    a = torch.randn(30, 8)
    assert rsa(a, a) == pytest.approx(1.0)
    assert rsa(a, 3 * a + 1) == pytest.approx(1.0)                     # correlation distance: scale-free
    assert abs(rsa(a, torch.randn(30, 8))) < 0.3
    model = tanh_mlp().eval()
    splits = tiny_splits(20, n_test=40)
    x, y = data_mod.to_float(splits.x_test), model(data_mod.to_float(splits.x_test)).argmax(1)   # all correct
    prof = robustness_profile(model, x, y, PGD(steps=5), [0.01, 0.05], torch.Generator().manual_seed(0))
    assert prof["eps"].tolist() == [0.0, 0.01, 0.05] and prof["robust_accuracy"].iloc[0] == 1.0
    assert prof["robust_accuracy"].is_monotonic_decreasing and (prof["smoothness"] > 0).all()
    d = NeuralGuidance(neural_target=V1GaborTarget(n_fit=60, n_heldout=0), alpha=0.0,
                       analysis={"n": 30, "eps": [0.05], "steps": 3, "rsa_n": 20})
    assert d.transform(model, {"splits": splits, "device": CPU, "seed": 0}) is model     # identity
    res = d.describe()["analysis"]
    assert res["eps"] == [0.0, 0.05] and -1 <= res["rsa"] <= 1 and res["rsa_n"] == 20
    assert res["rsa_layer"] == "net.3" and np.isfinite(res["smoothness_score"])


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")
def test_run_trains_through_the_shared_loop_and_records_the_analysis(tmp_root):
    """app.run with defense=neural_guidance: the guided model is trained and cached like any other (its
    checkpoint holds the plain classifier, no head), and metrics.json carries the labelled analysis."""
    import json

    from safetensors.torch import load_file

    from robustbench_lab.app.execute import run_task
    cfg = compose(["defense=neural_guidance", "model=small_cnn", "model.train.max_train=400", "model.train.epochs=1",
                   "data.n_eval=40", "data.n_val=100", "progress=false", "logger=none", "checks=none",
                   "attack.steps=3", "defense.neural_target.n_fit=100", "defense.neural_target.n_heldout=50",
                   "defense.analysis.n=40", "defense.analysis.eps=[0.05]", "defense.analysis.steps=3",
                   "defense.analysis.rsa_n=20"])
    m = run_task(cfg, tmp_root / "run")
    assert m["cache_hit"] is False
    dc = json.loads((tmp_root / "run" / "metrics.json").read_text())["defense_config"]
    assert dc["source_kind"] == "surrogate" and dc["target_label"].endswith(MODEL_DERIVED)
    assert dc["analysis"]["eps"] == [0.0, 0.05] and dc["train_batches"] == 4
    assert dc["analysis"]["robust_accuracy"][0] == pytest.approx(m["clean_accuracy"])
    plain = Classifier(SmallCNN(1, 10), CARD.mean, CARD.std, 10).state_dict()
    assert set(load_file(m["checkpoint"])) == set(plain)          # the head is not part of the checkpoint
    assert (tmp_root / "run" / "neural_guidance_profile.csv").is_file()


# ------------------------------------------------------------------------------- the study's end-of-sweep table
def _ng_metrics(run: Path, arm: str, alpha: float, mode: str, level: int | None, label: str, robust: list[float],
                smooth: list[float], seed: int = 0) -> None:
    import json
    run.mkdir(parents=True)
    an = {"eps": [0.0, 0.02, 0.05], "robust_accuracy": robust, "smoothness": smooth,
          "smoothness_score": float(np.mean(smooth[1:])), "rsa": 0.3, "n": 500}
    dc = {"alpha": alpha, "analysis": an, "predictor": {"mode": mode}, "source_kind": "surrogate",
          "target_label": label, "target_level": level, "target_fit": {"n_components": 10, "target_heldout_r": 0.9}}
    (run / "metrics.json").write_text(json.dumps({"defense": arm, "defense_config": dc, "seed": seed, "eps": 0.02,
                                                  "robust_accuracy": robust[1]}))


def test_hierarchy_sweep_end_writes_the_ordered_labelled_table_and_plots(tmp_path, capsys):
    """The experiment's Hydra callback tabulates the sweep at its end: guided arms by level, then controls,
    seeds averaged, surrogate targets labelled model-derived; the by-level plot uses the run's attack.eps."""
    import hydra
    import pandas as pd
    from omegaconf import OmegaConf

    sweep = tmp_path / "sweep"
    _ng_metrics(sweep / "0_baseline", "ng_baseline", 0.0, "direct", 4, "resnet20 stage 3", [0.8, 0.7, 0.4],
                [0.1, 0.2, 0.3])
    _ng_metrics(sweep / "1_stage3", "ng_stage3", 0.9, "direct", 4, "resnet20 stage 3", [0.78, 0.72, 0.5],
                [0.1, 0.15, 0.25])
    _ng_metrics(sweep / "2_v1", "ng_v1", 0.9, "direct", 1, "V1 Gabor bank", [0.77, 0.6, 0.3], [0.1, 0.2, 0.4])
    _ng_metrics(sweep / "3_v1_s1", "ng_v1", 0.9, "direct", 1, "V1 Gabor bank", [0.79, 0.62, 0.2], [0.1, 0.2, 0.2],
                seed=1)
    _ng_metrics(sweep / "4_shuffled", "ng_shuffled", 0.9, "shuffled", 4, "resnet20 stage 3", [0.76, 0.66, 0.35],
                [0.1, 0.2, 0.3])
    (sweep / "5_failed").mkdir()                                           # a failed cell: no metrics.json

    cfg = compose(["experiment=neural_guidance_hierarchy", "attack.eps=0.05"], return_hydra_config=True)
    node = cfg.hydra.callbacks.neural_guidance_hierarchy_table
    callback = hydra.utils.instantiate(node)
    run_cfg = OmegaConf.merge(cfg, {"hydra": {"sweep": {"dir": str(sweep)}}, "defense": {"analysis": {"eps": [0.02, 0.05]}}})
    callback.on_multirun_end(config=run_cfg)

    table = pd.read_csv(sweep / "hierarchy_table.csv")
    assert table["arm"].tolist() == ["ng_v1", "ng_stage3", "ng_baseline", "ng_shuffled"]
    v1 = table.iloc[0]
    assert v1["n_seeds"] == 2 and v1["robust@0.05"] == pytest.approx(0.25) and v1["clean_accuracy"] == pytest.approx(0.78)
    assert v1["robust@0.05_sd"] == pytest.approx(0.1 / math.sqrt(2)) and pd.isna(table.iloc[1]["robust@0.05_sd"])
    assert table["role"].tolist() == ["guided", "guided", "control: alpha=0", "control: shuffled predictor"]
    assert all(t.endswith("(model-derived)") for t in table["target"])
    assert pd.isna(table.iloc[2]["level"])                                # a control is no level of the hierarchy
    md = (sweep / "hierarchy_table.md").read_text()
    assert "NOT brain data" in md and "robust@0.05" in md and "smooth@" not in md
    for name in ("ng_robust_vs_eps.png", "ng_smoothness_by_level.png", "ng_robust_by_level.png"):
        assert (sweep / name).stat().st_size > 1000, name
    assert "hierarchy table written" in capsys.readouterr().out

    # nothing to tabulate (every cell failed): a message, no exception, no file; the CLI exits 2
    empty = tmp_path / "empty"
    (empty / "0_x").mkdir(parents=True)
    callback.on_multirun_end(config=OmegaConf.merge(run_cfg, {"hydra": {"sweep": {"dir": str(empty)}}}))
    assert "not written" in capsys.readouterr().err and not (empty / "hierarchy_table.md").exists()
    import importlib
    plot = importlib.import_module("experiments.neural_guidance_hierarchy.plot")
    # a failure of the study's table is reported but does not stop the sweep's other end-of-sweep callbacks
    def broken(*a, **k):
        raise RuntimeError("plotting broke")
    orig = plot.plots
    plot.plots = broken
    try:
        callback.on_multirun_end(config=run_cfg)
    finally:
        plot.plots = orig
    err = capsys.readouterr().err
    assert "plotting broke" in err and "retry by hand" in err
    assert plot.main([str(empty)]) == 2 and plot.main([str(tmp_path / "missing")]) == 2
