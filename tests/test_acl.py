"""ACL (defenses/acl/): the NT-Xent loss against a direct computation, the contrastive attack, dual
BatchNorm, the exact transfer of the pre-trained BN into the classifier, config errors, a short pre-training
that learns, and a protocol sweep that pre-trains once. Tiny ResNets on small synthetic images."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from defenses.acl.augment import simclr_augment
from defenses.acl.contrastive_model import ContrastiveModel, load_pretrained
from defenses.acl.defense import ACL
from defenses.acl.dual_bn import DualBatchNorm, bn_branch
from defenses.acl.finetuning import selection_accuracy
from defenses.acl.lars import LARS
from defenses.acl.ntxent import contrastive_pgd, nt_xent
from defenses.acl.pretraining import pretrain, warmup_cosine
from defenses.acl.settings import PretrainConfig
from robustbench_lab.core import data as data_mod
from robustbench_lab.app.builders import build_defense
from robustbench_lab.core.cache import CheckpointCache, content_key
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.model import Classifier, eval_frozen
from robustbench_lab.core.recipe import Recipe
from robustbench_lab.core.train import get_or_train
from robustbench_lab.core.zoo import CifarResNet

from conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")


def _classifier(seed: int = 0, channels: int = 1, width: int = 4) -> Classifier:
    """ResNet-8 (one unit per stage) at width 4: 7 BatchNorm2d, a 16-d feature, 3 classes."""
    torch.manual_seed(seed)
    return Classifier(CifarResNet(depth=8, in_channels=channels, num_classes=3, width=width),
                      (0.5,) * channels, (0.25,) * channels, 3)


def _smooth_images(n: int, seed: int, size: int = 12, channels: int = 1) -> torch.Tensor:
    """(n, C, size, size) in [0, 1]: random 4x4 patterns upsampled (crops of them keep structure), with
    exact 0s and 1s so the box constraint binds."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) * 1.6 + 0.5).clamp(0, 1)
    return x


# ------------------------------------------------------------------------------------------------ NT-Xent
def _nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]

    def cos(i: int, j: int) -> float:
        return float(z[i] @ z[j] / (z[i].norm() * z[j].norm()))

    total = 0.0
    for a in range(n2):
        pos = (a + n2 // 2) % n2                       # z1[i] <-> z2[i]
        num = math.exp(cos(a, pos) / t)
        den = sum(math.exp(cos(a, k) / t) for k in range(n2) if k != a)   # self-pair excluded
        total += -math.log(num / den)
    return total / n2                                   # mean over all 2N anchors


def test_nt_xent_equals_a_direct_loop_computation():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for t in (0.5, 0.2):
        assert nt_xent(z1, z2, t).item() == pytest.approx(_nt_xent_loop(z1, z2, t), rel=1e-5)
    assert nt_xent(z1, z2).item() == pytest.approx(_nt_xent_loop(z1, z2, 0.5), rel=1e-5)   # default t = 0.5
    # cosine similarity: per-row scale does not matter; the pairing does
    assert nt_xent(3 * z1, 0.5 * z2).item() == pytest.approx(nt_xent(z1, z2).item(), rel=1e-5)
    assert nt_xent(z1, z2.roll(1, 0)).item() == pytest.approx(_nt_xent_loop(z1, z2.roll(1, 0), 0.5), rel=1e-5)
    assert abs(nt_xent(z1, z2.roll(1, 0)).item() - nt_xent(z1, z2).item()) > 1e-3
    # identical, mutually orthogonal pairs: the loss is its minimum for that batch, log(1 + (2N-2) e^{-1/t})
    e = torch.eye(4)
    assert nt_xent(e, e, 0.5).item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 6)), rel=1e-5)


# ------------------------------------------------------------------------------------------------ dual BN
def test_dual_bn_is_everywhere_and_keeps_separate_running_statistics():
    cm = ContrastiveModel(_classifier())
    duals = [m for m in cm.modules() if isinstance(m, DualBatchNorm)]
    assert cm.n_dual == len(duals) == 7 + 2                    # 7 in the ResNet-8, 2 in the projection head
    assert sum(isinstance(m, DualBatchNorm) for m in cm.head.modules()) == 2
    parents = {id(bn) for d in duals for bn in (d.normal, d.pgd)}
    assert all(id(m) in parents for m in cm.modules() if isinstance(m, _BatchNorm))   # no plain BN left
    x = _smooth_images(8, 0)
    for branch, other in (("normal", "pgd"), ("pgd", "normal")):
        before = {k: v.clone() for k, v in cm.state_dict().items()}
        cm.train()
        with bn_branch(cm, branch):
            cm(x * (0.5 if branch == "pgd" else 1.0))
        after = cm.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.endswith("running_mean") for k in changed)
        assert all(f".{branch}." in k for k in changed), sorted(changed)[:4]
        assert not any(f".{other}." in k for k in changed)
        assert all(d.branch == "normal" for d in duals)        # the context restores the branch
    cm.eval()
    with torch.no_grad(), bn_branch(cm, "normal"):
        zn = cm(x)
    with torch.no_grad(), bn_branch(cm, "pgd"):
        zp = cm(x)
    assert not torch.allclose(zn, zp)                          # different statistics, different function


def test_loading_the_pgd_bn_into_the_classifier_is_exact():
    cm = ContrastiveModel(_classifier(0))
    with torch.no_grad():
        for m in cm.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
    cm.train()
    for branch, scale in (("normal", 1.0), ("pgd", 0.6)):
        with bn_branch(cm, branch), torch.no_grad():
            cm(_smooth_images(16, 1) * scale)
    cm.eval()
    target = _classifier(seed=5)                               # another init: everything must be overwritten
    x = _smooth_images(10, 2)
    for branch in ("pgd", "normal"):
        load_pretrained(target, cm, branch)
        seen = {}
        hook = target.net.fc.register_forward_hook(lambda m, i, o: seen.__setitem__("h", i[0]))
        target.eval()
        with torch.no_grad():
            logits = target(x)
            with bn_branch(cm, branch):
                enc = cm.features(x)
        hook.remove()
        assert torch.equal(seen["h"], enc), branch              # bit for bit
        assert torch.count_nonzero(target.net.fc.weight) == 0 and torch.count_nonzero(target.net.fc.bias) == 0
        assert torch.count_nonzero(logits) == 0                  # zero-initialised classifier
    with torch.no_grad(), bn_branch(cm, "pgd"):
        assert not torch.equal(cm.features(x), enc)              # (enc is the normal branch's)


# ------------------------------------------------------------------------------------------ contrastive PGD
def test_contrastive_pgd_increases_the_loss_and_respects_eps_and_the_box():
    cm = ContrastiveModel(_classifier(3))
    cm.train()
    with torch.no_grad(), bn_branch(cm, "pgd"):
        cm(_smooth_images(32, 4) * 0.8)                          # pgd statistics differ from normal ones
    x = _smooth_images(16, 5)
    assert (x == 0).any() and (x == 1).any()
    v1, v2 = x, x.flip(3)
    snapshot = {k: v.clone() for k, v in cm.state_dict().items()}
    seen: list = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m.branch, m.training)))
             for m in cm.modules() if isinstance(m, DualBatchNorm)]

    def loss_at(a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad(), eval_frozen(cm, warn_train=False), bn_branch(cm, "pgd"):
            z = cm(torch.cat([a, b]))
            return nt_xent(z[:16], z[16:]).item()

    eps = 0.05
    a1, a2 = contrastive_pgd(cm, v1, v2, eps=eps, step_size=0.02, steps=5, views="both",
                             generator=torch.Generator().manual_seed(0))
    assert set(seen) == {("pgd", False)}                      # eval mode, pgd BN, throughout the attack
    for h in hooks:
        h.remove()
    clean = loss_at(v1, v2)
    assert loss_at(a1, a2) > clean + 0.05, (clean, loss_at(a1, a2))
    for a, v in ((a1, v1), (a2, v2)):
        assert (a - v).abs().max() <= eps + 1e-6 and a.min() >= 0 and a.max() <= 1
        assert (a != v).any()
    s1, s2 = contrastive_pgd(cm, v1, v2, eps=eps, step_size=0.02, steps=5, views="second",
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, v1) and (s2 - v2).abs().max() <= eps + 1e-6 and (s2 != v2).any()   # A2S
    assert loss_at(s1, s2) > clean
    # the model is untouched: weights and running statistics, train mode, branch
    assert cm.training and all(m.branch == "normal" for m in cm.modules() if isinstance(m, DualBatchNorm))
    assert all(torch.equal(v, snapshot[k]) for k, v in cm.state_dict().items())
    assert all(p.requires_grad for p in cm.parameters())


# ------------------------------------------------------------------------------------- augmentation, LARS
def test_augmentation_is_a_seeded_view_in_the_box_and_colour_ops_touch_only_colour_data():
    x = _smooth_images(6, 7, size=16)
    ident = simclr_augment(x, torch.Generator().manual_seed(0), crop_scale=(1, 1), crop_ratio=(1, 1), hflip=False)
    assert torch.allclose(ident, x, atol=1e-5)                  # full crop, no flip: the image itself
    kw = dict(crop_scale=(0.3, 1.0), jitter=(0.4, 0.4, 0.4, 0.1))
    v = simclr_augment(x, torch.Generator().manual_seed(1), **kw)
    assert v.shape == x.shape and v.min() >= 0 and v.max() <= 1 and not torch.allclose(v, x, atol=1e-3)
    assert torch.equal(v, simclr_augment(x, torch.Generator().manual_seed(1), **kw))
    xc = _smooth_images(8, 8, size=16, channels=3)
    col = simclr_augment(xc, torch.Generator().manual_seed(2), crop_scale=(1, 1), crop_ratio=(1, 1), hflip=False,
                         jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0, gray_p=0.0)
    assert col.min() >= 0 and col.max() <= 1 and (col - xc).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    gray = simclr_augment(xc, torch.Generator().manual_seed(2), crop_scale=(1, 1), crop_ratio=(1, 1), hflip=False,
                          jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.0, gray_p=1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])


def test_lars_step_and_schedule_follow_their_formulas():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))            # ||w|| = 5
    w.grad = torch.tensor([0.6, 0.8])                           # ||g|| = 1
    opt = LARS([w], lr=2.0, momentum=0.9, weight_decay=0.1, eta=0.01)
    opt.step()
    local = 0.01 * 5 / (1 + 0.1 * 5)
    v1 = 2.0 * local * (torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([3.0, 4.0]))
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - v1)
    assert warmup_cosine(1, 100, 10, 5.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 10, 5.0, 0.0) == pytest.approx(5.0)
    assert warmup_cosine(55, 100, 10, 5.0, 0.0) == pytest.approx(2.5)
    assert warmup_cosine(100, 100, 10, 5.0, 1e-6) == pytest.approx(1e-6)


# ----------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("kw,key", [
    ({"variant": "a3s"}, "defense.variant"),
    ({"protocol": "lf"}, "defense.protocol"),
    ({"temperature": 0.0}, "defense.temperature"),
    ({"transfer_bn": "adv"}, "defense.transfer_bn"),
    ({"proj_dims": [64, 0]}, "defense.proj_dims"),
    ({"pretrain": {"optimizer": "adamw"}}, "defense.pretrain.optimizer"),
    ({"pretrain": {"optimizr": "lars"}}, "defense.pretrain.optimizr"),
    ({"pretrain": {"crop_scale": [0.5, 0.2]}}, "defense.pretrain.crop_scale"),
    ({"pretrain": {"eps": 2.0}}, "defense.pretrain.eps"),
    ({"downstream": {"select_by": "best"}}, "defense.downstream.select_by"),
    ({"downstream": {"steps": 0}}, "defense.downstream.steps"),
])
def test_bad_values_raise_a_config_error_naming_the_key(kw, key):
    with pytest.raises(ConfigError) as e:
        ACL(**kw)
    assert key in str(e.value) and "allowed" in str(e.value)


def test_acl_config_composes_and_bad_options_fail_through_it():
    cfg = compose(["defense=acl", "logger=none"])
    assert cfg.defense.name == "acl_ds_aff" and cfg.model.kwargs.width == 8
    d = build_defense(cfg.defense)
    spec = d.training_procedure().spec()
    assert spec["procedure"] == "acl" and spec["pretrain"]["variant"] == "ds" and spec["downstream"]["protocol"] == "aff"
    assert compose(["defense=acl", "defense.variant=simclr", "defense.protocol=slf"]).defense.name == "acl_simclr_slf"
    for over, key in ((["defense.variant=a3s"], "defense.variant"), (["defense.protocol=xlf"], "defense.protocol")):
        with pytest.raises(ConfigError, match=key):
            build_defense(compose(["defense=acl", *over]).defense)
    for exp in ("acl_variants", "acl_cifar10"):
        c = compose([f"experiment={exp}", "logger=none"])
        assert isinstance(build_defense(c.defense), ACL)


# ------------------------------------------------------------------------------------------- training
def test_a_short_pretraining_decreases_the_nt_xent_loss():
    cm = ContrastiveModel(_classifier(0, width=8))
    card = data_mod.get_card("fashion_mnist")
    cfg = PretrainConfig(epochs=8, batch_size=32, optimizer="sgd", lr=0.1, warmup_epochs=1, eps=0.03,
                         step_size=0.015, steps=2, max_train=64)
    x = _smooth_images(64, 11)
    views = [simclr_augment(x, torch.Generator().manual_seed(s), crop_scale=(0.3, 1)) for s in (100, 101)]

    def eval_loss() -> float:
        with torch.no_grad(), eval_frozen(cm, warn_train=False), bn_branch(cm, "normal"):
            return nt_xent(cm(views[0]), cm(views[1])).item()

    before = eval_loss()
    hist = pretrain(cm, x, card, cfg, "ds", 0.5, torch.device("cpu"), seed=0)
    assert len(hist["loss"]) == 8 and all(math.isfinite(v) for v in hist["loss"])
    assert hist["loss"][-1] < hist["loss"][0] - 0.1, hist["loss"]
    assert eval_loss() < before - 0.1, (before, eval_loss())


def _splits(n_train: int = 96, n_val: int = 32) -> data_mod.Splits:
    """A 3-class task on 12x12 images: the class is the brightest third of the image (left/middle/right)."""
    g = torch.Generator().manual_seed(0)
    n = n_train + n_val + 32
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.3 * torch.rand(n, 1, 12, 12, generator=g)
    for c in range(3):
        x[y == c, :, :, 4 * c:4 * c + 4] += 0.6
    xu = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    tr, va, te = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, n)
    return data_mod.Splits(data_mod.get_card("fashion_mnist"), xu[tr], y[tr], xu[va], y[va], xu[te], y[te],
                           torch.arange(n_val), torch.arange(32))


def test_a_protocol_sweep_pretrains_once_and_keeps_the_selected_epoch(tmp_path):
    splits = _splits()
    cache = CheckpointCache(tmp_path)
    recipe = Recipe(epochs=3, batch_size=32, lr=0.05, augment=False, schedule="constant")
    base = {"version": 1, "model": {"name": "resnet8_test", "kwargs": {}}, "data": {"name": "synthetic"}, "seed": 0}
    pre_keys, run_keys = set(), set()
    for protocol in ("slf", "alf"):
        d = ACL(variant="ds", protocol=protocol,
                pretrain={"epochs": 1, "batch_size": 32, "steps": 2, "eps": 0.05, "step_size": 0.03},
                downstream={"eps": 0.05, "step_size": 0.03, "steps": 2, "select_n": 32, "select_steps": 3})
        proc = d.training_procedure()
        spec = {**base, "recipe": vars(recipe), "training": proc.spec()}
        model = _classifier(seed=0)
        meta = get_or_train(model, spec, splits, recipe, cache, torch.device("cpu"), 0, proc, progress=False)
        hist = meta["history"]
        run_keys.add(meta["key"])
        pre_keys.add(hist["pretrain"]["key"])
        assert hist["pretrain"]["cache_hit"] is (protocol == "alf")      # the second protocol reuses it
        # the kept weights are those of the best validation-robust epoch (the first one on ties)
        vr = hist["val_robust_accuracy"]
        assert hist["selected_epoch"] == vr.index(max(vr)) + 1
        xv, yv = data_mod.to_float(splits.x_val), splits.y_val
        assert selection_accuracy(model, xv, yv, 0.05, 2.5 * 0.05 / 3, 3, 0 + 2)[1] == max(vr)
        # linear protocols leave the encoder exactly as pre-trained (pgd BN, statistics included)
        cm = ContrastiveModel(_classifier(seed=0))
        assert cache.load(hist["pretrain"]["key"], cm, proc.encoder_key_spec(spec)) is not None
        ref = _classifier(seed=9)
        load_pretrained(ref, cm, "pgd")
        for k, v in model.state_dict().items():
            if not k.startswith("net.fc."):
                assert torch.equal(v, ref.state_dict()[k]), k
    assert len(pre_keys) == 1 and len(run_keys) == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 3            # one encoder, two classifiers
    assert content_key(ACL(variant="simclr").training_procedure().encoder_key_spec(base)) not in pre_keys


def test_the_variants_table_orders_the_arms_and_answers_ds_vs_simclr(tmp_path, capsys):
    import importlib.util
    import json

    from conftest import ROOT
    spec_ = importlib.util.spec_from_file_location("acl_summarize", ROOT / "experiments/acl_variants/summarize.py")
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    summarize = mod.summarize

    for i, (variant, clean, rob) in enumerate([("ds", 0.8, 0.55), ("none", 0.75, 0.5), ("simclr", 0.78, 0.52)]):
        run = tmp_path / "sweep" / f"{i}_pgd_acl_{variant}_aff"
        run.mkdir(parents=True)
        ckpt = tmp_path / f"ckpt{i}.safetensors"
        hist = {"selected_epoch": 2, "val_robust_accuracy": [0.4, 0.6, 0.5], "seconds": [10.0, 20.0, 30.0],
                "pretrain": {"seconds": 5.0, "history": {"loss": [5.0, 4.0], "seconds": [2.0, 4.5]}}}
        ckpt.with_suffix(".json").write_text(json.dumps({"history": hist}))
        spec = ACL(variant=variant).training_procedure().spec()
        (run / "metrics.json").write_text(json.dumps({
            "defense_config": spec, "checkpoint": str(ckpt), "clean_accuracy": clean, "robust_accuracy": rob,
            "seed": 0, "n_examples": 500, "attack": "pgd", "eps": 0.1}))
    w = summarize([tmp_path / "sweep"])
    md = w["md"].read_text()
    per_run = md.split("Table: ")[1]        # the first table: one row per run (the second: per arm)
    rows = [ln for ln in per_run.splitlines() if ln.startswith("| ") and "pre-training |" not in ln]
    assert [r.split(" | ")[0] for r in rows] == ["| no pre-training (TRADES from scratch)",
                                                  "| SimCLR (standard to standard)", "| ACL DS (dual stream)"]
    assert "| 0.550 | 2 | 0.600 | 4.000 | 4.5 | 25.0 |" in rows[2]
    assert ("DS vs SimCLR in robust accuracy, seeds 0: 0.550 vs 0.520, paired difference +0.030 from one seed: "
            "**inconclusive**") in md   # one seed: no interval, no verdict
    assert w["png"].stat().st_size > 1000
    # with more seeds the answer is the seed mean, with the paired difference (not the first seed alone)
    for i, (variant, seed, rob) in enumerate([("ds", 1, 0.50), ("simclr", 1, 0.54)]):
        run = tmp_path / "sweep" / f"s{seed}_{i}_pgd_acl_{variant}_aff"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({
            "defense_config": ACL(variant=variant).training_procedure().spec(), "checkpoint": None,
            "clean_accuracy": 0.7, "robust_accuracy": rob, "seed": seed, "n_examples": 500, "attack": "pgd",
            "eps": 0.1}))
    md = summarize([tmp_path / "sweep"])["md"].read_text()
    assert ("DS vs SimCLR in robust accuracy, seeds 0, 1: 0.525 vs 0.530, paired difference -0.005 ± 0.445 "
            "(95% t-interval over 2 seeds, sd 0.049): **inconclusive**") in md
    # the same from the experiment's end-of-sweep callback; a broken table is reported, never raised (the
    # sweep's generic comparison runs after it)
    from omegaconf import OmegaConf
    cb = mod.WriteTableOnMultirunEnd()
    (tmp_path / "sweep" / "acl_variants.md").unlink()
    cb.on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}}))
    assert (tmp_path / "sweep" / "acl_variants.md").is_file()
    (tmp_path / "sweep" / "s1_0_pgd_acl_ds_aff" / "metrics.json").write_text("{broken")
    cb.on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}}))
    out = capsys.readouterr()
    assert "ACL variants table written to" in out.out
    assert "ACL variants table FAILED" in out.err and "experiments/acl_variants/summarize.py" in out.err
