"""Neural targets for neural guidance (``defenses/neural_guidance.py``): where the regression targets come from.

Shao et al. (arXiv 2405.02564; code ``shaox192/NeuralGuidance``) turn measured responses of a region of the
ventral stream into targets in four steps, reproduced here for every source:

1. average the repeats of each image (``neural_data_proc/prep_beta.py``);
2. z-score every unit with the mean and standard deviation over the fit images (``+ 1e-6``);
3. PCA fitted on the fit images, keeping the leading components that explain ``variance_fraction`` of the
   variance (0.95 there; ``max_components`` optionally caps the count for CPU-sized heads);
4. a *neural predictor* network trained to map images to those PCA scores (``neural_predictor_training``:
   Adam 1e-3, weight decay 5e-4, loss = summed squared error per image), frozen, so that any training image
   (augmented or not) gets a target.

Sources (``conf/defense/neural_target/*.yaml``):

* :class:`FileTarget` (``file``, source_kind ``neural``): measured responses supplied by the user, one region
  per ``.npz`` file, loaded with ``allow_pickle=False`` and validated on load. The format::

      responses  float, (n_images, n_units) or (n_images, n_repeats, n_units); finite (no NaN / inf)
      image_ids  int, (n_images,): unique indices into the configured dataset's original training set
                 (the order of its files, before the validation split)            -- or, instead --
      images     uint8 in [0, 255] or float in [0, 1], (n_images, C, H, W), or (n_images, H, W) for one
                 channel; the dataset's channels and image size
      region     str, optional (e.g. "V1"); labels the results

  A fraction of the images (``holdout_fraction``) is held out from steps 2-4; it measures the predictor
  (mean per-image Pearson r, the authors' measure) and serves as the held-out set of the RSA.
* :class:`V1GaborTarget` (``v1_gabor``, ``surrogate``): a fixed V1-like Gabor filter bank in the design of
  VOneNet (Dapello et al. 2020): simple cells (rectified responses of Gabor filters at several phases) and
  complex cells (quadrature-pair energy) over a grid of orientations and spatial frequencies, average-pooled.
  VOneNet draws its parameters from primate V1 distributions; we use an evenly spaced grid over the same
  dimensions, so the bank is deterministic and its tuning can be checked.
* :class:`ModelStageTarget` (``model_stage``, ``surrogate``): the average-pooled output of stage ``k`` of a
  separately trained, frozen network from the checkpoint cache (by default the harness's default ResNet-20),
  a proxy for successively higher areas, so a hierarchy runs offline.

Surrogates are not brain data: their ``source_kind`` is ``"surrogate"`` and their labels end in
``"(model-derived)"``, in every table and plot.

Predictor modes (``defense.predictor.mode``): ``trained`` (step 4), ``direct`` (surrogates only: the
surrogate itself gives every image its exact target; the predictor the authors need for fMRI is exact
here), and two of the authors' controls: ``random`` (an untrained predictor network, fixed seed, as their
``roi=random``) and ``shuffled`` (a predictor trained on image -> response pairs permuted across images, as
their ``--shuffle`` predictor training).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core import data as data_mod
from robustbench_lab.core import zoo
from robustbench_lab.core.cache import sha256_file
from robustbench_lab.core.errors import ConfigError, check_known_fields
from robustbench_lab.core.model import Classifier

log = logging.getLogger(__name__)

MODEL_DERIVED = "(model-derived)"
PREDICTOR_MODES = ("trained", "direct", "random", "shuffled")
SOURCE_KINDS = ("neural", "surrogate")


# ------------------------------------------------------------------------------------------ helpers
def pool_flatten(h: torch.Tensor, pool: int) -> torch.Tensor:
    """(B, C, H, W) -> adaptive average pool to (pool, pool) -> (B, C * pool * pool); (B, D) passes through."""
    if h.dim() == 4:
        return F.adaptive_avg_pool2d(h, pool).flatten(1)
    return h.flatten(1)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_fraction(key: str, v: Any) -> float:
    if not _num(v) or not 0 < v <= 1:
        raise ConfigError(key, v, "a number in (0, 1]")
    return float(v)


def _check_pos_int(key: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(key, v, f"an integer >= {minimum}")
    return int(v)


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


@torch.no_grad()
def _batched(fn: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Apply ``fn`` to float images ``x`` (N, C, H, W) in [0, 1] (or uint8) in batches; returns (N, ...) on CPU."""
    out = []
    for i in range(0, x.shape[0], batch_size):
        out.append(fn(data_mod.to_float(x[i:i + batch_size]).to(device)).cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------- response pipeline
class ResponsePipeline(nn.Module):
    """Steps 2-3 of the pipeline as a module: raw responses (B, U) -> z-score per unit -> PCA scores (B, k).

    Buffers (saved with the module): ``unit_mean``/``unit_scale`` (U,) of the fit images (scale = std + 1e-6,
    as the authors), ``pca_mean`` (U,) and ``components`` (k, U). Component signs are fixed (largest
    loading positive), so the scores do not depend on the SVD routine's sign convention.
    """

    def __init__(self, n_units: int, n_components: int) -> None:
        super().__init__()
        self.register_buffer("unit_mean", torch.zeros(n_units))
        self.register_buffer("unit_scale", torch.ones(n_units))
        self.register_buffer("pca_mean", torch.zeros(n_units))
        self.register_buffer("components", torch.zeros(n_components, n_units))
        self.explained_variance_ratio: list[float] = []

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, responses: np.ndarray | torch.Tensor, variance_fraction: float = 0.95,
            max_components: int | None = None) -> "ResponsePipeline":
        """Fit on ``responses`` (n, U), or (n, R, U) whose repeats are averaged first (step 1)."""
        r = responses.detach().cpu().numpy() if isinstance(responses, torch.Tensor) else np.asarray(responses)
        r = average_repeats(r).astype(np.float64)
        if r.shape[0] < 3:
            raise ValueError(f"the response pipeline needs at least 3 fit images, got {r.shape[0]}")
        mean, std = r.mean(0), r.std(0)
        z = np.nan_to_num((r - mean) / (std + 1e-6))
        mu = z.mean(0)
        _, s, vt = np.linalg.svd(z - mu, full_matrices=False)
        var = s ** 2
        if not var.sum() > 0:
            raise ValueError("the responses do not vary across the fit images (every unit is constant): "
                             "there is nothing to regress")
        ratio = var / var.sum()
        k = int(np.searchsorted(np.cumsum(ratio), variance_fraction, side="right") + 1)
        k = min(k, len(ratio), int(max_components) if max_components else len(ratio))
        comps = vt[:k]
        signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
        comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
        p = cls(r.shape[1], k)
        p.unit_mean.copy_(torch.from_numpy(mean))
        p.unit_scale.copy_(torch.from_numpy(std + 1e-6))
        p.pca_mean.copy_(torch.from_numpy(mu))
        p.components.copy_(torch.from_numpy(comps))
        p.explained_variance_ratio = ratio[:k].tolist()
        return p

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        z = torch.nan_to_num((r.float() - self.unit_mean) / self.unit_scale)
        return (z - self.pca_mean) @ self.components.T


def average_repeats(r: np.ndarray) -> np.ndarray:
    """(n, R, U) -> mean over repeats (n, U); (n, U) is returned as is."""
    return r.mean(axis=1) if r.ndim == 3 else r


# ------------------------------------------------------------------------------------ Gabor bank
def gabor_pair(freq: float, theta: float, sigma: float, aspect: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Even (cosine) and odd (sine) Gabor kernels, each (size, size), zero mean and unit L2 norm.

    ``freq``: cycles per pixel; ``theta``: direction of the carrier's modulation in radians (x = column,
    y = row), so the kernel's spectrum peaks at ``freq * (cos theta, sin theta)``; ``sigma``: envelope standard
    deviation along the carrier (pixels); ``aspect``: sigma across the carrier / sigma along it.
    """
    half = size // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    xr = xx * math.cos(theta) + yy * math.sin(theta)
    yr = -xx * math.sin(theta) + yy * math.cos(theta)
    env = np.exp(-0.5 * (xr ** 2 / sigma ** 2 + yr ** 2 / (aspect * sigma) ** 2))
    out = []
    for carrier in (np.cos(2 * math.pi * freq * xr), np.sin(2 * math.pi * freq * xr)):
        g = env * carrier
        g = g - env * (g.sum() / env.sum())    # remove the DC response, keep the envelope's shape
        out.append(g / np.linalg.norm(g))
    return out[0], out[1]


class GaborBank(nn.Module):
    """A fixed V1-like filter bank (VOneNet design): simple and complex cells on the image's luminance.

    For every spatial frequency ``f`` (cycles/pixel, in (0, 0.5]) and orientation ``theta`` (evenly spaced in
    [0, 180) degrees when an integer count is given), an even/odd (quadrature) Gabor pair q0, q1 with
    envelope sigma = ``sigma_cycles / f`` pixels. Simple cell at phase phi: ``relu(cos(phi) q0 - sin(phi) q1)``
    (the response of the Gabor of phase phi, rectified); complex cell: ``sqrt(q0^2 + q1^2) / sqrt(2)``
    (quadrature energy, as VOneNet). Input (B, C, H, W) in [0, 1] (channels averaged to luminance), output
    (B, n_cells, H, W) with channels ordered frequency > orientation > [simple phases..., complex];
    ``cells`` describes each channel. No randomness anywhere: the bank is a function of its parameters.
    """

    def __init__(self, orientations: int | Sequence[float] = 8, frequencies: Sequence[float] = (0.1, 0.2, 0.3),
                 phases: Sequence[float] = (0.0, 90.0, 180.0, 270.0), complex_cells: bool = True,
                 sigma_cycles: float = 0.5, aspect: float = 1.0, key: str = "defense.neural_target") -> None:
        super().__init__()
        if isinstance(orientations, bool) or not isinstance(orientations, (int, list, tuple)):
            raise ConfigError(f"{key}.orientations", orientations, "an integer >= 1 or a list of angles in degrees")
        if isinstance(orientations, int):
            _check_pos_int(f"{key}.orientations", orientations)
            thetas = [180.0 * i / orientations for i in range(orientations)]
        else:
            thetas = [float(t) for t in orientations]
            if not thetas:
                raise ConfigError(f"{key}.orientations", orientations, "a non-empty list of angles in degrees")
        freqs = [float(f) for f in frequencies] if isinstance(frequencies, (list, tuple)) else []
        if not freqs or any(not 0 < f <= 0.5 for f in freqs):
            raise ConfigError(f"{key}.frequencies", frequencies,
                              "a non-empty list of cycles/pixel in (0, 0.5] (Nyquist)")
        if not isinstance(phases, (list, tuple)) or not all(_num(p) for p in phases):
            raise ConfigError(f"{key}.phases", phases, "a list of simple-cell phases in degrees (may be empty)")
        if not phases and not complex_cells:
            raise ConfigError(f"{key}.phases", phases, "at least one phase, or complex_cells: true",
                              "the bank has no cells")
        if not _num(sigma_cycles) or not sigma_cycles > 0:
            raise ConfigError(f"{key}.sigma_cycles", sigma_cycles, "a number > 0 (envelope sigma in carrier cycles)")
        if not _num(aspect) or not aspect > 0:
            raise ConfigError(f"{key}.aspect", aspect, "a number > 0")
        self.thetas, self.freqs = thetas, freqs
        self.phases = [float(p) for p in phases]
        self.complex_cells = bool(complex_cells)
        self.sigma_cycles, self.aspect = float(sigma_cycles), float(aspect)
        self.sizes: list[int] = []
        for i, f in enumerate(freqs):
            sigma = self.sigma_cycles / f
            size = 2 * math.ceil(2.5 * sigma * max(1.0, self.aspect)) + 1
            self.sizes.append(size)
            w = []
            for t in thetas:
                even, odd = gabor_pair(f, math.radians(t), sigma, self.aspect, size)
                w += [even, odd]
            self.register_buffer(f"weight{i}", torch.tensor(np.stack(w), dtype=torch.float32).unsqueeze(1))
        self.cells: list[dict[str, Any]] = []
        for f in freqs:
            for t in thetas:
                self.cells += [{"type": "simple", "frequency": f, "orientation": t, "phase": p} for p in self.phases]
                if self.complex_cells:
                    self.cells.append({"type": "complex", "frequency": f, "orientation": t, "phase": None})

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    def kernels(self) -> list[dict[str, Any]]:
        """Every quadrature pair: ``frequency``, ``orientation`` (degrees), ``even``/``odd`` (size, size) arrays."""
        out = []
        for i, f in enumerate(self.freqs):
            w = getattr(self, f"weight{i}")[:, 0].cpu().numpy()
            for j, t in enumerate(self.thetas):
                out.append({"frequency": f, "orientation": t, "even": w[2 * j], "odd": w[2 * j + 1]})
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gray = x.float().mean(1, keepdim=True)
        b, _, h, w = gray.shape
        groups = []
        for i, size in enumerate(self.sizes):
            p = size // 2
            q = F.conv2d(F.pad(gray, (p, p, p, p), mode="replicate"), getattr(self, f"weight{i}"))
            q0, q1 = q[:, 0::2], q[:, 1::2]                       # (B, n_orient, H, W) each
            cells = [F.relu(math.cos(math.radians(ph)) * q0 - math.sin(math.radians(ph)) * q1) for ph in self.phases]
            if self.complex_cells:
                cells.append(torch.sqrt(q0 ** 2 + q1 ** 2) / math.sqrt(2.0))
            groups.append(torch.stack(cells, 2).reshape(b, -1, h, w))
        return torch.cat(groups, 1)


class PooledResponse(nn.Module):
    """``pool_flatten(inner(x), pool)``: a raw unit response (B, U) of a surrogate. Always in eval mode."""

    def __init__(self, inner: nn.Module, pool: int) -> None:
        super().__init__()
        self.inner = inner
        self.pool = int(pool)
        for p in self.inner.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "PooledResponse":
        return super().train(False)    # a frozen source never enters train mode (BatchNorm statistics stay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_flatten(self.inner(x), self.pool)


# ---------------------------------------------------------------------------------- model stages
class _StopForward(Exception):
    pass


def network_stages(model: nn.Module) -> list[str]:
    """Names (in ``model.named_modules()``) of the modules that end each stage of a zoo network.

    ResNets (``stages`` ModuleList): each stage. Plain CNNs (``features`` Sequential, e.g. small_cnn, lenet):
    each pooling layer of ``features``, then the last hidden activation of ``classifier``. Decided by the
    network's structure, not its name. [] when neither layout is present.
    """
    named = dict(model.named_modules())
    prefix = "net." if isinstance(named.get("net"), nn.Module) else ""
    net = named.get("net", model)
    stages = getattr(net, "stages", None)
    if isinstance(stages, nn.ModuleList):
        return [f"{prefix}stages.{i}" for i in range(len(stages))]
    feats = getattr(net, "features", None)
    if isinstance(feats, nn.Sequential):
        names = [f"{prefix}features.{i}" for i, m in enumerate(feats) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
        clf = getattr(net, "classifier", None)
        if isinstance(clf, nn.Sequential):
            relus = [i for i, m in enumerate(clf) if isinstance(m, nn.ReLU)]
            if relus:
                names.append(f"{prefix}classifier.{relus[-1]}")
        return names
    return []


class StageOutput(nn.Module):
    """The output of module ``name`` of a frozen classifier (the forward pass stops there)."""

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self._module = dict(net.named_modules())[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured: dict[str, torch.Tensor] = {}

        def hook(_m: nn.Module, _i: Any, o: torch.Tensor) -> None:
            captured["out"] = o
            raise _StopForward   # the later stages are not needed

        h = self._module.register_forward_hook(hook)
        try:
            self.net(x)
        except _StopForward:
            pass
        finally:
            h.remove()
        return captured["out"]


# ------------------------------------------------------------------------------------ predictor
@dataclasses.dataclass(frozen=True)
class PredictorSpec:
    """How targets reach the training images (``defense.predictor``); everything enters the checkpoint key.

    ``model``: a zoo architecture for the predictor (the authors use a ResNet-18; ``small_cnn`` on CPU), its
    classifier layer sized to the number of PCA components; ``epochs``/``batch_size``/``lr``/``weight_decay``:
    Adam training on the fit pairs (the authors: lr 1e-3, weight decay 5e-4, 40 epochs); ``seed``: its
    initialisation, data order, and the permutation of the shuffled control.
    """

    mode: str = "direct"
    model: str = "small_cnn"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-4
    seed: int = 0

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None, key: str = "defense.predictor") -> "PredictorSpec":
        d = dict(_plain(node) or {})
        check_known_fields(cls, d, key, "predictor field")
        s = cls(**d)
        if s.mode not in PREDICTOR_MODES:
            raise ConfigError(f"{key}.mode", s.mode, PREDICTOR_MODES)
        zoo.get_card(s.model, key=f"{key}.model")
        _check_pos_int(f"{key}.epochs", s.epochs, 0)
        _check_pos_int(f"{key}.batch_size", s.batch_size)
        if not _num(s.lr) or not s.lr > 0:
            raise ConfigError(f"{key}.lr", s.lr, "a number > 0")
        if not _num(s.weight_decay) or s.weight_decay < 0:
            raise ConfigError(f"{key}.weight_decay", s.weight_decay, "a number >= 0")
        if isinstance(s.seed, bool) or not isinstance(s.seed, int):
            raise ConfigError(f"{key}.seed", s.seed, "an integer")
        return s

    def spec(self) -> dict[str, Any]:
        if self.mode == "direct":
            return {"mode": "direct"}
        if self.mode == "random":
            return {"mode": "random", "model": self.model, "seed": self.seed}
        return dataclasses.asdict(self)


def build_predictor(spec: PredictorSpec, card: data_mod.DataCard, n_out: int) -> Classifier:
    """A zoo network with ``n_out`` outputs on [0, 1] inputs (normalization of the dataset), seeded by ``spec.seed``."""
    mcard = zoo.get_card(spec.model, key="defense.predictor.model")
    with torch.random.fork_rng(devices=[]):   # initialise under its own seed; the caller's RNG is untouched
        torch.manual_seed(int(spec.seed))
        net = mcard.builder(card.channels, n_out, card.image_size)
    mean = mcard.mean if mcard.mean is not None else card.mean
    std = mcard.std if mcard.std is not None else card.std
    return Classifier(net, mean, std, n_out, mcard.bounds, name=f"predictor:{spec.model}")


def shuffled_pairs(targets: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shuffled control's training targets: image i is paired with the response of image perm[i].

    Returns (permuted targets (n, k), perm (n,)); the permutation is fixed by ``seed``.
    """
    g = torch.Generator().manual_seed(int(seed) + 1024)
    perm = torch.randperm(targets.shape[0], generator=g)
    return targets[perm], perm


def pattern_correlation(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson r between predicted and true response patterns: (n, k), (n, k) -> (n,)."""
    a = pred.double() - pred.double().mean(1, keepdim=True)
    b = true.double() - true.double().mean(1, keepdim=True)
    return torch.nan_to_num((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))


def train_predictor(spec: PredictorSpec, card: data_mod.DataCard, images: torch.Tensor, targets: torch.Tensor,
                    device: torch.device) -> tuple[Classifier, dict[str, Any]]:
    """Train a predictor on ``images`` (n, C, H, W) uint8 or [0, 1] float -> ``targets`` (n, k). Frozen on return."""
    model = build_predictor(spec, card, targets.shape[1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    g = torch.Generator().manual_seed(int(spec.seed))
    losses = []
    model.train()
    for _ in range(spec.epochs):
        total, n = 0.0, 0
        for xb, tb in data_mod.batches(images, targets, spec.batch_size, shuffle=True, generator=g):
            xb, tb = data_mod.to_float(xb).to(device), tb.to(device)
            loss = (model(xb) - tb).pow(2).sum(1).mean()     # the authors' VoxelLoss: summed over units
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * xb.shape[0]
            n += xb.shape[0]
        losses.append(total / max(n, 1))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {"predictor_train_loss": losses}


# -------------------------------------------------------------------------------- fitted target
@dataclasses.dataclass
class FittedTarget:
    """A source after fitting: what the guidance loss and the analyses use.

    ``target``: frozen module, (B, C, H, W) in [0, 1] -> (B, k) regression targets (None when fitted for
    analysis only); ``pipeline``: steps 2-3; ``response``: the surrogate's raw units (B, U) (None for file
    data); ``heldout``: (images (n, C, H, W) float, reference scores (n, k)) held out from the fit (file data);
    ``info``: numbers worth recording (components, explained variance, predictor quality).
    """

    target: nn.Module | None
    pipeline: ResponsePipeline
    response: nn.Module | None
    info: dict[str, Any]
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_components(self) -> int:
        return self.pipeline.n_components

    @torch.no_grad()
    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The source's own (pipeline-applied) responses to ``x`` (B, C, H, W): surrogates only."""
        if self.response is None:
            raise ValueError("measured data have responses only for the file's images (use FittedTarget.heldout)")
        return self.pipeline(self.response(x))


class _Chain(nn.Module):
    def __init__(self, response: nn.Module, pipeline: ResponsePipeline) -> None:
        super().__init__()
        self.response, self.pipeline = response, pipeline

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pipeline(self.response(x))


# ---------------------------------------------------------------------------------- the sources
class TargetSource:
    """Base of the target sources: steps 1-3 from the source's fit data, then the predictor (step 4).

    Subclasses set ``kind``/``source_kind`` and implement ``fit_data`` (and ``response_module`` when the
    source can respond to any image, i.e. a surrogate).
    """

    kind = "source"
    source_kind = "surrogate"
    supports_direct = True

    def __init__(self, *, variance_fraction: float = 0.95, max_components: int | None = 256, n_fit: int = 2000,
                 n_heldout: int = 500, seed: int = 0, key: str = "defense.neural_target") -> None:
        self.key = key
        self.variance_fraction = _check_fraction(f"{key}.variance_fraction", variance_fraction)
        if max_components is not None:
            _check_pos_int(f"{key}.max_components", max_components)
        self.max_components = max_components
        self.n_fit = _check_pos_int(f"{key}.n_fit", n_fit, 3)
        self.n_heldout = _check_pos_int(f"{key}.n_heldout", n_heldout, 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{key}.seed", seed, "an integer")
        self.seed = int(seed)

    # -- labels
    @property
    def label(self) -> str:
        """Human-readable name of the target level; surrogates end in ``(model-derived)``."""
        return self.kind if self.source_kind == "neural" else f"{self.kind} {MODEL_DERIVED}"

    @property
    def level(self) -> int | None:
        """Position in the surrogate hierarchy (1 = V1-like), None for measured data."""
        return None

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "source_kind": self.source_kind, "variance_fraction": self.variance_fraction,
                "max_components": self.max_components, "n_fit": self.n_fit, "seed": self.seed}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source_kind": self.source_kind, "label": self.label, "level": self.level}

    # -- to implement
    def response_module(self, splits: data_mod.Splits, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def fit_data(self, splits: data_mod.Splits, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(fit images (n, C, H, W) uint8 or float, raw responses (n, U) or (n, R, U), held-out or None)."""
        response = self.response_module(splits, device)
        idx = self.fit_indices(splits)
        images = splits.x_train[idx]
        return images, _batched(response, images, device), None

    def fit_indices(self, splits: data_mod.Splits) -> torch.Tensor:
        """``n_fit`` training images drawn with ``seed`` (independent of the guided model's recipe)."""
        n = splits.x_train.shape[0]
        if n < 3:
            raise ConfigError("data.n_val", splits.x_val.shape[0], "a split leaving training images",
                              "the neural target is fitted on training images")
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=g)[:min(self.n_fit, n)].sort().values

    def heldout_images(self, splits: data_mod.Splits) -> torch.Tensor:
        """Images held out from the fit, to measure a predictor: validation images, else unused training ones."""
        if splits.x_val.shape[0]:
            return splits.x_val[:self.n_heldout]
        rest = torch.ones(splits.x_train.shape[0], dtype=torch.bool)
        rest[self.fit_indices(splits)] = False
        return splits.x_train[rest][:self.n_heldout]

    # -- the pipeline
    def fit(self, splits: data_mod.Splits, device: torch.device, predictor: PredictorSpec | None) -> FittedTarget:
        """Steps 1-3 on the fit data, then the predictor of ``predictor.mode`` (None: no target module,
        e.g. to compute reference responses for an analysis)."""
        images, raw, heldout = self.fit_data(splits, device)
        pipeline = ResponsePipeline.fit(raw, self.variance_fraction, self.max_components).to(device)
        scores = _batched(pipeline, torch.from_numpy(average_repeats(np.asarray(raw))).float(), device)
        response = None if self.source_kind == "neural" else self.response_module(splits, device)
        info: dict[str, Any] = {"n_fit": int(images.shape[0]), "n_units": int(pipeline.unit_mean.shape[0]),
                                "n_components": pipeline.n_components,
                                "explained_variance": float(sum(pipeline.explained_variance_ratio)),
                                "score_rms": float(scores.pow(2).mean().sqrt())}
        held = None
        if heldout is not None:
            h_img, h_raw = heldout
            h_scores = _batched(pipeline, torch.from_numpy(average_repeats(h_raw)).float(), device)
            held = (data_mod.to_float(h_img), h_scores)
        target: nn.Module | None = None
        if predictor is not None:
            if predictor.mode == "direct":
                if response is None:
                    raise ConfigError("defense.predictor.mode", "direct", ["trained", "random", "shuffled"],
                                      "measured data have responses only for the file's images; a predictor "
                                      "gives every training image a target")
                target = _Chain(response, pipeline)
            elif predictor.mode == "random":
                target = build_predictor(predictor, splits.card, pipeline.n_components).to(device).eval()
                for p in target.parameters():
                    p.requires_grad_(False)
            else:
                fit_targets = scores
                if predictor.mode == "shuffled":
                    fit_targets, perm = shuffled_pairs(scores, predictor.seed)
                    info["shuffled_fixed_points"] = int((perm == torch.arange(perm.shape[0])).sum())
                target, stats = train_predictor(predictor, splits.card, images, fit_targets, device)
                info.update(stats)
            info.update(self._predictor_quality(target, splits, device, held, response, pipeline))
        return FittedTarget(target, pipeline, response, info, held)

    def _predictor_quality(self, target: nn.Module, splits: data_mod.Splits, device: torch.device,
                           held: tuple[torch.Tensor, torch.Tensor] | None, response: nn.Module | None,
                           pipeline: ResponsePipeline) -> dict[str, Any]:
        """Mean per-image r between the targets and the source on held-out images (authors' measure)."""
        if held is not None:
            x, ref = held
        elif response is not None and self.n_heldout > 0:
            x = data_mod.to_float(self.heldout_images(splits))
            ref = _batched(_Chain(response, pipeline), x, device)
        else:
            return {}
        if x.shape[0] == 0:
            return {}
        pred = _batched(target, x, device)
        return {"target_heldout_r": float(pattern_correlation(pred, ref).mean()), "n_heldout": int(x.shape[0])}


class V1GaborTarget(TargetSource):
    """V1-like surrogate: a fixed Gabor bank of simple and complex cells (VOneNet design), average-pooled to
    ``pool`` x ``pool`` per cell type, PCA-reduced. Model-derived, not brain data."""

    kind = "v1_gabor"
    source_kind = "surrogate"

    def __init__(self, *, orientations: int | Sequence[float] = 8, frequencies: Sequence[float] = (0.1, 0.2, 0.3),
                 phases: Sequence[float] = (0.0, 90.0, 180.0, 270.0), complex_cells: bool = True,
                 sigma_cycles: float = 0.5, aspect: float = 1.0, pool: int = 4, **kw: Any) -> None:
        super().__init__(**kw)
        self.bank = GaborBank(_plain(orientations), _plain(frequencies), _plain(phases), complex_cells,
                              sigma_cycles, aspect, key=self.key)
        self.pool = _check_pos_int(f"{self.key}.pool", pool)

    @property
    def level(self) -> int:
        return 1

    @property
    def label(self) -> str:
        return f"V1-like Gabor bank {MODEL_DERIVED}"

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "orientations": self.bank.thetas, "frequencies": self.bank.freqs,
                "phases": self.bank.phases, "complex_cells": self.bank.complex_cells,
                "sigma_cycles": self.bank.sigma_cycles, "aspect": self.bank.aspect, "pool": self.pool}

    def response_module(self, splits: data_mod.Splits, device: torch.device) -> nn.Module:
        return PooledResponse(self.bank, self.pool).to(device)


class ModelStageTarget(TargetSource):
    """Higher-area surrogate: stage ``stage`` (1-based) of a separately trained, frozen network.

    The network is ``model`` (a zoo name, ``kwargs``) trained by the harness with the model's default recipe
    (plus ``train`` overrides) and ``seed`` on ``data`` (name, n_val, split_seed: the run's, by config
    interpolation), loaded from the checkpoint cache under ``cache_dir`` (trained there once if missing; the
    key is the one ``python run.py model=<model>`` would use, so the default ResNet-20 is shared with the main
    job) -- or ``checkpoint``: a weights file of that architecture. Its stage output is average-pooled to
    ``pool`` x ``pool`` and PCA-reduced. Model-derived, not brain data.
    """

    kind = "model_stage"
    source_kind = "surrogate"

    def __init__(self, *, stage: int = 3, model: str = "resnet20", kwargs: Mapping[str, Any] | None = None,
                 train: Mapping[str, Any] | None = None, source_seed: int = 0, checkpoint: str | None = None,
                 data: Mapping[str, Any] | None = None, cache_dir: str | None = None, pool: int = 4,
                 **kw: Any) -> None:
        super().__init__(**kw)
        key = self.key
        zoo.get_card(model, key=f"{key}.model")
        self.model = model
        self.kwargs = dict(_plain(kwargs) or {})
        self.train_overrides = dict(_plain(train) or {})
        self.source_seed = int(source_seed)
        self.data = dict(_plain(data) or {"name": "fashion_mnist", "n_val": 5000, "split_seed": 0})
        for k in ("name", "n_val", "split_seed"):
            if k not in self.data:
                raise ConfigError(f"{key}.data.{k}", None, "the run's data settings (name, n_val, split_seed)")
        dcard = data_mod.get_card(self.data["name"])
        self.stage_names = network_stages(self._build(dcard))
        if not self.stage_names:
            raise ConfigError(f"{key}.model", model, "a network with stages (resnet*, small_cnn, lenet)")
        if isinstance(stage, bool) or not isinstance(stage, int) or not 1 <= stage <= len(self.stage_names):
            raise ConfigError(f"{key}.stage", stage, list(range(1, len(self.stage_names) + 1)),
                              f"{model} has {len(self.stage_names)} stages ({', '.join(self.stage_names)})")
        self.stage = stage
        self.pool = _check_pos_int(f"{key}.pool", pool)
        self.checkpoint = str(checkpoint) if checkpoint else None
        if self.checkpoint and not Path(self.checkpoint).expanduser().is_file():
            raise ConfigError(f"{key}.checkpoint", checkpoint, "null (the harness's cached network) or an existing "
                              "weights file of the source architecture")
        self._ckpt_sha = sha256_file(Path(self.checkpoint).expanduser()) if self.checkpoint else None
        self.cache_dir = cache_dir
        self._net: Classifier | None = None
        self.source_meta: dict[str, Any] = {}

    @property
    def level(self) -> int:
        return 1 + self.stage

    @property
    def label(self) -> str:
        return f"{self.model} stage {self.stage} {MODEL_DERIVED}"

    def _source_cfg(self) -> Any:
        from omegaconf import OmegaConf
        return OmegaConf.create({"model": {"name": self.model, "kwargs": self.kwargs, "train_seed": self.source_seed},
                                 "data": dict(self.data), "seed": self.source_seed})

    def _build(self, dcard: data_mod.DataCard) -> Classifier:
        from robustbench_lab.app.builders import build_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.source_seed)    # the init the harness would use for this checkpoint
            return build_model(self._source_cfg(), dcard)

    def recipe(self) -> Any:
        from omegaconf import OmegaConf

        from robustbench_lab.app.builders import CONF_DIR
        from robustbench_lab.core.recipe import Recipe
        base = OmegaConf.load(CONF_DIR / "model" / f"{self.model}.yaml").get("train") or {}
        merged = {**dict(OmegaConf.to_container(base, resolve=True)), **self.train_overrides}   # type: ignore[arg-type]
        return Recipe.from_config(merged, key=f"{self.key}.train")

    def source_spec(self) -> dict[str, Any]:
        """The source network's checkpoint spec (the cache key's content), or its weights file's hash."""
        if self.checkpoint:
            return {"checkpoint_sha256": self._ckpt_sha, "model": self.model, "kwargs": self.kwargs}
        from robustbench_lab.app.builders import checkpoint_spec
        from robustbench_lab.core.defense_base import NoDefense
        return checkpoint_spec(self._source_cfg(), self.recipe(), NoDefense())

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "stage": self.stage, "stage_module": self.stage_names[self.stage - 1],
                "pool": self.pool, "source": self.source_spec()}

    def source_network(self, splits: data_mod.Splits, device: torch.device) -> Classifier:
        """The frozen source network (trained and cached by the harness when missing)."""
        if self._net is not None:
            return self._net
        from robustbench_lab.core.cache import CheckpointCache, content_key, load_weights
        from robustbench_lab.core.train import get_or_train
        if splits.card.name != self.data["name"]:
            raise ConfigError(f"{self.key}.data.name", self.data["name"], [splits.card.name],
                              "the source network must be trained on the run's dataset")
        net = self._build(splits.card)
        if self.checkpoint:
            load_weights(net, Path(self.checkpoint).expanduser(), what=f"{self.key}.checkpoint")
            self.source_meta = {"checkpoint": self.checkpoint}
        else:
            if not self.cache_dir:
                raise ConfigError(f"{self.key}.cache_dir", self.cache_dir, "the checkpoint cache directory "
                                  "(${paths.cache_dir} in the config)")
            spec = self.source_spec()
            cache = CheckpointCache(Path(self.cache_dir) / "checkpoints")
            meta = get_or_train(net, spec, splits, self.recipe(), cache, device, self.source_seed, None, progress=False)
            self.source_meta = {"checkpoint_key": content_key(spec), "cache_hit": bool(meta.get("cache_hit")),
                                "source_test_accuracy": meta.get("test_accuracy")}
        net.to(device).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self._net = net
        return net

    def response_module(self, splits: data_mod.Splits, device: torch.device) -> nn.Module:
        net = self.source_network(splits, device)
        return PooledResponse(StageOutput(net, self.stage_names[self.stage - 1]), self.pool).to(device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "stage": self.stage, "stage_module": self.stage_names[self.stage - 1],
                "model": self.model, **self.source_meta}


# ------------------------------------------------------------------------------------ file data
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
        if not _num(holdout_fraction) or not 0 <= holdout_fraction < 1:
            raise ConfigError(f"{self.key}.holdout_fraction", holdout_fraction, "a number in [0, 1)")
        self.holdout_fraction = float(holdout_fraction)

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
