"""Tests of robustbench_lab.core.data on small files the tests write in the datasets' real on-disk formats."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch

from robustbench_lab.core import data
from robustbench_lab.core.data import DataNotFoundError, read_idx, write_idx
from robustbench_lab.core.errors import ConfigError

# ------------------------------------------------------------------------------------------- helpers
N_TRAIN, N_TEST = 40, 20


def _mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(y)
    return x, y


def _write_mnist(folder, compress: bool, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if compress else ""
    out = {}
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        x, y = _mnist_arrays(n, s)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", y)
        out[prefix] = (x, y)
    return out


def _cifar_images(n: int, seed: int) -> np.ndarray:
    """(n, 3072) uint8 rows, channel-major (1024 red, 1024 green, 1024 blue) as in the CIFAR batches."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


class _Py2StrPickler(pickle._Pickler):
    """Pickles ``bytes`` as Python-2 ``str`` (SHORT_BINSTRING / BINSTRING opcodes), like the distributed
    CIFAR files which were written by Python 2 (and numpy.core.multiarray)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_cifar(path, obj: dict, py2: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if py2:
        import io
        buf = io.BytesIO()
        _Py2StrPickler(buf, protocol=2).dump(obj)
        raw = buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        path.write_bytes(raw)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)


def _write_cifar10(root, per_batch: int = 8, n_test: int = 12, py2: bool = False) -> tuple[np.ndarray, ...]:
    base = root / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        x = _cifar_images(per_batch, i)
        y = [int(v) for v in (np.arange(per_batch) + i) % 10]
        _dump_cifar(base / f"data_batch_{i}", {b"batch_label": b"training batch %d of 5" % i, b"labels": y,
                                               b"data": x, b"filenames": [b"f%d.png" % j for j in range(per_batch)]},
                    py2)
        xs.append(x)
        ys.extend(y)
    xt = _cifar_images(n_test, 99)
    yt = [int(v) for v in np.arange(n_test) % 10]
    _dump_cifar(base / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": yt, b"data": xt}, py2)
    return np.concatenate(xs), np.array(ys), xt, np.array(yt)


def _write_svhn(folder, n_train: int = 30, n_test: int = 15) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        rng = np.random.default_rng(seed)
        X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)     # (H, W, C, N) as distributed
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)       # labels 1..10; 10 means digit 0
        scipy.io.savemat(str(folder / f"{split}_32x32.mat"), {"X": X, "y": y})
        out[split] = (X, y)
    return out


@pytest.fixture()
def fashion_no_system(monkeypatch):
    """Fashion-MNIST reader that does not look in /usr/share (the system install)."""
    card = data._CARDS["fashion_mnist"]
    monkeypatch.setitem(data._CARDS, "fashion_mnist",
                        dataclasses.replace(card, reader=data._mnist_like_reader("FashionMNIST", None)))


# ----------------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    p = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(p, a)
    raw = p.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == compress
    header = (gzip.decompress(raw) if compress else raw)[:16]
    assert header == bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (5).to_bytes(4, "big")
    b = read_idx(p)
    assert b.dtype == np.uint8 and b.shape == (2, 3, 5)
    np.testing.assert_array_equal(a, b)


def test_idx_multibyte_dtype(tmp_path):
    p = tmp_path / "i4.idx"
    vals = np.array([[1, -2], [70000, 3]], dtype=">i4")
    p.write_bytes(bytes([0, 0, 0x0C, 2]) + (2).to_bytes(4, "big") * 2 + vals.tobytes())
    np.testing.assert_array_equal(read_idx(p), [[1, -2], [70000, 3]])


def test_idx_bad_magic(tmp_path):
    p = tmp_path / "bad-idx3-ubyte"
    write_idx(p, np.zeros((2, 4, 4), np.uint8))
    raw = bytearray(p.read_bytes())
    raw[2] = 0x42                                   # not an IDX type code
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(p)
    p.write_bytes(b"\x01\x02\x08\x03" + bytes(20))  # non-zero leading bytes
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(p)
    p.write_bytes(b"\x00\x00")                      # too short for a magic number
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(p)


@pytest.mark.parametrize("cut", ["data", "header"])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_truncated(tmp_path, cut, compress):
    p = tmp_path / "x-idx3-ubyte"
    write_idx(p, np.ones((3, 4, 4), np.uint8), compress=False)
    raw = p.read_bytes()
    raw = raw[:-5] if cut == "data" else raw[:10]   # header of a 3-d IDX file is 16 bytes
    p.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(ValueError, match=r"x-idx3-ubyte.*(truncated|header says)"):
        read_idx(p)


def test_idx_truncated_multibyte(tmp_path):
    p = tmp_path / "f4.idx"
    p.write_bytes(bytes([0, 0, 0x0D, 1]) + (4).to_bytes(4, "big") + np.ones(4, ">f4").tobytes()[:-3])
    with pytest.raises(ValueError, match="f4.idx"):
        read_idx(p)


def test_idx_truncated_gzip_stream(tmp_path):
    """An interrupted download: the gzip stream itself is cut short."""
    p = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(p, np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8))
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        read_idx(p)


def test_idx_extra_bytes_rejected(tmp_path):
    p = tmp_path / "x.idx"
    write_idx(p, np.ones((2, 2), np.uint8))
    p.write_bytes(p.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="header says"):
        read_idx(p)


# ---------------------------------------------------------------------------------- (Fashion-)MNIST
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name,tv_name", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_reader(tmp_path, fashion_no_system, name, tv_name, layout, compress):
    folder = tmp_path / tv_name / "raw" if layout == "torchvision" else tmp_path
    written = _write_mnist(folder, compress)
    card = data.get_card(name)
    for train, prefix in ((True, "train"), (False, "t10k")):
        x, y = card.reader(tmp_path, train, False)
        xw, yw = written[prefix]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (xw.shape[0], 1, 28, 28)
        assert y.dtype == torch.int64 and tuple(y.shape) == (xw.shape[0],)
        np.testing.assert_array_equal(x[:, 0].numpy(), xw)
        np.testing.assert_array_equal(y.numpy(), yw.astype(np.int64))


def test_mnist_torchvision_layout_preferred_over_flat(tmp_path):
    tv = _write_mnist(tmp_path / "MNIST" / "raw", compress=True, seed=10)
    _write_mnist(tmp_path, compress=False, n_train=7, n_test=3, seed=20)
    x, _ = data.get_card("mnist").reader(tmp_path, True, False)
    np.testing.assert_array_equal(x[:, 0].numpy(), tv["train"][0])


def test_fashion_system_dir_is_searched_first(tmp_path, monkeypatch):
    system = tmp_path / "system"
    sys_written = _write_mnist(system, compress=True, n_train=11, n_test=6, seed=5)
    _write_mnist(tmp_path / "root" / "FashionMNIST" / "raw", compress=False, seed=6)
    card = data._CARDS["fashion_mnist"]
    monkeypatch.setitem(data._CARDS, "fashion_mnist",
                        dataclasses.replace(card, reader=data._mnist_like_reader("FashionMNIST", system)))
    x, y = data.get_card("fashion_mnist").reader(tmp_path / "root", False, False)
    np.testing.assert_array_equal(x[:, 0].numpy(), sys_written["t10k"][0])
    np.testing.assert_array_equal(y.numpy(), sys_written["t10k"][1])


def test_mnist_image_label_count_mismatch(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    _write_mnist(folder, compress=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(N_TEST - 1, np.uint8))
    with pytest.raises(ValueError, match=f"{N_TEST} images.*{N_TEST - 1} labels"):
        data.get_card("mnist").reader(tmp_path, False, False)


# --------------------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("py2", [False, True], ids=["py3-protocol2", "py2-str"])
def test_cifar10_reader(tmp_path, py2):
    x_tr, y_tr, x_te, y_te = _write_cifar10(tmp_path, per_batch=8, n_test=12, py2=py2)
    card = data.get_card("cifar10")
    x, y = card.reader(tmp_path, True, False)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (40, 3, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == y_tr.tolist()
    # batch order data_batch_1..5 is kept, and rows are channel-major (R plane, G plane, B plane)
    np.testing.assert_array_equal(x.numpy().reshape(40, 3072), x_tr)
    np.testing.assert_array_equal(x[9, 1].numpy(), x_tr[9, 1024:2048].reshape(32, 32))
    xt, yt = card.reader(tmp_path, False, False)
    assert tuple(xt.shape) == (12, 3, 32, 32) and yt.tolist() == y_te.tolist()
    np.testing.assert_array_equal(xt.numpy().reshape(12, 3072), x_te)


def test_cifar_channel_layout(tmp_path):
    """An image whose red channel is constant and the others zero comes back red in channel 0."""
    base = tmp_path / "cifar-10-batches-py"
    red = np.zeros((2, 3072), np.uint8)
    red[0, :1024] = 200                          # image 0: red plane = 200
    red[1, 2048:] = np.arange(1024) % 256        # image 1: blue plane = a ramp along rows
    for i in range(1, 6):
        _dump_cifar(base / f"data_batch_{i}", {b"data": red, b"labels": [3, 4]})
    _dump_cifar(base / "test_batch", {b"data": red, b"labels": [3, 4]})
    x, y = data.get_card("cifar10").reader(tmp_path, False, False)
    assert tuple(x.shape) == (2, 3, 32, 32)
    assert (x[0, 0] == 200).all() and (x[0, 1:] == 0).all()
    assert (x[1, :2] == 0).all()
    assert x[1, 2, 0, 5].item() == 5 and x[1, 2, 1, 0].item() == 32   # row-major within the plane
    assert y.tolist() == [3, 4]


def test_cifar100_reader(tmp_path):
    base = tmp_path / "cifar-100-python"
    x_tr, x_te = _cifar_images(25, 1), _cifar_images(10, 2)
    fine_tr, fine_te = [int(v) for v in np.arange(25) * 4 % 100], [int(v) for v in np.arange(10) * 9 % 100]
    _dump_cifar(base / "train", {b"filenames": [b"a"] * 25, b"batch_label": b"training batch 1 of 1",
                                 b"fine_labels": fine_tr, b"coarse_labels": [v // 5 for v in fine_tr], b"data": x_tr})
    _dump_cifar(base / "test", {b"fine_labels": fine_te, b"coarse_labels": [v // 5 for v in fine_te], b"data": x_te})
    card = data.get_card("cifar100")
    x, y = card.reader(tmp_path, True, False)
    assert tuple(x.shape) == (25, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == fine_tr and max(fine_tr) > 19   # fine, not coarse
    np.testing.assert_array_equal(x.numpy().reshape(25, 3072), x_tr)
    xt, yt = card.reader(tmp_path, False, False)
    assert yt.tolist() == fine_te
    np.testing.assert_array_equal(xt.numpy().reshape(10, 3072), x_te)


class _EvalPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').write('pwned')",))


class _SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_EvalPayload, _SystemPayload])
def test_malicious_cifar_pickle_refused(tmp_path, payload):
    marker = tmp_path / "marker"
    base = tmp_path / "cifar-10-batches-py"
    good = {b"data": _cifar_images(2, 0), b"labels": [0, 1]}
    for i in range(1, 6):
        _dump_cifar(base / f"data_batch_{i}", good)
    evil = {b"data": _cifar_images(2, 0), b"labels": [0, 1], b"x": payload(marker)}
    _dump_cifar(base / "test_batch", evil)
    # the payload is live: a plain unpickler would run it (checked on a copy in another folder)
    control = tmp_path / "control"
    control.mkdir()
    pickle.loads(pickle.dumps(payload(control / "m"), protocol=2))
    assert (control / "m").exists()

    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        data.get_card("cifar10").reader(tmp_path, False, False)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        data.load_splits("cifar10", tmp_path, n_val=2, n_eval=1)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- SVHN
@pytest.mark.parametrize("sub", ["svhn", ""])
def test_svhn_reader(tmp_path, sub):
    written = _write_svhn(tmp_path / sub if sub else tmp_path)
    card = data.get_card("svhn")
    for train, split in ((True, "train"), (False, "test")):
        x, y = card.reader(tmp_path, train, False)
        X, yw = written[split]
        n = X.shape[3]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (n, 3, 32, 32)
        assert y.dtype == torch.int64 and tuple(y.shape) == (n,)
        # layout: x[n, c, h, w] == X[h, w, c, n]
        np.testing.assert_array_equal(x.numpy(), X.transpose(3, 2, 0, 1))
        assert x[1, 2, 3, 4].item() == X[3, 4, 2, 1]
        expected = yw.reshape(-1).astype(np.int64)
        expected[expected == 10] = 0
        assert y.tolist() == expected.tolist()
        assert 10 not in y.tolist() and y.min().item() == 0 and y.max().item() == 9
        assert y[9].item() == 0 and y[0].item() == 1            # written labels 10 and 1


# ---------------------------------------------------------------------------------------- not found
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"])
def test_missing_dataset_hint(tmp_path, fashion_no_system, name):
    with pytest.raises(DataNotFoundError) as ei:
        data.load_splits(name, tmp_path / "empty", download=False, n_val=1, n_eval=1)
    msg = str(ei.value)
    assert "data.root" in msg and "data.download" in msg
    assert isinstance(ei.value, FileNotFoundError)


def test_missing_fashion_mentions_system_package(tmp_path, monkeypatch):
    card = data._CARDS["fashion_mnist"]
    monkeypatch.setitem(data._CARDS, "fashion_mnist", dataclasses.replace(
        card, reader=data._mnist_like_reader("FashionMNIST", tmp_path / "no-system")))
    with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist"):
        data.get_card("fashion_mnist").reader(tmp_path, True, False)


def test_missing_only_test_split(tmp_path):
    _write_mnist(tmp_path / "MNIST" / "raw", compress=False)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError, match=r"MNIST \(test\)"):
        data.load_splits("mnist", tmp_path, n_val=1, n_eval=1)


# --------------------------------------------------------------------------------------- load_splits
@pytest.fixture()
def mnist_root(tmp_path):
    _write_mnist(tmp_path / "MNIST" / "raw", compress=True)
    return tmp_path


def test_load_splits_shapes_and_split(mnist_root):
    s = data.load_splits("mnist", mnist_root, n_val=10, n_eval=8, split_seed=3)
    assert s.card.name == "mnist"
    assert tuple(s.x_train.shape) == (N_TRAIN - 10, 1, 28, 28) and tuple(s.x_val.shape) == (10, 1, 28, 28)
    assert tuple(s.x_test.shape) == (N_TEST, 1, 28, 28) and tuple(s.x_eval.shape) == (8, 1, 28, 28)
    for t in (s.x_train, s.x_val, s.x_test, s.x_eval):
        assert t.dtype == torch.uint8
    for t in (s.y_train, s.y_val, s.y_test, s.y_eval):
        assert t.dtype == torch.int64
    assert s.y_train.shape[0] == N_TRAIN - 10 and s.y_val.shape[0] == 10 and s.y_eval.shape[0] == 8
    # validation indices: n_val distinct indices, sorted, disjoint from the training points
    x_all, y_all = data.get_card("mnist").reader(mnist_root, True, False)
    val = s.val_indices.tolist()
    assert len(set(val)) == 10 and val == sorted(val)
    torch.testing.assert_close(s.x_val, x_all[s.val_indices])
    torch.testing.assert_close(s.y_val, y_all[s.val_indices])
    train_rows = {bytes(r.numpy().tobytes()) for r in s.x_train}   # random 28x28 images are unique
    val_rows = {bytes(r.numpy().tobytes()) for r in s.x_val}
    assert len(train_rows) == N_TRAIN - 10 and not (train_rows & val_rows)
    assert len(train_rows | val_rows) == N_TRAIN
    # eval subset: sorted distinct indices into the test set
    ev = s.eval_indices.tolist()
    assert len(set(ev)) == 8 and ev == sorted(ev) and 0 <= ev[0] and ev[-1] < N_TEST
    torch.testing.assert_close(s.x_eval, s.x_test[s.eval_indices])
    torch.testing.assert_close(s.y_eval, s.y_test[s.eval_indices])


def test_load_splits_seeded(mnist_root):
    a = data.load_splits("mnist", mnist_root, n_val=10, n_eval=8, split_seed=0)
    b = data.load_splits("mnist", str(mnist_root), n_val=10, n_eval=8, split_seed=0)
    c = data.load_splits("mnist", mnist_root, n_val=10, n_eval=8, split_seed=1)
    assert a.val_indices.tolist() == b.val_indices.tolist()
    assert a.eval_indices.tolist() == b.eval_indices.tolist()
    assert torch.equal(a.x_train, b.x_train)
    assert a.val_indices.tolist() != c.val_indices.tolist()
    assert a.eval_indices.tolist() != c.eval_indices.tolist()


def test_load_splits_no_val_full_eval(mnist_root):
    s = data.load_splits("mnist", mnist_root, n_val=0, n_eval=N_TEST)
    assert s.x_val.shape[0] == 0 and s.x_train.shape[0] == N_TRAIN
    assert s.eval_indices.tolist() == list(range(N_TEST))


@pytest.mark.parametrize("n_eval", [N_TEST + 1, 0])
def test_load_splits_bad_n_eval(mnist_root, n_eval):
    with pytest.raises(ConfigError) as ei:
        data.load_splits("mnist", mnist_root, n_val=5, n_eval=n_eval)
    assert ei.value.key == "data.n_eval" and ei.value.value == n_eval
    assert "'data.n_eval'" in str(ei.value) and str(N_TEST) in str(ei.value)


@pytest.mark.parametrize("n_val", [N_TRAIN, -1])
def test_load_splits_bad_n_val(mnist_root, n_val):
    with pytest.raises(ConfigError, match="'data.n_val'"):
        data.load_splits("mnist", mnist_root, n_val=n_val, n_eval=5)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ConfigError) as ei:
        data.load_splits("imagenet", tmp_path)
    msg = str(ei.value)
    assert ei.value.key == "data.name" and "'data.name'" in msg and "'imagenet'" in msg
    for name in ("cifar10", "cifar100", "fashion_mnist", "mnist", "svhn"):
        assert repr(name) in msg
    assert data.available() == ["cifar10", "cifar100", "fashion_mnist", "mnist", "svhn"]


def test_load_splits_cifar10_and_svhn(tmp_path):
    _write_cifar10(tmp_path, per_batch=4, n_test=6)
    s = data.load_splits("cifar10", tmp_path, n_val=5, n_eval=6)
    assert tuple(s.x_train.shape) == (15, 3, 32, 32) and tuple(s.x_eval.shape) == (6, 3, 32, 32)
    _write_svhn(tmp_path / "svhn", n_train=12, n_test=7)
    s = data.load_splits("svhn", tmp_path, n_val=2, n_eval=7)
    assert tuple(s.x_train.shape) == (10, 3, 32, 32) and s.y_eval.dtype == torch.int64


# ------------------------------------------------------------------------------ to_float / augment
def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    torch.testing.assert_close(data.to_float(x), torch.tensor([0.0, 0.2, 1.0]))


@pytest.mark.parametrize("name", ["cifar10", "mnist", "fashion_mnist"])
def test_augment(name):
    card = data.get_card(name)
    c, (h, w) = card.channels, card.image_size
    x = torch.rand(16, c, h, w, generator=torch.Generator().manual_seed(0))
    a1 = data.augment(x, card, torch.Generator().manual_seed(7))
    a2 = data.augment(x, card, torch.Generator().manual_seed(7))
    a3 = data.augment(x, card, torch.Generator().manual_seed(8))
    assert a1.shape == x.shape and a1.dtype == x.dtype
    assert a1.min() >= 0 and a1.max() <= 1
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    assert not torch.equal(a1, x)


def test_augment_is_crop_and_flip():
    """Every augmented image is a shifted (and for hflip cards possibly mirrored) window of the padded image."""
    card = data.get_card("cifar10")
    p = card.crop_pad
    x = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(1)) + 1.0   # no zeros inside
    a = data.augment(x, card, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    flipped_any = False
    for i in range(12):
        hits = [(oy, ox, fl) for oy in range(2 * p + 1) for ox in range(2 * p + 1) for fl in (False, True)
                if torch.equal(a[i], (lambda w: w.flip(2) if fl else w)(padded[i, :, oy:oy + 32, ox:ox + 32]))]
        assert hits, f"image {i} is not a crop of the padded image"
        flipped_any |= any(fl for _, _, fl in hits)
    assert flipped_any
    # mnist: no horizontal flip
    m = data.get_card("mnist")
    xm = torch.arange(28.0).view(1, 1, 1, 28).expand(8, 1, 28, 28).contiguous() + 1
    am = data.augment(xm, m, torch.Generator().manual_seed(0))
    for i in range(8):
        row = am[i, 0, 14]
        nz = row[row > 0]
        assert torch.all(nz[1:] > nz[:-1]), "mnist image was mirrored"


def test_augment_uint8():
    card = data.get_card("svhn")
    x = torch.randint(1, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = data.augment(x, card, torch.Generator().manual_seed(0))
    assert a.dtype == torch.uint8 and a.shape == x.shape


# ------------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("n,sizes", [(23, [5, 5, 5, 5, 3]), (21, [5, 5, 5, 5, 1]), (20, [5, 5, 5, 5])])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_each_index_once(shuffle, n, sizes):
    x = torch.arange(n).view(n, 1).float()
    y = torch.arange(n)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):   # two epochs
        seen, batch_sizes = [], []
        for xb, yb in data.batches(x, y, 5, shuffle=shuffle, generator=g):
            assert torch.equal(xb[:, 0].long(), yb)
            seen.extend(yb.tolist())
            batch_sizes.append(len(yb))
        assert sorted(seen) == list(range(n))
        assert len(seen) == n and batch_sizes == sizes
        assert (seen == list(range(n))) == (not shuffle)


def test_batches_shuffle_seeded():
    x, y = torch.zeros(30, 1), torch.arange(30)
    o1 = [yb.tolist() for _, yb in data.batches(x, y, 7, True, torch.Generator().manual_seed(3))]
    o2 = [yb.tolist() for _, yb in data.batches(x, y, 7, True, torch.Generator().manual_seed(3))]
    assert o1 == o2
