"""Content-addressed checkpoint cache, stored safely.

A checkpoint's key is a hash of everything that determines it (model card and options, dataset and split,
training recipe, training-time defense, seed). Weights are stored as safetensors (tensors only: loading
never unpickles anything), with a JSON sidecar holding the spec and the SHA-256 of the weight file; a file
whose hash does not match is reported and rebuilt, never used. Writes are atomic (temporary file +
``os.replace``) and training of one key is serialized by a file lock, so parallel jobs share checkpoints
without corrupting them.

The package ships a few checkpoints (``BUNDLED_DIR``, e.g. the default ResNet-20 on Fashion-MNIST) in the
same format. A cache whose own directory lacks an entry takes it from there, after the same checks, and
copies it in, so a cold start on the default model is exactly a cache hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "weights"   # checkpoints shipped with the package


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:20]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit the model it is loaded into."""


def save_weights(module: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> str:
    """Save ``module``'s state dict as safetensors, atomically. Returns the file's SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=metadata)
        digest = sha256_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return digest


WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict")   # where training scripts nest the weights


def read_state_dict(path: Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a torch file loaded weights-only (never arbitrary
    pickled objects), unwrapped from the usual ``state_dict`` / ``model`` / ``net`` nesting."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError (bad header, truncated file), OSError
            raise CheckpointMismatchError(f"{what} {path} is not a readable safetensors file "
                                          f"(truncated or corrupted?): {e}") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary objects
        raise CheckpointMismatchError(f"{what} {path} could not be loaded safely (weights only): {e}") from e
    while isinstance(sd, dict) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in WRAPPER_KEYS if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointMismatchError(f"{what} {path} is not a state dict (a mapping of names to tensors, "
                                      f"possibly under one of the keys {list(WRAPPER_KEYS)})")
    return sd


def _fit_names(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the tensors of ``sd`` to the module's names where the file differs only by a wrapper:
    DataParallel's ``module.`` prefix, or a bare network saved without the harness's ``net.`` prefix (the
    wrapper's normalization buffers then keep their values)."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if set(sd) == set(own):
        return sd
    net_keys = {k[len("net."):] for k in own if k.startswith("net.")}
    if net_keys and set(sd) == net_keys:
        return {**{k: v for k, v in own.items() if not k.startswith("net.")}, **{f"net.{k}": v for k, v in sd.items()}}
    return sd


def load_weights(module: nn.Module, path: Path, what: str = "checkpoint") -> None:
    """Load weights into ``module`` strictly (every name and shape must match, after unwrapping the common
    wrappers); a mismatch names the first missing and unexpected keys and ``what`` (the config key)."""
    path = Path(path)
    own = module.state_dict()
    sd = _fit_names(read_state_dict(path, what), own)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shapes:
        raise CheckpointMismatchError(
            f"{what} {path} does not match the model: missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]}, shape mismatches {bad_shapes[:5]}")
    module.load_state_dict(sd, strict=True)


class CheckpointCache:
    """``<dir>/<key>.safetensors`` + ``<dir>/<key>.json`` (spec, sha256, extra info such as accuracy)."""

    def __init__(self, directory: str | os.PathLike, bundled: str | os.PathLike | None = BUNDLED_DIR) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bundled = Path(bundled) if bundled is not None else None

    def weights_path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def meta_path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        with FileLock(str(self.dir / f"{key}.lock")):
            yield

    def meta(self, key: str) -> dict[str, Any] | None:
        p = self.meta_path(key)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None

    def load(self, key: str, module: nn.Module, spec: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Load entry ``key`` into ``module``; None when absent or corrupted (a corrupted entry is removed).

        Corrupted: the weight file's SHA-256 is not the one its sidecar recorded, or the sidecar describes
        another entry (its ``key``, or, when ``spec`` is given, its spec, differs). ``module`` is only
        written once the entry has passed these checks.
        """
        meta, wp = self.meta(key), self.weights_path(key)
        if (meta is None or not wp.is_file()) and self._adopt_bundled(key):
            meta, wp = self.meta(key), self.weights_path(key)
        if meta is None or not wp.is_file():
            return None
        problem = None
        if meta.get("key") != key:
            problem = f"its sidecar belongs to entry {meta.get('key')!r}"
        elif spec is not None and canonical_json(meta.get("spec")) != canonical_json(spec):
            problem = "its sidecar's spec is not the spec this key stands for"
        else:
            digest = sha256_file(wp)
            if digest != meta.get("sha256"):
                problem = f"sha256 {digest[:12]}, expected {str(meta.get('sha256'))[:12]}"
        if problem is not None:
            log.warning("checkpoint cache entry %s is corrupted (%s); rebuilding it", wp, problem)
            self.remove(key)
            return None
        load_weights(module, wp, what=f"cached checkpoint {key}")
        return meta

    def _adopt_bundled(self, key: str) -> bool:
        """Copy the shipped entry ``key`` (if there is one and its weights match its recorded SHA-256) into
        this cache; ``load`` then checks it as any entry. True when copied."""
        if self.bundled is None or self.bundled.resolve() == self.dir.resolve():
            return False
        src_w, src_m = self.bundled / f"{key}.safetensors", self.bundled / f"{key}.json"
        if not (src_w.is_file() and src_m.is_file()):
            return False
        meta = json.loads(src_m.read_text())
        if meta.get("key") != key or sha256_file(src_w) != meta.get("sha256"):
            log.warning("shipped checkpoint %s does not match its card; ignoring it", src_w)
            return False
        atomic_write_bytes(self.weights_path(key), src_w.read_bytes())
        atomic_write_text(self.meta_path(key), json.dumps({**meta, "source": "bundled"}, indent=2, sort_keys=True))
        log.info("using the checkpoint shipped with the package (%s, test accuracy %s)", key,
                 meta.get("test_accuracy"))
        return True

    def save(self, key: str, module: nn.Module, spec: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
        wp = self.weights_path(key)
        digest = save_weights(module, wp, metadata={"key": key})
        meta = {"key": key, "spec": spec, "sha256": digest, **(extra or {})}
        atomic_write_text(self.meta_path(key), json.dumps(meta, indent=2, sort_keys=True, default=str))
        return wp

    def remove(self, key: str) -> None:
        for p in (self.weights_path(key), self.meta_path(key)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
