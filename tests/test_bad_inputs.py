"""Bad inputs (configs, data, checkpoints, damaged cache and cell entries) through run.py and the app.

Every case must end in a clear error naming the key or value (or, for a damaged cache/cell entry, in the
entry being detected and rebuilt), exit non-zero, and leave what earlier runs produced alone: a finished
run directory, the cell store and the checkpoint cache of the module's ``prior`` run are compared file by
file (SHA-256) before and after each case. Config errors must also come before any data is read (a spy on
the dataset reader) and before anything is trained (no new checkpoint).

Validation covered elsewhere is not repeated here: value checks of attacks (tests/test_config.py),
IDX/CIFAR parsing (tests/test_data.py), the cache's own corruption and pickle tests (tests/test_cache.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from robustbench_lab.core import data as data_mod
from robustbench_lab.app.builders import build_model
from robustbench_lab.app.execute import execute
from robustbench_lab.core.cache import (CheckpointCache, CheckpointMismatchError, content_key, save_weights,
                                   sha256_file)
from robustbench_lab.app.cells import CellStore, cell_key
from robustbench_lab.core.errors import ConfigError, DataNotFoundError
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.recipe import Recipe
from robustbench_lab.core.train import get_or_train
from robustbench_lab.core.zoo import LinearClassifier

from conftest import ROOT, compose, fashion_available

TINY = ["model=small_cnn", "model.train.max_train=2000", "model.train.epochs=1", "data.n_eval=32",
        "data.n_val=200", "progress=false", "logger=none", "checks=none"]


def _paths(root: Path) -> list[str]:
    return [f"paths.root_dir={root}", f"paths.cache_dir={root}/cache"]


def _message(e: BaseException) -> str:
    """The exception's message and its causes' (Hydra puts 'full_key: ...' in the cause)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def assert_untouched(root: Path, before: dict[str, str], new_weights_ok: bool = False) -> list[str]:
    """Every file that existed is byte-identical; returns the new files (no new checkpoint unless allowed)."""
    after = snapshot(root)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not changed, f"existing outputs changed or lost: {changed}"
    new = sorted(set(after) - set(before))
    if not new_weights_ok:
        assert not [n for n in new if n.endswith(".safetensors")], f"something was trained: {new}"
    return new


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: small-batch work runs on one thread


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A root holding the outputs of one finished tiny run: run directory, stored cell, cached checkpoint."""
    if not fashion_available():
        pytest.skip("Fashion-MNIST not installed")
    root = tmp_path_factory.mktemp("prior")
    run_dir = root / "outputs" / "runs" / "finished"
    execute(compose(TINY + _paths(root)), run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["cache_hit"] is False
    assert len(list((root / "outputs" / "cells").glob("*/metrics.json"))) == 1
    assert len(list((root / "cache" / "checkpoints").glob("*.safetensors"))) == 1
    return {"root": root, "run_dir": run_dir, "metrics": metrics}


@pytest.fixture()
def reader_spy(monkeypatch):
    """Counts reads of the default dataset (the header-only size probe is not a read)."""
    card = data_mod.get_card("fashion_mnist")

    class Spy:
        calls = 0

        def count(self, root, train):
            return card.reader.count(root, train)

        def __call__(self, *a, **k):
            Spy.calls += 1
            return card.reader(*a, **k)

    spy = Spy()
    monkeypatch.setitem(data_mod._CARDS, "fashion_mnist", dataclasses.replace(card, reader=spy))
    return spy


def run_py(root: Path, args: list[str], run_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    cmd = [sys.executable, str(ROOT / "run.py"), *TINY, *_paths(root), *args]
    if run_dir is not None:
        cmd.append(f"hydra.run.dir={run_dir}")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(root))


# ------------------------------------------------------------------------------------ at composition
@pytest.mark.parametrize("override,key", [
    ("seed=abc", "seed"), ("batch_size=1.5", "batch_size"), ("progress=maybe", "progress"),
    ("attacks=pgd", "attacks"), ("data.n_eval=ten", "data.n_eval"), ("data.download=sometimes", "data.download"),
    ("model.train.epochs=2.5", "model.train.epochs"), ("model.train.lr=fast", "model.train.lr"),
    ("model.train.milestones=0.5", "model.train.milestones"), ("model.train_seed=x", "model.train_seed"),
    ("num_threads=two", "num_threads"), ("logger=wandb logger.tags=x", "logger.tags"),
    # typos of keys
    ("data.n_evl=5", "data.n_evl"), ("model.train.epochz=3", "model.train.epochz"), ("sed=1", "sed"),
    ("logger=wandb logger.mod=online", "logger.mod"), ("logger=none logger.mode=online", "logger.mode"),
    ("paths.cache=/tmp/x", "paths.cache"),
])
def test_wrong_type_or_unknown_key_fails_at_composition(override, key):
    with pytest.raises(ConfigCompositionException) as ei:
        compose(override.split())
    assert key in _message(ei.value)


@pytest.mark.parametrize("override,needle", [
    ("data=imagenet", "data/imagenet"), ("model=resnet21", "model/resnet21"),
    ("logger=tensorboard", "logger/tensorboard"), ("defense=dropout", "defense/dropout")])
def test_unknown_option_lists_the_available_ones(override, needle):
    with pytest.raises(MissingConfigException) as ei:
        compose([override])
    msg = _message(ei.value)
    assert needle in msg and "Available options" in msg


@pytest.mark.parametrize("content,key", [("n_evl: 500", "data.n_evl"), ("n_eval: many", "data.n_eval"),
                                         ("download: maybe", "data.download")])
def test_bad_group_file_fails_at_composition(tmp_path, content, key):
    """A typo or a wrong type in a user's own option file (here data/mine.yaml) names the key too."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text(f"name: mnist\nroot: ${{paths.data_dir}}\n{content}\n")
    with pytest.raises(ConfigCompositionException) as ei:
        compose(["data=mine", f"hydra.searchpath=[file://{tmp_path}]"])
    msg = _message(ei.value)
    assert key in msg and "data/mine" in msg


@pytest.mark.parametrize("args,needles", [
    (["seed=abc"], ["full_key: seed", "'abc'"]),
    (["model.train.lr=fast"], ["full_key: model.train.lr", "'fast'"]),
    (["data.n_evl=5"], ["data.n_evl"]),
    (["data=imagenet"], ["data/imagenet", "fashion_mnist"]),
])
def test_run_py_composition_errors(prior, args, needles):
    root = prior["root"]
    before = snapshot(root)
    p = run_py(root, args)
    assert p.returncode != 0
    for n in needles:
        assert n in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr          # a message, not a crash
    assert_untouched(root, before)
    assert sorted(p.name for p in (root / "outputs" / "runs").iterdir()) == ["finished"]   # no run dir made


def test_run_py_bad_option_file(prior, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text("name: mnist\nroot: ${paths.data_dir}\nn_eval: many\n")
    before = snapshot(prior["root"])
    p = run_py(prior["root"], ["data=mine", f"hydra.searchpath=[file://{tmp_path}]"])
    assert p.returncode != 0 and "full_key: data.n_eval" in p.stderr and "'many'" in p.stderr
    assert_untouched(prior["root"], before)


# ------------------------------------------------------------------ before any data is read (validate)
@pytest.mark.parametrize("args,key,value", [
    (["+data.n_evl=5"], "data.n_evl", "5"),                      # '+' force-adds into a typed node
    (["+sed=1"], "sed", "1"),
    (["+model.train.warmup=0.1"], "model.train.warmup", "0.1"),
    (["data.n_eval=20000"], "data.n_eval", "10000"),            # more than the test set holds
    (["data.n_val=60000"], "data.n_val", "60000"),
    (["data.split_seed=-3"], "data.split_seed", "-3"),
    (["model.checkpoint=/nonexistent/weights.safetensors"], "model.checkpoint", "/nonexistent/weights.safetensors"),
    (["checks=ful"], "checks", "'ful'"),
    (["+model.kwargs.widht=8"], "model.kwargs", "widht"),
    (["model=lenet", "+model.kwargs.width=8"], "model.kwargs", "width"),   # lenet takes no width
    (["attack.eps=1.5"], "attack.eps", "1.5"),                  # L-inf beyond the [0, 1] box
    (["attack.eps=nan"], "attack.eps", "nan"),
    (["attack.eps=true"], "attack.eps", "True"),
    (["attack.eps=null"], "attack.eps", "fixed-epsilon"),
    (["attack=cw", "attack.norm=linf"], "attack.norm", "'linf'"),
    (["attack=trust_region", "attack.order=2", "attack.norm=linf"], "attack.norm", "L2 only"),
    (["attack=deepfool", "attack.norm=linf", "attack.eps=2"], "attack.eps", "2"),
    (["attacks=[fgsm,cw]"], "attack.norm", "cw does not support"),
    (["model.train.momentum=1.5"], "model.train.momentum", "1.5"),  # training recipe ranges
    (["model.train.momentum=0"], "model.train.nesterov", "momentum > 0"),
    (["model.train.weight_decay=-0.1"], "model.train.weight_decay", "-0.1"),
    (["model.train.warmup_frac=0"], "model.train.warmup_frac", "0"),
    (["model.train.milestones=[0.75,0.5]"], "model.train.milestones", "[0.75, 0.5]"),
    (["model.train.label_smoothing=1.0"], "model.train.label_smoothing", "1.0"),
    (["model.train.max_train=-5"], "model.train.max_train", "-5"),
])
def test_config_errors_come_before_any_work(prior, reader_spy, tmp_path, args, key, value):
    root = prior["root"]
    before = snapshot(root)
    run_dir = tmp_path / "bad_run"
    with pytest.raises(ConfigError) as ei:
        execute(compose(TINY + _paths(root) + args), run_dir)
    msg = str(ei.value)
    assert f"'{key}'" in msg and value in msg, msg
    assert reader_spy.calls == 0, "the dataset was read before the config was rejected"
    assert_untouched(root, before)
    failed = json.loads((run_dir / "failed.json").read_text())
    assert key in failed["error"] and not (run_dir / "metrics.json").exists()


def test_failure_inside_a_finished_run_directory_keeps_its_results(prior):
    """Re-using a finished run's directory (same hydra.run.dir) for a bad run must not touch its results."""
    run_dir = prior["run_dir"]
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match="attack.eps"):
        execute(compose(TINY + _paths(prior["root"]) + ["attack.eps=1.5", "resume=false"]), run_dir)
    assert assert_untouched(run_dir, before) in ([], ["failed.json"])


# --------------------------------------------------------------------------------------------- data
def _idx_files(folder: Path, n_train: int = 60, n_test: int = 30) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        data_mod.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        data_mod.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))


def _truncate(path: Path, keep: float) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])


@pytest.mark.parametrize("damage,needles", [
    ("missing", ["MNIST (train) not found", "data.root", "data.download"]),
    ("truncated_gz", ["t10k-images-idx3-ubyte.gz", "truncated"]),
    ("truncated_raw", ["train-images-idx3-ubyte", "truncated"]),
    ("not_idx", ["train-labels-idx1-ubyte", "not an IDX file"]),
])
def test_dataset_missing_or_damaged(prior, tmp_path, damage, needles):
    root = prior["root"]
    data_root = tmp_path / "mnist"
    if damage != "missing":
        _idx_files(data_root)
    if damage == "truncated_gz":
        _truncate(data_root / "t10k-images-idx3-ubyte.gz", 0.5)
    elif damage == "truncated_raw":
        gz = data_root / "train-images-idx3-ubyte.gz"
        raw = data_mod.read_idx(gz)
        gz.unlink()
        data_mod.write_idx(data_root / "train-images-idx3-ubyte", raw)
        _truncate(data_root / "train-images-idx3-ubyte", 0.9)
    elif damage == "not_idx":
        (data_root / "train-labels-idx1-ubyte.gz").write_bytes(b"<html>404 Not Found</html>")
    before = snapshot(root)
    run_dir = tmp_path / "run"
    with pytest.raises((DataNotFoundError, ValueError)) as ei:
        execute(compose(TINY + _paths(root) + ["data=mnist", f"data.root={data_root}", "data.n_val=5",
                                                "data.n_eval=5"]), run_dir)
    for n in needles:
        assert n in str(ei.value), str(ei.value)
    assert_untouched(root, before)
    assert not (run_dir / "metrics.json").exists() and (run_dir / "failed.json").is_file()


def test_n_eval_beyond_files_on_disk_is_caught_from_the_header(prior, tmp_path, monkeypatch):
    """A dataset folder holding fewer test points than n_eval: the label file's header says so, and the
    run stops before the images are read."""
    data_root = tmp_path / "mnist"
    _idx_files(data_root, n_train=60, n_test=30)
    reads = []
    card = data_mod.get_card("mnist")
    real = card.reader

    class Spy:
        def count(self, r, train):
            return real.count(r, train)

        def __call__(self, *a, **k):
            reads.append(a)
            return real(*a, **k)

    monkeypatch.setitem(data_mod._CARDS, "mnist", dataclasses.replace(card, reader=Spy()))
    with pytest.raises(ConfigError) as ei:
        execute(compose(TINY + _paths(tmp_path) + ["data=mnist", f"data.root={data_root}", "data.n_val=5",
                                                    "data.n_eval=31"]), tmp_path / "run")
    assert "'data.n_eval'" in str(ei.value) and "n_eval <= 30" in str(ei.value)
    assert reads == []


def test_run_py_missing_dataset(prior, tmp_path):
    root = prior["root"]
    before = snapshot(root)
    run_dir = tmp_path / "run"
    p = run_py(root, ["data=mnist", f"data.root={tmp_path / 'nowhere'}"], run_dir)
    assert p.returncode != 0
    assert "MNIST (train) not found" in p.stderr and "data.root" in p.stderr
    assert_untouched(root, before)
    assert "DataNotFoundError" in json.loads((run_dir / "failed.json").read_text())["error"]


# -------------------------------------------------------------------------------------- checkpoints
def _weights_for(model: str, data: str, path: Path) -> Path:
    cfg = compose([f"model={model}", f"data={data}"])
    torch.manual_seed(0)
    save_weights(build_model(cfg, data_mod.get_card(data)), path)
    return path


def _other_architecture(d: Path) -> Path:
    return _weights_for("lenet", "fashion_mnist", d / "lenet.safetensors")


def _other_dataset(d: Path) -> Path:            # the same architecture for 3 channels and 100 classes
    return _weights_for("small_cnn", "cifar100", d / "cifar100_cnn.safetensors")


def _not_safetensors(d: Path) -> Path:
    (d / "garbage.safetensors").write_bytes(os.urandom(4096))
    return d / "garbage.safetensors"


def _cut_short(d: Path) -> Path:
    p = _weights_for("small_cnn", "fashion_mnist", d / "cut.safetensors")
    _truncate(p, 0.5)
    return p


@pytest.mark.parametrize("make,needles", [
    (_other_architecture, ["model.checkpoint", "does not match the model", "missing keys"]),
    (_other_dataset, ["model.checkpoint", "shape mismatches"]),
    (_not_safetensors, ["model.checkpoint", "not a readable safetensors file"]),
    (_cut_short, ["model.checkpoint", "not a readable safetensors file"]),
])
def test_checkpoint_that_does_not_fit_the_model_card(prior, reader_spy, tmp_path, make, needles):
    ckpt = make(tmp_path)
    root = prior["root"]
    before = snapshot(root)
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointMismatchError) as ei:
        execute(compose(TINY + _paths(root) + [f"model.checkpoint={ckpt}"]), run_dir)
    for n in needles:
        assert n in str(ei.value), str(ei.value)
    assert str(ckpt) in str(ei.value)
    assert reader_spy.calls == 0, "the checkpoint is checked against the model before the data is read"
    assert_untouched(root, before)
    assert (run_dir / "failed.json").is_file() and not (run_dir / "metrics.json").exists()


def test_run_py_checkpoint_mismatch(prior, tmp_path):
    ckpt = _weights_for("lenet", "fashion_mnist", tmp_path / "lenet.safetensors")
    before = snapshot(prior["root"])
    p = run_py(prior["root"], [f"model.checkpoint={ckpt}"], tmp_path / "run")
    assert p.returncode != 0
    assert "model.checkpoint" in p.stderr and "does not match the model" in p.stderr
    assert_untouched(prior["root"], before)


# ------------------------------------------------------------------- damaged checkpoint cache entries
def _copy_of(prior, tmp_path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(prior["root"], root)
    return root


def test_corrupted_cached_checkpoint_is_rebuilt_in_a_run(prior, tmp_path, caplog):
    root = _copy_of(prior, tmp_path)
    (wp,) = (root / "cache" / "checkpoints").glob("*.safetensors")
    original = wp.read_bytes()
    raw = bytearray(original)
    for i in range(len(raw) - 64, len(raw) - 32):       # flip weight bytes: still a valid safetensors file
        raw[i] ^= 0x5A
    wp.write_bytes(bytes(raw))
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="robustbench_lab.core.cache"):
        execute(compose(TINY + _paths(root) + ["resume=false"]), run_dir)
    assert any("corrupted" in r.getMessage() and wp.stem in r.getMessage() for r in caplog.records)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["cache_hit"] is False                        # rebuilt, not used
    assert wp.read_bytes() == original                    # retraining reproduces the entry bit for bit
    for k in ("clean_accuracy", "robust_accuracy", "attack_success_rate"):
        assert m[k] == prior["metrics"][k], k


def _tiny_setup(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    card = data_mod.get_card("fashion_mnist")
    splits = data_mod.Splits(card, x, y, x[:0], y[:0], x[:16], y[:16], torch.arange(0), torch.arange(16))
    recipe = Recipe(epochs=1, batch_size=16, augment=False, lr=0.05)

    def fresh():
        torch.manual_seed(0)
        return Classifier(LinearClassifier(1, 10, 784), card.mean, card.std, 10)

    def spec(seed):
        return {"model": {"name": "linear"}, "recipe": vars(recipe), "seed": seed}

    def train(cache, seed=0):
        m = fresh()
        meta = get_or_train(m, spec(seed), splits, recipe, cache, torch.device("cpu"), seed, progress=False)
        return m, meta
    return train, spec


def _tamper_key(cache, a, b):
    meta = json.loads(cache.meta_path(a).read_text())
    meta["key"] = b
    cache.meta_path(a).write_text(json.dumps(meta))


def _tamper_spec(cache, a, b):
    meta = json.loads(cache.meta_path(a).read_text())
    meta["spec"]["seed"] = 1                                      # weights and sha256 untouched
    cache.meta_path(a).write_text(json.dumps(meta))


def _swap_in_other_entry(cache, a, b):
    shutil.copy(cache.weights_path(b), cache.weights_path(a))
    shutil.copy(cache.meta_path(b), cache.meta_path(a))


def _truncate_sidecar(cache, a, b):
    _truncate(cache.meta_path(a), 0.5)


def _swap_weights_only(cache, a, b):
    shutil.copy(cache.weights_path(b), cache.weights_path(a))


@pytest.mark.parametrize("tamper", [_tamper_key, _tamper_spec, _swap_in_other_entry, _truncate_sidecar,
                                    _swap_weights_only])
def test_tampered_cache_entry_is_never_used(tmp_path, tamper, caplog):
    """Entry A is replaced by (parts of) entry B, or its sidecar is edited: get_or_train must notice, retrain
    A from a fresh initialisation and store it again, never hand out B's weights as A's."""
    train, spec = _tiny_setup(tmp_path)
    reference, _ = train(CheckpointCache(tmp_path / "reference"))
    cache = CheckpointCache(tmp_path / "cache")
    a_model, a_meta = train(cache, seed=0)
    b_model, _ = train(cache, seed=1)
    a, b = content_key(spec(0)), content_key(spec(1))
    assert a_meta["key"] == a and not torch.equal(a_model.net.fc.weight, b_model.net.fc.weight)
    tamper(cache, a, b)
    with caplog.at_level(logging.WARNING, logger="robustbench_lab.core.cache"):
        m, meta = train(cache, seed=0)
    assert meta["cache_hit"] is False
    if tamper is not _truncate_sidecar:                  # an unreadable sidecar is simply an absent entry
        assert any("corrupted" in r.getMessage() for r in caplog.records)
    for k, v in reference.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    again, meta2 = train(cache, seed=0)                    # the rebuilt entry is valid and used
    assert meta2["cache_hit"] is True and torch.equal(again.net.fc.weight, reference.net.fc.weight)


# ------------------------------------------------------------------------------ damaged cell entries
def _fake_cell(tmp_path, robust=0.5, seed=0):
    run_dir = tmp_path / f"run_{seed}"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"robust_accuracy": robust, "seed": seed}))
    (run_dir / "per_example.csv").write_text("index,success\n0,True\n")
    (run_dir / "summary.md").write_text("# summary\n")
    cfg = {"seed": seed, "data": {"name": "fashion_mnist"}, "attack": {"eps": 0.1}}
    return run_dir, cfg, cell_key(cfg)


def _edit_metrics(store, key, other):
    p = store.path(key) / "metrics.json"
    p.write_text(p.read_text().replace("0.5", "0.9"))


def _extra_file(store, key, other):
    (store.path(key) / "per_example.parquet").write_bytes(b"PAR1")


def _no_manifest(store, key, other):
    (store.path(key) / "manifest.json").unlink()


def _cell_of_other_key(store, key, other):
    shutil.rmtree(store.path(key))
    shutil.copytree(store.path(other), store.path(key))


def _truncated_metrics(store, key, other):
    _truncate(store.path(key) / "metrics.json", 0.5)


@pytest.mark.parametrize("damage", [_edit_metrics, _extra_file, _no_manifest, _cell_of_other_key,
                                    _truncated_metrics])
def test_damaged_cell_is_not_restored(tmp_path, damage, caplog):
    store = CellStore(tmp_path / "cells")
    run_dir, cfg, key = _fake_cell(tmp_path, seed=0)
    other_dir, other_cfg, other = _fake_cell(tmp_path, robust=0.7, seed=1)
    store.put(key, run_dir, cfg)
    store.put(other, other_dir, other_cfg)
    assert store.verify(key) is None and store.restore(key, tmp_path / "ok")["robust_accuracy"] == 0.5
    damage(store, key, other)
    with caplog.at_level(logging.WARNING, logger="robustbench_lab.app.cells"):
        assert store.restore(key, tmp_path / "restored") is None
    assert any("damaged" in r.getMessage() and key in r.getMessage() for r in caplog.records)
    assert not store.path(key).exists() and not store.done(key)
    assert not (tmp_path / "restored").exists()           # nothing of the damaged cell was copied out
    assert store.verify(other) is None                    # the other cell is left alone
    store.put(key, run_dir, cfg)                            # the recomputed cell is stored again
    assert store.restore(key, tmp_path / "again")["robust_accuracy"] == 0.5


def test_damaged_cell_is_recomputed_in_a_run(prior, tmp_path, caplog):
    root = _copy_of(prior, tmp_path)
    (cell,) = [p.parent for p in (root / "outputs" / "cells").glob("*/metrics.json")]
    raw = bytearray((cell / "per_example.parquet").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (cell / "per_example.parquet").write_bytes(bytes(raw))
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="robustbench_lab.app.cells"):
        execute(compose(TINY + _paths(root)), run_dir)
    assert any("damaged" in r.getMessage() for r in caplog.records)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert "restored_from_cell" not in m and m["cache_hit"] is True
    for k in ("clean_accuracy", "robust_accuracy", "attack_success_rate", "median_linf"):
        assert m[k] == prior["metrics"][k], k
    assert CellStore(root / "outputs" / "cells").verify(cell.name) is None   # stored again, intact
