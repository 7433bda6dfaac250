"""Measured neural data (``file``, source_kind ``neural``): one region per ``.npz`` file, validated on load.

The format (also in ``docs/neural_guidance.md``)::

    responses  float, (n_images, n_units) or (n_images, n_repeats, n_units); finite (no NaN / inf)
    image_ids  int, (n_images,): unique indices into the configured dataset's original training set
               (the order of its files, before the validation split)            -- or, instead --
    images     uint8 in [0, 255] or float in [0, 1], (n_images, C, H, W), or (n_images, H, W) for one
               channel; the dataset's channels and image size
    region     str, optional (e.g. "V1"); labels the results

A fraction of the images (``holdout_fraction``) is held out from z-score, PCA and predictor; it measures the
predictor (mean per-image Pearson r, the authors' measure) and serves as the held-out set of the RSA.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustbench_lab.core import data as data_mod
from robustbench_lab.core.cache import sha256_file
from robustbench_lab.core.errors import ConfigError, check_number

from .pipeline import average_repeats
from .target import TargetSource

log = logging.getLogger(__name__)


@dataclasses.dataclass
class NeuralData:
    """A validated neural data file: averaged ``responses`` (n, U) float64 and the images' identity."""

    path: str
    sha256: str
    responses: np.ndarray
    n_repeats: int
    region: str
    image_ids: np.ndarray | None
    images: np.ndarray | None


def _file_error(key: str, path: Path, npz_key: str, expected: str, found: str) -> ConfigError:
    return ConfigError(key, str(path), expected, f"{path}: key '{npz_key}': expected {expected}; found {found}")


def load_neural_file(path: str | Path, key: str = "defense.neural_target.path") -> NeuralData:
    """Load and validate a neural data ``.npz`` (format in the module docstring); errors name the file, the
    key in it and what was expected. Never unpickles (``allow_pickle=False``)."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(key, str(path), "an existing .npz file of neural responses (docs/neural_guidance.md)")
    try:
        npz = np.load(p, allow_pickle=False)
    except Exception as e:   # not a zip/npy file, truncated
        raise ConfigError(key, str(path), "a NumPy .npz file (numpy.savez)", f"{p} could not be read: {e}") from e
    if not hasattr(npz, "files"):
        raise ConfigError(key, str(path), "a NumPy .npz archive (numpy.savez), not a single .npy array")

    def get(name: str) -> np.ndarray | None:
        if name not in npz.files:
            return None
        try:
            return npz[name]
        except ValueError as e:   # object arrays need pickle: refused
            raise _file_error(key, p, name, "a numeric array (no Python objects)",
                              f"an array that needs pickle ({e})") from e

    with npz:
        responses = get("responses")
        ids, images, region = get("image_ids"), get("images"), get("region")
        extra = sorted(set(npz.files) - {"responses", "image_ids", "images", "region"})
    if extra:
        log.warning("%s: ignoring unknown keys %s", p, extra)
    if responses is None:
        raise _file_error(key, p, "responses", "float array (n_images, n_units) or (n_images, n_repeats, n_units)",
                          f"no such key (keys: {sorted(npz.files)})")
    if responses.dtype.kind not in "fiu" or responses.ndim not in (2, 3) or 0 in responses.shape:
        raise _file_error(key, p, "responses", "a non-empty numeric array of shape (n_images, n_units) or "
                          "(n_images, n_repeats, n_units)", f"dtype {responses.dtype}, shape {responses.shape}")
    bad = ~np.isfinite(responses)
    if bad.any():
        first = np.argwhere(bad)[0].tolist()
        raise _file_error(key, p, "responses", "finite values (no NaN or inf; drop or impute missing repeats)",
                          f"{int(bad.sum())} non-finite values, the first at index {first}")
    n = responses.shape[0]
    if n < 10:
        raise _file_error(key, p, "responses", "at least 10 images (z-score, PCA and a held-out set)", f"{n} images")
    if (ids is None) == (images is None):
        raise _file_error(key, p, "image_ids" if ids is None else "images",
                          "exactly one of 'image_ids' (indices into the dataset's training set) or 'images' "
                          "(the stimuli)", "neither" if ids is None else "both")
    if ids is not None:
        if ids.dtype.kind not in "iu" or ids.shape != (n,):
            raise _file_error(key, p, "image_ids", f"integer array of shape ({n},) (one id per response row)",
                              f"dtype {ids.dtype}, shape {ids.shape}")
        if (ids < 0).any():
            raise _file_error(key, p, "image_ids", "indices >= 0 into the training set", f"min {int(ids.min())}")
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise _file_error(key, p, "image_ids", "unique ids (average repeats into one row, or give a repeats "
                              "axis in 'responses')",
                              f"id {int(uniq[counts > 1][0])} appears {int(counts.max())} times")
        ids = ids.astype(np.int64)
    if images is not None:
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4 or images.shape[0] != n or images.dtype.kind not in "fiu":
            raise _file_error(key, p, "images", f"numeric array (n_images={n}, C, H, W) or ({n}, H, W)",
                              f"dtype {images.dtype}, shape {images.shape}")
        if images.dtype.kind == "f":
            if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
                raise _file_error(key, p, "images", "float values in [0, 1] (or uint8 in [0, 255])",
                                  f"range [{np.nanmin(images):.3g}, {np.nanmax(images):.3g}] or non-finite values")
        elif images.min() < 0 or images.max() > 255:
            raise _file_error(key, p, "images", "integer values in [0, 255]", f"range [{images.min()}, {images.max()}]")
    reg = "unnamed"
    if region is not None:
        if region.dtype.kind not in "US" or region.size != 1:
            raise _file_error(key, p, "region", "a single string (e.g. 'V1')",
                              f"dtype {region.dtype}, shape {region.shape}")
        reg = str(region.reshape(()).item())
        reg = reg.decode() if isinstance(reg, bytes) else reg
    return NeuralData(str(p), sha256_file(p), average_repeats(responses.astype(np.float64)),
                      int(responses.shape[1]) if responses.ndim == 3 else 1, reg, ids, images)


def full_training_set(splits: data_mod.Splits) -> torch.Tensor:
    """The dataset's original training images in file order (re-joining the training and validation splits)."""
    n = splits.x_train.shape[0] + splits.x_val.shape[0]
    full = torch.empty((n, *splits.x_train.shape[1:]), dtype=splits.x_train.dtype)
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[splits.val_indices] = True
    full[is_val] = splits.x_val
    full[~is_val] = splits.x_train
    return full


class FileTarget(TargetSource):
    """Measured responses of one region from a ``.npz`` file (format: module docstring). ``source_kind`` is
    ``neural``. ``region`` (optional) must match the file's region when both are given."""

    kind = "file"
    source_kind = "neural"
    supports_direct = False

    def __init__(self, *, path: str | None = None, region: str | None = None, holdout_fraction: float = 0.1,
                 **kw: Any) -> None:
        super().__init__(**kw)
        if not path:
            raise ConfigError(f"{self.key}.path", path, "the path of a .npz file of neural responses "
                              "(docs/neural_guidance.md: responses, image_ids or images, region)")
        self.data = load_neural_file(path, key=f"{self.key}.path")
        if region is not None and str(region) != self.data.region:
            raise ConfigError(f"{self.key}.region", region, [self.data.region],
                              f"the region stored in {self.data.path}")
        self.holdout_fraction = float(check_number(f"{self.key}.holdout_fraction", holdout_fraction, low=0, high=1,
                                                   high_open=True))

    @property
    def label(self) -> str:
        return f"{self.data.region} (measured)"

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "file_sha256": self.data.sha256, "region": self.data.region,
                "holdout_fraction": self.holdout_fraction}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.data.path, "region": self.data.region,
                "n_images": int(self.data.responses.shape[0]), "n_units": int(self.data.responses.shape[1]),
                "n_repeats": self.data.n_repeats}

    def images(self, splits: data_mod.Splits) -> torch.Tensor:
        """The file's images as the dataset stores them (uint8 or float), checked against the dataset."""
        d, card, key = self.data, splits.card, f"{self.key}.path"
        if d.image_ids is not None:
            full = full_training_set(splits)
            out = d.image_ids[d.image_ids >= full.shape[0]]
            if out.size:
                raise _file_error(key, Path(d.path), "image_ids", f"ids of images in the {card.name} training set, "
                                  f"in [0, {full.shape[0] - 1}]", f"{out.size} ids out of range, e.g. {int(out[0])}")
            return full[torch.from_numpy(d.image_ids)]
        imgs = d.images
        assert imgs is not None
        expected = (card.channels, *card.image_size)
        if tuple(imgs.shape[1:]) != expected:
            raise _file_error(key, Path(d.path), "images", f"images of shape (C, H, W) = {expected} ({card.name})",
                              f"{tuple(imgs.shape[1:])}")
        return torch.from_numpy(imgs.astype(np.uint8) if imgs.dtype.kind in "iu" else imgs.astype(np.float32))

    def fit_data(self, splits: data_mod.Splits, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
        images = self.images(splits)
        n = images.shape[0]
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=g)
        n_held = int(round(self.holdout_fraction * n))
        held, fit = perm[:n_held].sort().values, perm[n_held:].sort().values
        r = torch.from_numpy(self.data.responses)
        return images[fit], r[fit], ((images[held], r[held].numpy()) if n_held else None)
