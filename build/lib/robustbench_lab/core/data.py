"""Datasets as in-memory uint8 tensors, with a held-out validation split and a recorded evaluation subset.

Every loader returns images as uint8 (N, C, H, W) and labels as int64 (N,). Images become float in [0, 1]
only per batch. Readers parse the datasets' own on-disk formats (IDX for (Fashion-)MNIST, the pickled
batches of CIFAR, the .mat files of SVHN); downloading is delegated to torchvision's download helpers and
happens only when ``data.download=true``.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from robustbench_lab.core.errors import ConfigError, DataNotFoundError

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclasses.dataclass(frozen=True)
class DataCard:
    name: str
    channels: int
    image_size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    reader: Callable[[Path, bool, bool], tuple[torch.Tensor, torch.Tensor]]
    hflip: bool = True       # horizontal flip is label-preserving for this data
    crop_pad: int = 2        # random-crop padding used by the default augmentation
    sizes: tuple[int, int] | None = None   # (train, test) points of the standard release
    class_names: tuple[str, ...] | None = None   # labels for figures (None: the class index)
    # A reader may also have ``count(root, train) -> int | None``: the points the files on disk hold, read
    # from a header without loading the data (None: not found; then ``sizes`` is used).


@dataclasses.dataclass
class Splits:
    """Train / validation / test tensors and the evaluation subset of the test set."""

    card: DataCard
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    val_indices: torch.Tensor     # indices into the original training set
    eval_indices: torch.Tensor    # indices into the test set

    @property
    def x_eval(self) -> torch.Tensor:
        return self.x_test[self.eval_indices]

    @property
    def y_eval(self) -> torch.Tensor:
        return self.y_test[self.eval_indices]


# ------------------------------------------------------------------------------------------------ IDX
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), the format of MNIST and Fashion-MNIST."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(f"{path} is a truncated or corrupted gzip file: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(f"{path} is truncated: its IDX header needs {offset} bytes but the file has {len(raw)}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) - offset != int(np.prod(dims)) * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} values of {dtype.itemsize} bytes) but "
                         f"holds {len(raw) - offset} bytes of data (truncated or corrupted)")
    data = np.frombuffer(raw, dtype=dtype, offset=offset)
    return data.reshape(dims)


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write an IDX file (uint8 only); used by tests and tools to make real-format files."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    if compress if compress is not None else str(path).endswith(".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / (stem + ".gz")):
        if cand.is_file():
            return cand
    return None


def _mnist_like_from(folders: list[Path], train: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    prefix = "train" if train else "t10k"
    for folder in folders:
        img = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        lab = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if img is not None and lab is not None:
            x = torch.from_numpy(read_idx(img).copy()).unsqueeze(1)
            y = torch.from_numpy(read_idx(lab).astype(np.int64))
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{img} holds {x.shape[0]} images but {lab} holds {y.shape[0]} labels")
            return x, y
    return None


def _idx_count(path: Path) -> int | None:
    """First dimension of an IDX file from its 8-byte header (None if unreadable; the full read reports why)."""
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            head = f.read(8)
    except (OSError, EOFError, zlib.error):
        return None
    if len(head) < 8 or head[0] != 0 or head[1] != 0 or head[3] < 1:
        return None
    return int.from_bytes(head[4:8], "big")


class _MnistLikeReader:
    """Reads (Fashion-)MNIST IDX files from ``system_dir`` (if any), else from torchvision's layout under the
    root, else the root itself; ``count`` reads only the label file's header, to check sizes up front."""

    def __init__(self, tv_name: str, system_dir: Path | None) -> None:
        self.tv_name, self.system_dir = tv_name, system_dir

    def folders(self, root: Path) -> list[Path]:
        return ([self.system_dir] if self.system_dir is not None else []) + [
            root / self.tv_name / "raw", root / self.tv_name, root]

    def count(self, root: Path, train: bool) -> int | None:
        prefix = "train" if train else "t10k"
        for folder in self.folders(root):          # the folder __call__ would read
            img = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
            lab = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
            if img is not None and lab is not None:
                return _idx_count(lab)
        return None

    def __call__(self, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tv_name, system_dir = self.tv_name, self.system_dir
        folders = self.folders(root)
        found = _mnist_like_from(folders, train)
        if found is None and download:
            import torchvision.datasets as tvd
            getattr(tvd, tv_name)(str(root), train=train, download=True)
            found = _mnist_like_from(folders, train)
        if found is None:
            hint = (f"Looked in {', '.join(str(f) for f in folders)}. Set data.root to a folder holding the IDX "
                    f"files, or data.download=true to download with torchvision")
            if system_dir is not None:
                hint += f", or install the Debian package dataset-fashion-mnist (files in {system_dir})"
            raise DataNotFoundError(f"{tv_name} ({'train' if train else 'test'}) not found. {hint}.")
        return found


def _mnist_like_reader(tv_name: str, system_dir: Path | None) -> _MnistLikeReader:
    return _MnistLikeReader(tv_name, system_dir)


# ---------------------------------------------------------------------------------------------- CIFAR
class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: only numpy array reconstruction and builtins containers are allowed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _load_cifar_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        d = _SafeUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_reader(folder: str, train_files: list[str], test_files: list[str], label_key: str,
                  tv_name: str) -> Callable[[Path, bool, bool], tuple]:
    def read(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        base = root / folder
        files = train_files if train else test_files
        if not all((base / f).is_file() for f in files) and download:
            import torchvision.datasets as tvd
            getattr(tvd, tv_name)(str(root), train=train, download=True)
        missing = [f for f in files if not (base / f).is_file()]
        if missing:
            raise DataNotFoundError(f"{tv_name} files {missing} not found in {base}. Set data.root to the folder "
                                    f"that contains '{folder}', or data.download=true to download with torchvision.")
        xs, ys = [], []
        for f in files:
            d = _load_cifar_batch(base / f)
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    return read


# ----------------------------------------------------------------------------------------------- SVHN
def _svhn_read(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fname = "train_32x32.mat" if train else "test_32x32.mat"
    path = root / "svhn" / fname
    if not path.is_file() and (root / fname).is_file():
        path = root / fname
    if not path.is_file() and download:
        import torchvision.datasets as tvd
        tvd.SVHN(str(root / "svhn"), split="train" if train else "test", download=True)
    if not path.is_file():
        raise DataNotFoundError(f"SVHN file {fname} not found in {root / 'svhn'} or {root}. Set data.root, or "
                                f"data.download=true to download with torchvision.")
    import scipy.io
    mat = scipy.io.loadmat(str(path))
    x = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)   # (H, W, C, N) -> (N, C, H, W)
    y = mat["y"].astype(np.int64).reshape(-1)
    y[y == 10] = 0                                                 # SVHN stores digit 0 as label 10
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


_CARDS: dict[str, DataCard] = {}


def _reg(card: DataCard) -> None:
    if card.name in _CARDS:
        raise ValueError(f"dataset {card.name!r} registered twice")
    _CARDS[card.name] = card


_reg(DataCard("fashion_mnist", 1, (28, 28), 10, (0.2860,), (0.3530,),
              _mnist_like_reader("FashionMNIST", SYSTEM_FASHION_MNIST), hflip=True, crop_pad=2,
              sizes=(60000, 10000), class_names=("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                                 "Shirt", "Sneaker", "Bag", "Boot")))
_reg(DataCard("mnist", 1, (28, 28), 10, (0.1307,), (0.3081,), _mnist_like_reader("MNIST", None),
              hflip=False, crop_pad=2, sizes=(60000, 10000)))
_reg(DataCard("cifar10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
              _cifar_reader("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                            "labels", "CIFAR10"), crop_pad=4, sizes=(50000, 10000),
              class_names=("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")))
_reg(DataCard("cifar100", 3, (32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
              _cifar_reader("cifar-100-python", ["train"], ["test"], "fine_labels", "CIFAR100"), crop_pad=4,
              sizes=(50000, 10000)))
_reg(DataCard("svhn", 3, (32, 32), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), _svhn_read,
              hflip=False, crop_pad=4, sizes=(73257, 26032)))


def get_card(name: str) -> DataCard:
    if name not in _CARDS:
        raise ConfigError("data.name", name, sorted(_CARDS))
    return _CARDS[name]


def available() -> list[str]:
    return sorted(_CARDS)


def split_sizes(card: DataCard, root: str | os.PathLike) -> tuple[int | None, int | None]:
    """(train, test) sizes known without loading the data: from the files' headers where the format has
    one (IDX), else those of the standard release; None where neither is known."""
    root = Path(root).expanduser()
    out = []
    for i, train in enumerate((True, False)):
        count = getattr(card.reader, "count", None)
        n = count(root, train) if count is not None else None
        out.append(n if n is not None else (card.sizes[i] if card.sizes is not None else None))
    return out[0], out[1]


def check_split_args(name: str, root: str | os.PathLike, n_val: int, n_eval: int, split_seed: int) -> DataCard:
    """Validate the split arguments before any data is read (``load_splits`` re-checks against the data)."""
    card = get_card(name)
    for key, v, lo in (("n_val", n_val, 0), ("n_eval", n_eval, 1), ("split_seed", split_seed, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"data.{key}", v, f"an integer >= {lo}")
    if split_seed < 0:
        raise ConfigError("data.split_seed", split_seed, "an integer >= 0")
    n_train, n_test = split_sizes(card, root)
    if n_val < 0 or (n_train is not None and n_val >= n_train):
        raise ConfigError("data.n_val", n_val, f"0 <= n_val < {n_train} (training set size)" if n_train is not None
                          else "an integer >= 0")
    if n_eval <= 0 or (n_test is not None and n_eval > n_test):
        raise ConfigError("data.n_eval", n_eval, f"1 <= n_eval <= {n_test} (test set size of {name})"
                          if n_test is not None else "an integer >= 1")
    return card


def load_splits(name: str, root: str | os.PathLike, download: bool = False, n_val: int = 5000,
                n_eval: int = 1000, split_seed: int = 0) -> Splits:
    """Load a dataset and cut it into train / validation / test, plus the evaluation subset.

    The validation split (``n_val`` points of the training set) and the evaluation subset (``n_eval``
    points of the test set) are drawn with ``split_seed`` alone, so every run of a sweep, whatever its
    ``seed``, evaluates the same points. ``n_eval`` larger than the test set is an error, raised before
    the data is loaded (sizes from the file headers or the standard release; re-checked on the data).
    """
    card = check_split_args(name, root, n_val, n_eval, split_seed)
    root = Path(root).expanduser()
    x_tr, y_tr = card.reader(root, True, download)
    x_te, y_te = card.reader(root, False, download)
    if n_val < 0 or n_val >= x_tr.shape[0]:
        raise ConfigError("data.n_val", n_val, f"0 <= n_val < {x_tr.shape[0]} (training set size)")
    if n_eval <= 0 or n_eval > x_te.shape[0]:
        raise ConfigError("data.n_eval", n_eval, f"1 <= n_eval <= {x_te.shape[0]} (test set size of {name})")
    g = torch.Generator().manual_seed(int(split_seed))
    perm = torch.randperm(x_tr.shape[0], generator=g)
    val_idx, tr_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    eval_idx = torch.randperm(x_te.shape[0], generator=g)[:n_eval].sort().values
    return Splits(card, x_tr[tr_idx], y_tr[tr_idx], x_tr[val_idx], y_tr[val_idx], x_te, y_te, val_idx, eval_idx)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def augment(x: torch.Tensor, card: DataCard, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``card.crop_pad``) and, where label-preserving, horizontal flip."""
    b, _, h, w = x.shape
    p = card.crop_pad
    if p > 0:
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        ox = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        oy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        rows = (oy.view(b, 1) + torch.arange(h).view(1, h))            # (b, h)
        cols = (ox.view(b, 1) + torch.arange(w).view(1, w))            # (b, w)
        x = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(x.shape[1]).view(1, -1, 1, 1),
                   rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
    if card.hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    return x


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def _main(argv: list[str] | None = None) -> int:
    """``python -m robustbench_lab.core.data download <name> <root>``: fetch a dataset with torchvision."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "download":
        print("usage: python -m robustbench_lab.core.data download <name> <root>", file=sys.stderr)
        return 2
    card = get_card(args[1])
    root = Path(args[2])
    for train in (True, False):
        x, _ = card.reader(root, train, True)
        print(f"{card.name} {'train' if train else 'test'}: {x.shape[0]} images in {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
