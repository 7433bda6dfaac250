"""Tests of robustbench_lab.core.cache: content keys, safe round trips, corruption detection, locking."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os

import pytest
import torch
from torch import nn

from robustbench_lab.core.cache import (CheckpointCache, CheckpointMismatchError, atomic_write_bytes,
                                   atomic_write_text, canonical_json, content_key, load_weights, save_weights,
                                   sha256_file)


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    # non-default buffers: run a few training-mode batches through the BatchNorm
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(5, 1, 8, 8))
    m.eval()
    return m


def _other_arch() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3), nn.Linear(3, 3))


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


SPEC = {"model": {"name": "small", "width": 4}, "data": {"name": "mnist", "split_seed": 0}, "seed": 1,
        "recipe": {"epochs": 2, "lr": 0.1}}


# ----------------------------------------------------------------------------------------- content_key
def test_content_key_stable_under_key_order():
    reordered = {"seed": 1, "recipe": {"lr": 0.1, "epochs": 2}, "data": {"split_seed": 0, "name": "mnist"},
                 "model": {"width": 4, "name": "small"}}
    k = content_key(SPEC)
    assert k == content_key(reordered)
    assert len(k) == 20 and all(c in "0123456789abcdef" for c in k)
    assert canonical_json(SPEC) == canonical_json(reordered)


@pytest.mark.parametrize("path,value", [
    (("seed",), 2), (("model", "name"), "big"), (("model", "width"), 8), (("data", "split_seed"), 1),
    (("recipe", "lr"), 0.01), (("recipe", "epochs"), 2.5), (("recipe", "epochs"), "2"), (("seed",), True),
    (("data", "name"), None),
])
def test_content_key_changes_with_any_value(path, value):
    spec = json.loads(json.dumps(SPEC))
    d = spec
    for p in path[:-1]:
        d = d[p]
    assert d[path[-1]] != value or type(d[path[-1]]) is not type(value)
    d[path[-1]] = value
    assert content_key(spec) != content_key(SPEC)


def test_content_key_changes_with_added_key():
    assert content_key({**SPEC, "defense": None}) != content_key(SPEC)
    assert content_key({"a": [1, 2]}) != content_key({"a": [2, 1]})


# ------------------------------------------------------------------------------------------ round trip
def test_save_load_round_trip(tmp_path):
    m = _model(0)
    assert m[1].num_batches_tracked.item() == 3 and not torch.equal(m[1].running_mean, torch.zeros(4))
    cache = CheckpointCache(tmp_path / "ck")
    key = content_key(SPEC)
    wp = cache.save(key, m, SPEC, extra={"test_accuracy": 0.5})
    assert wp == tmp_path / "ck" / f"{key}.safetensors" and wp.is_file()
    meta = cache.meta(key)
    assert meta["key"] == key and meta["spec"] == SPEC and meta["test_accuracy"] == 0.5
    assert meta["sha256"] == sha256_file(wp)

    fresh = _model(1)
    assert not torch.equal(fresh[0].weight, m[0].weight)
    loaded = cache.load(key, fresh)
    assert loaded == meta
    _assert_same_state(m, fresh)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(m(x), fresh(x))


def test_safetensors_file_is_not_a_pickle(tmp_path):
    m = _model(0)
    p = tmp_path / "w.safetensors"
    digest = save_weights(m, p, metadata={"k": "v"})
    assert digest == sha256_file(p)
    from safetensors import safe_open
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert set(f.keys()) == set(m.state_dict())
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


def test_load_absent_key(tmp_path):
    cache = CheckpointCache(tmp_path)
    assert cache.load("nope", _model()) is None
    assert cache.meta("nope") is None


@pytest.mark.parametrize("wrap", [False, True])
def test_load_weights_plain_torch_file(tmp_path, wrap):
    m = _model(0)
    p = tmp_path / "w.pt"
    torch.save({"state_dict": m.state_dict()} if wrap else m.state_dict(), p)
    fresh = _model(1)
    load_weights(fresh, p)
    _assert_same_state(m, fresh)


def test_load_weights_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(_model(), tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------------------- corruption
def test_corrupted_entry_detected_and_removed(tmp_path, caplog):
    cache = CheckpointCache(tmp_path)
    key = "k1"
    m = _model(0)
    wp = cache.save(key, m, SPEC)
    raw = bytearray(wp.read_bytes())
    for i in range(len(raw) - 40, len(raw) - 8):      # flip bytes in the tensor payload
        raw[i] ^= 0xFF
    wp.write_bytes(bytes(raw))

    target = _model(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="robustbench_lab.core.cache"):
        assert cache.load(key, target) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "robustbench_lab.core.cache"]
    assert len(warnings) == 1 and "corrupted" in warnings[0].getMessage() and key in warnings[0].getMessage()
    assert not wp.exists() and not cache.meta_path(key).exists()
    for k, v in target.state_dict().items():         # the model was not touched
        assert torch.equal(v, before[k]), k

    cache.save(key, m, SPEC)
    again = _model(2)
    assert cache.load(key, again)["sha256"] == sha256_file(wp)
    _assert_same_state(m, again)


def test_corrupted_header_byte_detected(tmp_path):
    cache = CheckpointCache(tmp_path)
    wp = cache.save("k", _model(0), SPEC)
    raw = bytearray(wp.read_bytes())
    raw[10] ^= 0x01
    wp.write_bytes(bytes(raw))
    assert cache.load("k", _model(1)) is None
    assert not wp.exists()


# --------------------------------------------------------------------------------------- unsafe files
class _Payload:
    """An object whose unpickling writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("wrap", ["bare", "in_state_dict"])
def test_load_weights_refuses_pickled_code(tmp_path, wrap):
    marker = tmp_path / "marker"
    m = _model(0)
    obj = _Payload(marker) if wrap == "bare" else {"state_dict": {**m.state_dict(), "evil": _Payload(marker)}}
    p = tmp_path / "evil.pt"
    torch.save(obj, p)
    assert not marker.exists()
    # control: the payload is live when loaded unsafely (on a separate copy with its own marker)
    ctrl_marker = tmp_path / "ctrl_marker"
    ctrl = tmp_path / "ctrl.pt"
    torch.save(_Payload(ctrl_marker), ctrl)
    torch.load(ctrl, weights_only=False)
    assert ctrl_marker.read_text() == "pwned"

    target = _model(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="could not be loaded safely"):
        load_weights(target, p)
    assert not marker.exists()
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_architecture_mismatch(tmp_path):
    p = tmp_path / "w.safetensors"
    save_weights(_model(0), p)
    with pytest.raises(CheckpointMismatchError) as ei:
        load_weights(_other_arch(), p, what="my ckpt")
    msg = str(ei.value)
    assert "my ckpt" in msg
    assert "missing keys ['3.bias', '3.weight']" in msg
    assert "unexpected keys ['1.bias', '1.num_batches_tracked', '1.running_mean', '1.running_var', '1.weight']" \
        in msg
    assert "shape mismatches ['4.weight']" in msg


def test_shape_mismatch(tmp_path):
    p = tmp_path / "w.safetensors"
    save_weights(_model(0), p)
    wider = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches \['4.weight', '4.bias'\]"):
        load_weights(wider, p)


def test_cache_load_wrong_architecture(tmp_path):
    cache = CheckpointCache(tmp_path)
    cache.save("k", _model(0), SPEC)
    with pytest.raises(CheckpointMismatchError, match="cached checkpoint k"):
        cache.load("k", _other_arch())


# ---------------------------------------------------------------------------------------- concurrency
def _concurrent_saver(directory: str, key: str, seed: int, rounds: int, barrier) -> None:
    torch.set_num_threads(1)
    cache = CheckpointCache(directory)
    m = _model(seed)
    barrier.wait()
    for _ in range(rounds):
        with cache.lock(key):
            cache.save(key, m, {**SPEC, "writer": seed})


def test_concurrent_saves_leave_one_valid_entry(tmp_path):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(2)
    key = content_key(SPEC)
    procs = [ctx.Process(target=_concurrent_saver, args=(str(tmp_path), key, s, 15, barrier)) for s in (10, 20)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]

    cache = CheckpointCache(tmp_path)
    meta = cache.meta(key)
    assert meta["sha256"] == sha256_file(cache.weights_path(key))
    writer = meta["spec"]["writer"]
    assert writer in (10, 20)
    loaded = _model(0)
    assert cache.load(key, loaded) is not None
    _assert_same_state(_model(writer), loaded)          # weights and metadata come from the same writer
    assert sorted(os.listdir(tmp_path)) == sorted([f"{key}.json", f"{key}.lock", f"{key}.safetensors"])


# ------------------------------------------------------------------------------------------ atomic write
def test_atomic_write_text_leaves_no_temp_files(tmp_path):
    p = tmp_path / "sub" / "meta.json"
    atomic_write_text(p, "first")
    atomic_write_text(p, "second ✓")
    assert p.read_text() == "second ✓"
    assert os.listdir(tmp_path / "sub") == ["meta.json"]


def test_atomic_write_failure_cleans_up(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "x").write_text("x")                       # os.replace onto a non-empty directory fails
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"data")
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    assert os.listdir(target) == ["x"]


@pytest.mark.parametrize("layout", ["model", "net", "nested", "dataparallel", "bare_network", "dp_in_state_dict"])
def test_load_weights_understands_the_common_wrappers(tmp_path, layout):
    """Checkpoints users bring: nested under model/net/state_dict keys, DataParallel's `module.` prefix, a bare
    network saved without the harness's wrapper; still weights-only."""
    m = _wrapped(0)
    sd = m.state_dict()
    net_sd = {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}
    content = {"model": {"model": sd}, "net": {"net": sd, "epoch": 3},
               "nested": {"checkpoint": 1, "state_dict": {"model": sd}},
               "dataparallel": {f"module.{k}": v for k, v in sd.items()}, "bare_network": net_sd,
               "dp_in_state_dict": {"state_dict": {f"module.{k}": v for k, v in net_sd.items()}}}[layout]
    if layout == "nested":
        content = {"state_dict": {"model": sd}}
    p = tmp_path / "user.pt"
    torch.save(content, p)
    fresh = _wrapped(1)
    load_weights(fresh, p, what="model.checkpoint")
    _assert_same_state(m, fresh)


def _wrapped(seed: int) -> nn.Module:
    """The test network inside the harness's wrapper (normalization buffers + ``net``)."""
    from robustbench_lab.core.model import Classifier
    return Classifier(_model(seed), (0.5,), (0.25,), 3)


def test_load_weights_names_missing_and_unexpected_keys(tmp_path):
    m = _wrapped(0)
    sd = {("net.renamed." + k[4:] if k.startswith("net.") else k): v for k, v in m.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError, match=r"model\.checkpoint .*missing keys \['net\..*unexpected keys "
                                                      r"\['net\.renamed\."):
        load_weights(_wrapped(1), tmp_path / "bad.pt", what="model.checkpoint")
