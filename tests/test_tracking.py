"""W&B as its users read it: a tiny evaluation logged offline, read back from the run's transaction log.

wandb 0.31 writes an offline run only as ``run-<id>.wandb`` (no ``wandb-summary.json`` or ``config.yaml``)
and ships no Python reader for it, so ``read_offline_run`` reads the log's framing (LevelDB log blocks:
crc32, length, type) and parses every record with wandb's own protobuf schema (``wandb.proto``), checking
each record's checksum. What it finds is what ``wandb sync`` would upload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from robustbench_lab.app.execute import execute
from robustbench_lab.app.tracking import HEADLINE, stage_prefix
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.cache import CheckpointCache, sha256_file
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.recipe import Recipe
from robustbench_lab.core.train import StandardTraining, get_or_train, run_epochs, train

from conftest import compose, fashion_available

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402  (only once wandb is known to be installed)

pytestmark = pytest.mark.usefixtures("one_thread")
needs_data = pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")

EPOCHS = 2
TINY = ["model=small_cnn", "model.train.max_train=1000", f"model.train.epochs={EPOCHS}", "data.n_eval=32",
        "data.n_val=200", "attack.steps=3", "checks=none", "progress=false"]
BLOCK, HEADER = 32768, 7   # the transaction log's block size and record header (crc32, length, type)


def read_offline_run(run_dir: Path) -> dict:
    """The one offline W&B run under ``run_dir/wandb``: its history rows, merged summary, tags, metric
    definitions and artifact records."""
    # run.finish() can return before wandb-core has written the last records (seen 2 times in 8 with 0.31 on
    # a loaded machine); shutting the service down waits for it. The next wandb.init starts a new one.
    wandb.teardown()
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, pending, pos = [], b"", 7   # the 7-byte file header sits in the first block
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:   # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + n]
        pos += HEADER + n
        if kind == 0:
            continue
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"corrupt record at byte {pos}"
        pending += chunk
        if kind in (1, 4):   # FULL, or LAST of a FIRST/MIDDLE/LAST sequence
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""

    def key(item) -> str:
        return "/".join(item.nested_key) if item.nested_key else item.key

    run = {"history": [], "summary": {}, "tags": [], "metrics": [], "artifacts": [], "id": None}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            run["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            run["summary"].update({key(u): json.loads(u.value_json) for u in rec.summary.update})
        elif kind == "run":
            run["tags"], run["id"] = list(rec.run.tags), rec.run.run_id
        elif kind == "metric":
            run["metrics"].append(rec.metric)
        elif kind == "artifact":
            run["artifacts"].append(rec.artifact)
    return run


def curve(run: dict, name: str) -> list:
    """The values of ``name`` in the history rows that carry ``train/epoch``, in epoch order."""
    rows = sorted((r for r in run["history"] if "train/epoch" in r), key=lambda r: r["train/epoch"])
    return [r.get(name) for r in rows]


def artifact(run: dict, type_: str):
    (art,) = [a for a in run["artifacts"] if a.type == type_]
    return art


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def same(a, b) -> bool:
    return a is None and b is None or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12))


@pytest.fixture()
def wandb_env(tmp_root, monkeypatch):
    """W&B offline, with every directory it may write to inside the test's folder."""
    for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_DATA_DIR", "wandb_data"),
                     ("WANDB_CACHE_DIR", "wandb_cache"), ("WANDB_CONFIG_DIR", "wandb_config")):
        (tmp_root / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_root / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_root


def check_results(run: dict, run_dir: Path) -> dict:
    """The summary's headline metrics are metrics.json's; per_example.parquet is a results artifact."""
    saved = json.loads((run_dir / "metrics.json").read_text())
    for k in HEADLINE:
        assert k in run["summary"], k
        assert same(run["summary"][k], saved[k]), (k, run["summary"][k], saved[k])
    res = artifact(run, "results")
    (entry,) = res.manifest.contents
    assert entry.path == "per_example.parquet" and Path(entry.local_path) == run_dir / "per_example.parquet"
    assert entry.digest == md5_b64(run_dir / "per_example.parquet") and entry.size > 0
    assert json.loads(res.metadata)["robust_accuracy"] == saved["robust_accuracy"]
    return saved


def check_model_artifact(run: dict, saved: dict) -> dict:
    """The checkpoint used is a model artifact holding that very file, with its cache key and SHA-256."""
    ckpt = Path(saved["checkpoint"])
    sidecar = CheckpointCache(ckpt.parent).meta(ckpt.stem)
    model = artifact(run, "model")
    meta = json.loads(model.metadata)
    assert meta["cache_key"] == sidecar["key"] == ckpt.stem
    assert meta["sha256"] == sidecar["sha256"] == sha256_file(ckpt)
    (entry,) = model.manifest.contents
    assert Path(entry.local_path) == ckpt and entry.digest == md5_b64(ckpt)
    assert run["summary"]["checkpoint/key"] == ckpt.stem and run["summary"]["checkpoint/sha256"] == meta["sha256"]
    return sidecar


@needs_data
def test_offline_run_holds_curves_summary_artifacts_and_marks_cache_and_restore(wandb_env):
    root = wandb_env
    cfg = compose(TINY + ["logger=wandb", "logger.mode=offline"])

    # 1. trained in this run: the curves arrive epoch by epoch, with the loop's own numbers
    first = root / "first"
    execute(cfg, first)
    run1 = read_offline_run(first)
    saved1 = check_results(run1, first)
    sidecar = check_model_artifact(run1, saved1)
    hist = sidecar["history"]
    assert curve(run1, "train/epoch") == list(range(1, EPOCHS + 1)) == hist["epoch"]
    assert curve(run1, "train/loss") == pytest.approx(hist["train_loss"])
    assert curve(run1, "train/accuracy") == pytest.approx(hist["train_accuracy"])
    assert curve(run1, "train/val_accuracy") == pytest.approx(hist["val_accuracy"])
    assert curve(run1, "train/lr") == pytest.approx(hist["lr"])
    assert all(0.3 < a <= 1 for a in hist["train_accuracy"] + hist["val_accuracy"])   # it did learn
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    steps = {(m.glob_name, m.step_metric) for m in run1["metrics"]}
    assert ("train/*", "train/epoch") in steps, steps            # W&B plots the curves against the epoch
    assert run1["summary"]["train/from_cache"] is False and "checkpoint:trained" in run1["tags"]
    assert {"attack:pgd", "model:small_cnn", "data:fashion_mnist"} <= set(run1["tags"])

    # 2. recomputed on the cached checkpoint: the stored curves are logged once, marked as from the cache
    second = root / "second"
    execute(compose(TINY + ["logger=wandb", "resume=false"]), second)
    run2 = read_offline_run(second)
    saved2 = check_results(run2, second)
    check_model_artifact(run2, saved2)
    assert saved2["cache_hit"] is True and saved2["checkpoint"] == saved1["checkpoint"]
    for name in ("train/epoch", "train/loss", "train/accuracy", "train/val_accuracy", "train/lr"):
        assert curve(run2, name) == pytest.approx(curve(run1, name)), name
    assert run2["summary"]["train/from_cache"] is True and "checkpoint:cache" in run2["tags"]

    # 3. restored from the cell store: a run of its own, tagged and pointing at the run that computed it
    third = root / "third"
    execute(cfg, third)
    saved3 = json.loads((third / "metrics.json").read_text())
    assert saved3["restored_from_run"] == str(first.resolve())   # the run that stored the cell (an intact
    run3 = read_offline_run(third)                                # cell is not replaced by a recomputation)
    assert "restored" in run3["tags"] and run3["summary"]["restored"] is True
    assert run3["summary"]["restored_from_run"] == str(first.resolve())
    assert run3["summary"]["restored_from_wandb_run"] == run1["id"]
    assert run3["summary"]["restored_from_cell"] == saved3["restored_from_cell"]
    for k in HEADLINE:
        assert same(run3["summary"][k], saved1[k]), k
    assert not run3["artifacts"] and not curve(run3, "train/loss")   # nothing was recomputed or retrained


@needs_data
def test_logger_none_writes_nothing(wandb_env, monkeypatch):
    def no_wandb(*_, **__):
        raise AssertionError("wandb.init called with logger=none")
    monkeypatch.setattr(wandb, "init", no_wandb)
    cfg = compose(TINY + ["logger=none", "model.train.epochs=1"])
    execute(cfg, wandb_env / "a")
    execute(cfg, wandb_env / "b")                       # restored from the cell store: still nothing
    assert json.loads((wandb_env / "b" / "metrics.json").read_text())["restored_from_wandb_run"] is None
    for d in ("a", "b"):
        assert not (wandb_env / d / "wandb").exists()
    for sub in ("wandb_dir", "wandb_data", "wandb_cache", "wandb_config"):
        assert not any((wandb_env / sub).iterdir()), sub


def _mlp(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 8), nn.ReLU(), nn.Linear(8, 10)), (0.5,), (0.25,), 10)


def test_every_stage_of_a_checkpoint_reports_its_epochs_and_nothing_else(tmp_path):
    """get_or_train's observer hears each epoch of every stage that builds this checkpoint, with the rate
    each epoch's last step used; not the training of another checkpoint nested inside; not a cache hit."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (50, 1, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (50,), generator=g)
    splits = data_mod.Splits(data_mod.get_card("fashion_mnist"), x[:30], y[:30], x[30:40], y[30:40], x[40:], y[40:],
                             torch.arange(10), torch.arange(10))
    recipe = Recipe(epochs=2, batch_size=10, augment=False, schedule="cosine", lr=0.1)   # 3 steps an epoch
    cache = CheckpointCache(tmp_path)

    class WarmThenTrain(StandardTraining):
        def fit(self, model, splits, recipe, device, seed, *, cache=None, spec=None, progress=False):
            get_or_train(_mlp(1), {"other": 1}, splits, recipe, cache, device, seed, progress=False)   # not ours
            w = nn.Parameter(torch.zeros(()))
            run_epochs(lambda xb: (w - 1) ** 2, lambda _: [(xb,) for xb in x[:2]], torch.optim.SGD([w], lr=0.5), 1,
                       desc="ACL simclr pre-training")
            return train(model, splits, recipe, device, seed, self, progress=False)

    heard: list[dict] = []
    meta = get_or_train(_mlp(), {"mine": 1}, splits, recipe, cache, torch.device("cpu"), 0, WarmThenTrain(),
                        progress=False, on_epoch=heard.append)
    assert [(r["stage"], r["epoch"]) for r in heard] == [("ACL simclr pre-training", 1), ("train epoch", 1),
                                                        ("train epoch", 2)]
    assert [stage_prefix(r["stage"]) for r in heard] == ["acl_simclr_pre-training", "train", "train"]
    lr_last = [0.1 * (1 + math.cos(math.pi * k / 6)) / 2 for k in (2, 5)]   # cosine over 6 steps, steps 3 and 6
    assert [r["lr"] for r in heard[1:]] == pytest.approx(lr_last)
    assert [r["train_loss"] for r in heard[1:]] == meta["history"]["train_loss"]
    assert all(0 <= r["train_accuracy"] <= 1 and 0 <= r["val_accuracy"] <= 1 for r in heard[1:])
    assert CheckpointCache(tmp_path).meta(meta["key"])["epochs"] == heard   # what a cache hit shows
    heard.clear()
    again = get_or_train(_mlp(), {"mine": 1}, splits, recipe, cache, torch.device("cpu"), 0, WarmThenTrain(),
                         progress=False, on_epoch=heard.append)
    assert again["cache_hit"] is True and heard == []


def test_a_checkpoint_file_of_the_user_is_logged_with_its_sha256(wandb_env):
    """``model.checkpoint=<file>``: no cache key, no curves; the artifact is that file, named by its hash."""
    from robustbench_lab.app.tracking import WandbTracker
    from robustbench_lab.core.cache import save_weights
    weights = wandb_env / "mine.safetensors"
    digest = save_weights(_mlp(), weights)
    t = WandbTracker(project="t")
    t.start(config={}, run_dir=wandb_env / "r", name="file")
    t.log_checkpoint({"checkpoint": str(weights), "cache_hit": None})
    t.finish(0)
    run = read_offline_run(wandb_env / "r")
    meta = json.loads(artifact(run, "model").metadata)
    assert meta["sha256"] == digest == sha256_file(weights) and meta["cache_key"] is None
    assert artifact(run, "model").name == f"checkpoint-{digest[:20]}"
    assert run["summary"]["checkpoint/source"] == "file" and run["summary"]["train/from_cache"] is False
    assert "checkpoint:file" in run["tags"] and not curve(run, "train/loss")
