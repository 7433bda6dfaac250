"""Adversarial contrastive learning (ACL; Jiang, Chen, Chen, Wang, "Robust Pre-Training by Adversarial
Contrastive Learning", NeurIPS 2020, arXiv 2010.13337), with its downstream fine-tuning protocols.

Written from the paper and ``docs/methods.md`` section 4; the authors' release
(``VITA-Group/Adversarial-Contrastive-Learning``: ``train_simCLR.py``, ``models/resnet_multi_bn.py``,
``utils.py``, ``train_trades.py``, ``optimizer/lars.py``) served as the reference for details the paper
leaves open (which BN the attack uses, the projection head's layers, the LARS form, the zero-initialised
classifier). ``docs/acl.md`` lists every choice.

A training procedure in two stages, both inside ``fit`` (called by ``robustbench_lab.core.train.get_or_train``):

1. **Self-supervised pre-training** (labels unused) of the run's network with its classification head
   replaced by a projection head, every BatchNorm doubled into a "normal" and a "pgd" set (all other weights
   shared). ``variant``: ``simclr`` (standard views, normal BN), ``a2a`` (both views attacked, pgd BN),
   ``a2s`` (view 1 standard through the normal BN, view 2 attacked through the pgd BN), ``ds`` (dual stream:
   0.5 NT-Xent(clean views, normal BN) + 0.5 NT-Xent(attacked views, pgd BN)), or ``none`` (no
   pre-training: the fine-tuning stage alone, i.e. TRADES from scratch under ``protocol=aff``). The attack
   maximizes the NT-Xent loss itself (L-inf PGD, random start) with the model in eval mode on the pgd BN.
   The pre-trained encoder is cached under a key of the pre-training spec only, so runs that differ only
   downstream pre-train once.
2. **Fine-tuning** of the run's classifier, initialised from the encoder with the adversarial branch's BN
   ("pgd"; "normal" for ``simclr``, whose pgd set is never trained) and a zero classification head.
   ``protocol``: ``slf`` (standard linear: cross-entropy, frozen encoder), ``alf`` (adversarial linear:
   TRADES, frozen encoder), ``aff`` (adversarial full fine-tuning: TRADES, every weight). The fine-tuning
   recipe is the run's ``model.train``; the epoch kept is the one of best validation robust accuracy.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from attacks.pgd import PGD
from defenses.adv_training import AdversarialTrainingProcedure
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.cache import CheckpointCache, content_key
from robustbench_lab.core.defense_base import Defense
from robustbench_lab.core.errors import ConfigError, check_known_fields
from robustbench_lab.core.model import eval_frozen, predict
from robustbench_lab.core.norms import Norm, project, random_in_ball

log = logging.getLogger(__name__)

VARIANTS = ("none", "simclr", "a2a", "a2s", "ds")
PROTOCOLS = ("slf", "alf", "aff")
BRANCHES = ("normal", "pgd")
TRANSFER_BN = ("auto", "normal", "pgd")
PRETRAIN_OPTIMIZERS = ("lars", "sgd")
SELECT_BY = ("robust", "clean", "last")
ACL_CODE_VERSION = 1   # bump when a change here changes pre-trained or fine-tuned weights


# ============================================================================================== dual BN
class DualBatchNorm(nn.Module):
    """Two BatchNorm sets of the same shape, ``normal`` and ``pgd``; ``branch`` selects the one applied.

    Built from an existing BatchNorm (both sets start as copies of it). Everything else in the network is
    shared, so a forward pass in one branch updates (in train mode) only that branch's running statistics.
    """

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.normal = copy.deepcopy(bn)
        self.pgd = copy.deepcopy(bn)
        self.branch = "normal"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pgd(x) if self.branch == "pgd" else self.normal(x)


def convert_dual_bn(module: nn.Module) -> int:
    """Replace every BatchNorm1d/2d below ``module`` (in place) by a ``DualBatchNorm``. Returns the count."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, DualBatchNorm):
            continue
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(module, name, DualBatchNorm(child))
            n += 1
        else:
            n += convert_dual_bn(child)
    return n


@contextlib.contextmanager
def bn_branch(model: nn.Module, branch: str) -> Iterator[nn.Module]:
    """Route every ``DualBatchNorm`` of ``model`` through ``branch`` ('normal' or 'pgd'); restore afterwards."""
    if branch not in BRANCHES:
        raise ValueError(f"unknown BN branch {branch!r}; allowed: {BRANCHES}")
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm)]
    before = [m.branch for m in duals]
    for m in duals:
        m.branch = branch
    try:
        yield model
    finally:
        for m, b in zip(duals, before):
            m.branch = b


# ===================================================================================== encoder and head
def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(path, module) of the classification head: the network's last ``nn.Linear``.

    True of every zoo architecture (the head is the last layer registered and the last applied);
    ``check_head`` verifies the "last applied" part on real inputs.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError("model.name", getattr(model, "name", type(model).__name__),
                          "a network whose last nn.Linear is its classification head", "ACL needs an encoder")
    return found[-1]   # type: ignore[return-value]


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def encoder_of(classifier: nn.Module) -> nn.Module:
    """A copy of ``classifier`` (normalization included) whose head is the identity: returns the features."""
    enc = copy.deepcopy(classifier)
    path, _ = find_head(enc)
    _set_submodule(enc, path, nn.Identity())
    return enc


@torch.no_grad()
def check_head(classifier: nn.Module, x: torch.Tensor) -> None:
    """Raise unless classifier(x) == head(encoder(x)) in eval mode, i.e. the head is applied last."""
    path, head = find_head(classifier)
    enc = encoder_of(classifier)
    with eval_frozen(classifier, warn_train=False), eval_frozen(enc, warn_train=False):
        ok = torch.allclose(classifier(x), head(enc(x)), rtol=1e-4, atol=1e-5)
    if not ok:
        raise ConfigError("model.name", getattr(classifier, "name", type(classifier).__name__),
                          "a network whose last nn.Linear is applied last, to the features",
                          f"{path} is not the final layer of this network")


class ProjectionHead(nn.Module):
    """SimCLR projection MLP with BatchNorm after every linear layer (the ACL head): for ``dims`` = (h, o),
    Linear(d, h) - BN - ReLU - Linear(h, o, no bias) - BN. Input (B, d), output (B, o)."""

    def __init__(self, in_dim: int, dims: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = int(in_dim)
        for i, h in enumerate(dims):
            # a bias before BN is redundant; the first layer keeps one, as in the authors' head
            layers += [nn.Linear(d, int(h), bias=(i == 0)), nn.BatchNorm1d(int(h))]
            if i < len(dims) - 1:
                layers.append(nn.ReLU())
            d = int(h)
        self.layers = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


class ContrastiveModel(nn.Module):
    """encoder (the classifier minus its head, normalization included) -> projection head, all BN dual.

    Input (B, C, H, W) in [0, 1]; output (B, o) projections. ``features`` gives the encoder output (B, d).
    """

    def __init__(self, classifier: nn.Module, proj_dims: Sequence[int] | None = None) -> None:
        super().__init__()
        _, head = find_head(classifier)
        self.feature_dim = int(head.in_features)
        self.encoder = encoder_of(classifier)
        self.head = ProjectionHead(self.feature_dim, list(proj_dims) if proj_dims else
                                   [self.feature_dim, self.feature_dim])
        self.n_dual = convert_dual_bn(self)
        self.bounds = tuple(getattr(classifier, "bounds", (0.0, 1.0)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def load_pretrained(classifier: nn.Module, cmodel: ContrastiveModel, branch: str = "pgd") -> None:
    """Initialise ``classifier`` (in place) from ``cmodel``'s encoder with the BN set of ``branch``, and a zero
    classification head (the authors' fine-tuning start). Every other tensor is copied exactly, so in eval
    mode the classifier's features equal the encoder's features in that branch bit for bit."""
    head_path, _ = find_head(classifier)
    enc_sd = cmodel.encoder.state_dict()
    bn_paths = {n for n, m in classifier.named_modules() if isinstance(m, _BatchNorm)}
    new: dict[str, torch.Tensor] = {}
    for key, value in classifier.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod == head_path:
            new[key] = torch.zeros_like(value)
            continue
        src = f"{mod}.{branch}.{leaf}" if mod in bn_paths else key
        if src not in enc_sd:
            raise RuntimeError(f"pre-trained encoder has no tensor {src!r} for classifier tensor {key!r}")
        new[key] = enc_sd[src].detach().clone().to(value.device)
    classifier.load_state_dict(new, strict=True)


# ============================================================================================ the loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (SimCLR) of two views: ``z1``, ``z2`` (N, D), positive pairs (z1[i], z2[i]).

    With s the cosine similarity over all 2N projections, anchor a with positive p(a):
    l_a = -log( exp(s(a, p(a)) / t) / sum_{k != a} exp(s(a, k) / t) ); returns the mean over all 2N anchors.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.t()) / temperature
    self_pair = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_pair, float("-inf"))   # the anchor is not its own negative
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def contrastive_pgd(model: ContrastiveModel, x1: torch.Tensor, x2: torch.Tensor, *, eps: float,
                    step_size: float, steps: int, views: str = "both", random_start: bool = True,
                    temperature: float = 0.5, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """L-inf PGD maximizing NT-Xent(model(x1'), model(x2')) over both views (``views='both'``: A2A, DS) or
    the second only (``'second'``: A2S), in eval mode on the pgd BN (the caller's modes and branches are
    restored). Views (B, C, H, W) in the model's bounds; returns the adversarial views, each within ``eps``
    of its clean view and inside the bounds (an unattacked view is returned unchanged)."""
    if views not in ("both", "second"):
        raise ValueError(f"views must be 'both' or 'second', got {views!r}")
    lower, upper = getattr(model, "bounds", (0.0, 1.0))
    n = x1.shape[0]
    clean = (x1.detach(), x2.detach())
    attacked = (views == "both", True)
    adv = []
    for x, a in zip(clean, attacked):
        if a and random_start:
            adv.append(project(random_in_ball(x, eps, Norm.LINF, generator), x, eps, Norm.LINF, lower, upper))
        else:
            adv.append(x.clone())
    with eval_frozen(model, warn_train=False), bn_branch(model, "pgd"):
        for _ in range(int(steps)):
            for i, a in enumerate(attacked):
                if a:
                    adv[i].requires_grad_(True)
            z = model(torch.cat(adv))
            loss = nt_xent(z[:n], z[n:], temperature)
            inputs = [adv[i] for i, a in enumerate(attacked) if a]
            grads = torch.autograd.grad(loss, inputs)
            with torch.no_grad():
                gi = iter(grads)
                for i, a in enumerate(attacked):
                    if a:
                        adv[i] = project(adv[i].detach() + step_size * next(gi).sign(), clean[i], eps, Norm.LINF,
                                         lower, upper)
    return adv[0].detach(), adv[1].detach()


# ====================================================================================== augmentations
def _rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W), ITU-R 601 luma (the weights torchvision uses)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    dc = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # sector i -> (r, g, b) from (v, q, p, p, t, v) / (t, v, v, q, p, p) / (p, p, t, v, v, q)
    cand = torch.stack([v, q, p, t], 0)   # indices 0..3
    r_i = torch.tensor([0, 1, 2, 2, 3, 0], device=h.device)[i]
    g_i = torch.tensor([3, 0, 0, 1, 2, 2], device=h.device)[i]
    b_i = torch.tensor([2, 2, 3, 0, 0, 1], device=h.device)[i]
    pick = lambda idx: cand.gather(0, idx.unsqueeze(0)).squeeze(0)  # noqa: E731
    return torch.stack([pick(r_i), pick(g_i), pick(b_i)], 1)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def color_jitter(x: torch.Tensor, strength: Sequence[float], p: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision-style ColorJitter(brightness, contrast, saturation, hue) applied with probability ``p`` per
    image, its four operations in a random order per image. ``x`` (B, 3, H, W) in [0, 1]."""
    b_, c_, s_, h_ = (float(v) for v in strength)
    n, dev = x.shape[0], x.device
    apply = torch.rand(n, generator=generator, device=dev) < p
    fb, fc = _uniform(n, max(0.0, 1 - b_), 1 + b_, generator, dev), _uniform(n, max(0.0, 1 - c_), 1 + c_, generator, dev)
    fs, fh = _uniform(n, max(0.0, 1 - s_), 1 + s_, generator, dev), _uniform(n, -h_, h_, generator, dev)
    order = torch.argsort(torch.rand(n, 4, generator=generator, device=dev), dim=1)
    v = lambda f, m: f[m].view(-1, 1, 1, 1)  # noqa: E731

    def op(k: int, xs: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if k == 0:
            return (xs * v(fb, m)).clamp(0, 1)
        if k == 1:
            mean = _rgb_to_gray(xs).mean(dim=(1, 2, 3), keepdim=True)
            return (v(fc, m) * xs + (1 - v(fc, m)) * mean).clamp(0, 1)
        if k == 2:
            return (v(fs, m) * xs + (1 - v(fs, m)) * _rgb_to_gray(xs)).clamp(0, 1)
        hsv = _rgb_to_hsv(xs)
        hsv = torch.stack([(hsv[:, 0] + fh[m].view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
        return _hsv_to_rgb(hsv).clamp(0, 1)

    out = x.clone()
    for pos in range(4):
        for k in range(4):
            m = apply & (order[:, pos] == k)
            if m.any():
                out[m] = op(k, out[m], m)
    return out


def simclr_augment(x: torch.Tensor, generator: torch.Generator, *, crop_scale: Sequence[float],
                   crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: bool = True,
                   jitter: Sequence[float] | None = (0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8,
                   gray_p: float = 0.2) -> torch.Tensor:
    """One SimCLR view of each image of ``x`` (B, C, H, W) in [0, 1], on ``x``'s device, randomness from
    ``generator`` only: RandomResizedCrop(scale, ratio) back to (H, W) with bicubic interpolation (the
    authors' choice) and a horizontal flip with probability 0.5 (one resampling); then, on colour images
    only (C = 3) and if ``jitter`` is given, colour jitter with probability ``jitter_p`` and grayscale with
    probability ``gray_p``. Output (B, C, H, W) in [0, 1]."""
    b, c, h, w = x.shape
    dev = x.device
    tries = 10   # as torchvision: sample up to 10 (scale, ratio) pairs, keep the first that fits
    area = _uniform(b * tries, float(crop_scale[0]), float(crop_scale[1]), generator, dev).view(b, tries) * (h * w)
    logr = _uniform(b * tries, math.log(crop_ratio[0]), math.log(crop_ratio[1]), generator, dev).view(b, tries)
    cw = torch.round(torch.sqrt(area * torch.exp(logr)))
    ch = torch.round(torch.sqrt(area / torch.exp(logr)))
    fits = (cw >= 1) & (ch >= 1) & (cw <= w) & (ch <= h)
    first = fits.float().argmax(1, keepdim=True)
    any_fit = fits.any(1)
    cw = torch.where(any_fit, cw.gather(1, first).squeeze(1), torch.full_like(any_fit, w, dtype=cw.dtype))
    ch = torch.where(any_fit, ch.gather(1, first).squeeze(1), torch.full_like(any_fit, h, dtype=ch.dtype))
    left = torch.floor(torch.rand(b, generator=generator, device=dev) * (w - cw + 1))
    top = torch.floor(torch.rand(b, generator=generator, device=dev) * (h - ch + 1))
    flip = (torch.rand(b, generator=generator, device=dev) < 0.5) if hflip else torch.zeros(b, dtype=torch.bool,
                                                                                              device=dev)
    # affine map from output to input coordinates (normalized, align_corners=False: -1/+1 are pixel edges)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = (cw / w) * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = 2 * (left + cw / 2) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = 2 * (top + ch / 2) / h - 1
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(0, 1)
    if c == 3 and jitter is not None:
        out = color_jitter(out, jitter, jitter_p, generator)
        gray = torch.rand(b, generator=generator, device=dev) < gray_p
        out = torch.where(gray.view(b, 1, 1, 1), _rgb_to_gray(out).expand(-1, 3, -1, -1), out)
    return out


# ================================================================================================ LARS
class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017) in the form the ACL release uses: per
    parameter tensor w with gradient g, local = eta ||w|| / (||g|| + wd ||w||) (1 when either norm is ~0),
    v <- momentum v + lr local (g + wd w), w <- w - v. Applied to every tensor (BN and biases included)."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mom, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                wn, gn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                local = torch.where((wn > 1e-15) & (gn > 1e-15), eta * wn / (gn + wd * wn), torch.ones_like(wn))
                upd = (g + wd * p) * (lr * local)
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                buf = st["momentum_buffer"]
                buf.mul_(mom).add_(upd)
                p.sub_(buf)
        return loss


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step ``step`` (1-based): linear warm-up from lr / warmup to lr over
    ``warmup`` steps, then cosine decay to ``min_lr`` at ``total`` (the authors' per-step schedule)."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    span = max(total - warmup, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


# ============================================================================================= configs
def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _number(key: str, v: Any, lo: float, strict: bool = False, hi: float | None = None) -> float:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (v > lo if strict else v >= lo)
    if ok and hi is not None:
        ok = v <= hi
    if not ok:
        rng = f"{'>' if strict else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ConfigError(key, v, f"a number {rng}")
    return float(v)


def _integer(key: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(key, v, f"an integer >= {lo}")
    return int(v)


def _from_dict(cls: type, d: Any, key: str) -> Any:
    d = dict(_plain(d) or {})
    check_known_fields(cls, d, key)
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Pre-training settings (``defense.pretrain.*``); all enter the encoder's cache key.

    Defaults are the authors' CIFAR-10 values except ``epochs``/``batch_size``/``max_train`` (CPU-sized in
    ``conf/defense/acl.yaml``). ``crop_scale: null`` picks per dataset: (0.1, 1) on colour data (the paper),
    (0.3, 1) on grayscale data (see ``docs/acl.md``: a 10%-area crop of a 28 x 28 image is a 9 x 9 patch).
    ``hflip: null`` follows the data card (no flips on digits).
    """

    epochs: int = 1000
    batch_size: int = 512
    optimizer: str = "lars"
    lr: float = 5.0
    momentum: float = 0.9
    weight_decay: float = 1e-6
    eta: float = 0.001               # LARS trust coefficient
    warmup_epochs: float = 10.0
    min_lr: float = 1e-6
    max_train: int = 0               # >0: pre-train on the first N training points only
    eps: float = 8 / 255             # contrastive PGD, L-inf, input space
    step_size: float = 2 / 255
    steps: int = 5
    random_start: bool = True
    crop_scale: Any = None           # [lo, hi] area fraction, or null (per dataset)
    crop_ratio: Any = (3 / 4, 4 / 3)
    hflip: Any = None                # true / false / null (data card)
    color_jitter: Any = (0.4, 0.4, 0.4, 0.1)   # brightness, contrast, saturation, hue; null: none
    jitter_p: float = 0.8
    gray_p: float = 0.2

    def validate(self, key: str = "defense.pretrain") -> "PretrainConfig":
        _integer(f"{key}.epochs", self.epochs, 0)
        _integer(f"{key}.batch_size", self.batch_size, 2)
        if self.optimizer not in PRETRAIN_OPTIMIZERS:
            raise ConfigError(f"{key}.optimizer", self.optimizer, PRETRAIN_OPTIMIZERS)
        _number(f"{key}.lr", self.lr, 0, strict=True)
        _number(f"{key}.momentum", self.momentum, 0, hi=1)
        _number(f"{key}.weight_decay", self.weight_decay, 0)
        _number(f"{key}.eta", self.eta, 0, strict=True)
        _number(f"{key}.warmup_epochs", self.warmup_epochs, 0)
        _number(f"{key}.min_lr", self.min_lr, 0)
        _integer(f"{key}.max_train", self.max_train, 0)
        _number(f"{key}.eps", self.eps, 0, strict=True, hi=1)
        _number(f"{key}.step_size", self.step_size, 0, strict=True)
        _integer(f"{key}.steps", self.steps, 1)
        for name in ("crop_scale", "crop_ratio"):
            v = getattr(self, name)
            if v is None and name == "crop_scale":
                continue
            if (not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(a, (int, float)) for a in v)
                    or not 0 < v[0] <= v[1] or (name == "crop_scale" and v[1] > 1)):
                raise ConfigError(f"{key}.{name}", v, "[lo, hi] with 0 < lo <= hi" +
                                  (" <= 1 (area fractions), or null (per dataset)" if name == "crop_scale" else ""))
        if self.hflip not in (None, True, False):
            raise ConfigError(f"{key}.hflip", self.hflip, "true, false or null (the data card's choice)")
        cj = self.color_jitter
        if cj is not None and (not isinstance(cj, (list, tuple)) or len(cj) != 4
                               or not all(isinstance(a, (int, float)) and a >= 0 for a in cj) or cj[3] > 0.5):
            raise ConfigError(f"{key}.color_jitter", cj, "[brightness, contrast, saturation, hue] >= 0 (hue <= "
                              "0.5), or null")
        _number(f"{key}.jitter_p", self.jitter_p, 0, hi=1)
        _number(f"{key}.gray_p", self.gray_p, 0, hi=1)
        return self

    def spec(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


@dataclasses.dataclass(frozen=True)
class DownstreamConfig:
    """Fine-tuning settings besides the recipe (``defense.downstream.*``); they enter the checkpoint key.

    ``eps``/``step_size``/``steps``/``beta``/``trades_init_std``: the TRADES inner maximization of ALF/AFF
    (the authors: 10 steps of 2/255 at 8/255, beta 6). Model selection: after every epoch the robust
    accuracy (``select_by='robust'``; PGD-CE, ``select_steps`` steps of ``select_step_size``, at
    ``select_eps``, random start) or the clean accuracy on the first ``select_n`` validation points (0: the
    whole validation split); the best epoch's weights are kept (the first on ties). ``select_by='last'``
    keeps the last epoch.
    """

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    beta: float = 6.0
    trades_init_std: float = 0.001
    select_by: str = "robust"
    select_n: int = 0                # 0: the whole validation split (data.n_val)
    select_steps: int = 10
    select_step_size: Any = None     # null: 2.5 * select_eps / select_steps
    select_eps: Any = None           # null: eps

    def validate(self, key: str = "defense.downstream") -> "DownstreamConfig":
        _number(f"{key}.eps", self.eps, 0, strict=True, hi=1)
        _number(f"{key}.step_size", self.step_size, 0, strict=True)
        _integer(f"{key}.steps", self.steps, 1)
        _number(f"{key}.beta", self.beta, 0)
        _number(f"{key}.trades_init_std", self.trades_init_std, 0)
        if self.select_by not in SELECT_BY:
            raise ConfigError(f"{key}.select_by", self.select_by, SELECT_BY)
        _integer(f"{key}.select_n", self.select_n, 0)
        _integer(f"{key}.select_steps", self.select_steps, 1)
        if self.select_step_size is not None:
            _number(f"{key}.select_step_size", self.select_step_size, 0, strict=True)
        if self.select_eps is not None:
            _number(f"{key}.select_eps", self.select_eps, 0, strict=True, hi=1)
        return self

    @property
    def sel_eps(self) -> float:
        return float(self.select_eps if self.select_eps is not None else self.eps)

    @property
    def sel_step(self) -> float:
        return float(self.select_step_size if self.select_step_size is not None
                     else 2.5 * self.sel_eps / self.select_steps)

    def spec(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ========================================================================================= pre-training
def contrastive_loss(cmodel: ContrastiveModel, v1: torch.Tensor, v2: torch.Tensor, variant: str,
                     cfg: PretrainConfig, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """The pre-training loss of ``variant`` for two views (B, C, H, W) of a batch; ``cmodel`` in train mode."""
    n = v1.shape[0]
    attack = dict(eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps, random_start=cfg.random_start,
                  temperature=temperature, generator=generator)
    if variant == "simclr":
        with bn_branch(cmodel, "normal"):
            z = cmodel(torch.cat([v1, v2]))
        return nt_xent(z[:n], z[n:], temperature)
    if variant == "a2a":
        a1, a2 = contrastive_pgd(cmodel, v1, v2, views="both", **attack)
        with bn_branch(cmodel, "pgd"):
            z = cmodel(torch.cat([a1, a2]))
        return nt_xent(z[:n], z[n:], temperature)
    if variant == "a2s":
        _, a2 = contrastive_pgd(cmodel, v1, v2, views="second", **attack)
        with bn_branch(cmodel, "normal"):
            z1 = cmodel(v1)
        with bn_branch(cmodel, "pgd"):
            z2 = cmodel(a2)
        return nt_xent(z1, z2, temperature)
    if variant == "ds":
        a1, a2 = contrastive_pgd(cmodel, v1, v2, views="both", **attack)
        with bn_branch(cmodel, "normal"):
            z = cmodel(torch.cat([v1, v2]))
        with bn_branch(cmodel, "pgd"):
            za = cmodel(torch.cat([a1, a2]))
        return 0.5 * nt_xent(z[:n], z[n:], temperature) + 0.5 * nt_xent(za[:n], za[n:], temperature)
    raise ConfigError("defense.variant", variant, [v for v in VARIANTS if v != "none"])


def augment_settings(cfg: PretrainConfig, card: data_mod.DataCard) -> dict[str, Any]:
    """The augmentation keyword arguments for ``card``'s data (per-dataset defaults resolved)."""
    colour = card.channels == 3
    scale = cfg.crop_scale if cfg.crop_scale is not None else ((0.1, 1.0) if colour else (0.3, 1.0))
    return {"crop_scale": tuple(float(s) for s in scale), "crop_ratio": tuple(float(r) for r in cfg.crop_ratio),
            "hflip": card.hflip if cfg.hflip is None else bool(cfg.hflip),
            "jitter": tuple(cfg.color_jitter) if (colour and cfg.color_jitter is not None) else None,
            "jitter_p": cfg.jitter_p, "gray_p": cfg.gray_p}


def pretrain(cmodel: ContrastiveModel, x_train: torch.Tensor, card: data_mod.DataCard, cfg: PretrainConfig,
             variant: str, temperature: float, device: torch.device, seed: int,
             progress: bool = False) -> dict[str, Any]:
    """Pre-train ``cmodel`` in place on ``x_train`` (N, C, H, W) uint8 or [0, 1] float (labels unused).

    Batches of ``cfg.batch_size`` images (the last incomplete batch is dropped: every step contrasts the same
    number of negatives), two augmented views each. Returns a history (per-epoch mean loss, seconds).
    """
    x = x_train[:cfg.max_train] if cfg.max_train > 0 else x_train
    n = x.shape[0]
    bs = min(cfg.batch_size, n)
    if bs < 2:
        raise ConfigError("defense.pretrain.max_train", cfg.max_train, "at least 2 training points")
    steps_per_epoch = n // bs
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    order_g = torch.Generator().manual_seed(int(seed))
    dev_g = torch.Generator(device=device).manual_seed(int(seed) + 1)   # augmentation and attack starts
    aug = augment_settings(cfg, card)
    cmodel.to(device)
    params = [p for p in cmodel.parameters() if p.requires_grad]
    if cfg.optimizer == "lars":
        opt: torch.optim.Optimizer = LARS(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                          eta=cfg.eta)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    hist: dict[str, Any] = {"epoch": [], "loss": [], "lr": [], "seconds": []}
    t0, step = time.time(), 0
    for epoch in range(cfg.epochs):
        cmodel.train()
        perm = torch.randperm(n, generator=order_g)
        total_loss = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"ACL {variant} pre-training {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False, mininterval=2.0)
        for i in bar:
            step += 1
            lr = warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr)
            for gr in opt.param_groups:
                gr["lr"] = lr
            xb = data_mod.to_float(x[perm[i * bs:(i + 1) * bs]]).to(device, non_blocking=True)
            v1, v2 = simclr_augment(xb, dev_g, **aug), simclr_augment(xb, dev_g, **aug)
            loss = contrastive_loss(cmodel, v1, v2, variant, cfg, temperature, dev_g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += float(loss.detach())
            bar.set_postfix(loss=f"{total_loss / (i + 1):.3f}", refresh=False)
        hist["epoch"].append(epoch + 1)
        hist["loss"].append(total_loss / max(steps_per_epoch, 1))
        hist["lr"].append(opt.param_groups[0]["lr"])
        hist["seconds"].append(time.time() - t0)
        log.info("ACL %s pre-training epoch %d/%d: NT-Xent %.4f (%.0fs)", variant, epoch + 1, cfg.epochs,
                 hist["loss"][-1], time.time() - t0)
    cmodel.eval()
    return hist


# ========================================================================================== fine-tuning
def _robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
                     seed: int, batch_size: int = 500) -> tuple[float, float]:
    """(clean, PGD robust) accuracy of ``model`` on float ``x`` in [0, 1]; fixed random starts per call."""
    if x.shape[0] == 0:
        return float("nan"), float("nan")
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    atk = PGD(norm="linf", steps=steps, step_size=step, random_start=True)
    clean = robust = 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        ok = predict(model, xb) == yb
        res = atk(model, xb, yb, eps=eps, generator=gen)
        clean += int(ok.sum())
        robust += int((ok & ~res.success).sum())
    return clean / x.shape[0], robust / x.shape[0]


def finetune(model: nn.Module, splits: data_mod.Splits, recipe: Any, protocol: str, cfg: DownstreamConfig,
             device: torch.device, seed: int, progress: bool = False) -> dict[str, Any]:
    """Fine-tune ``model`` (a Classifier) in place with ``protocol`` and the run's ``recipe``; keep the epoch
    selected on validation data. Returns a history (per epoch: train loss, validation clean and robust
    accuracy; ``selected_epoch``)."""
    from robustbench_lab.core.train import build_scheduler as _scheduler   # the run's schedules

    x_tr, y_tr = splits.x_train, splits.y_train
    if recipe.max_train > 0:
        x_tr, y_tr = x_tr[:recipe.max_train], y_tr[:recipe.max_train]
    n_sel = splits.x_val.shape[0] if cfg.select_n == 0 else min(cfg.select_n, splits.x_val.shape[0])
    if cfg.select_by != "last" and n_sel == 0:
        raise ConfigError("data.n_val", splits.x_val.shape[0], "> 0 (or defense.downstream.select_by=last)",
                          "ACL selects the fine-tuned epoch on validation data")
    xv = data_mod.to_float(splits.x_val[:n_sel]).to(device)
    yv = splits.y_val[:n_sel].to(device)
    head_path, head = find_head(model)
    linear = protocol in ("slf", "alf")
    grads = {p: p.requires_grad for p in model.parameters()}
    if linear:   # frozen encoder: only the head learns
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                                                     nesterov=recipe.nesterov and recipe.momentum > 0,
                                                     weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(x_tr.shape[0] / recipe.batch_size)
    sched = _scheduler(opt, recipe, steps_per_epoch * recipe.epochs)
    trades = AdversarialTrainingProcedure("trades", PGD(norm="linf", steps=cfg.steps, step_size=cfg.step_size),
                                          cfg.eps, cfg.beta, cfg.trades_init_std)
    g = torch.Generator().manual_seed(int(seed))                      # order and augmentation
    dev_g = torch.Generator(device=device).manual_seed(int(seed) + 1)  # TRADES starts
    model.to(device)
    hist: dict[str, Any] = {"epoch": [], "train_loss": [], "val_accuracy": [], "val_robust_accuracy": [],
                            "seconds": [], "selected_epoch": 0, "protocol": protocol}
    best_score, best_state = -math.inf, None
    t0 = time.time()
    try:
        for epoch in range(recipe.epochs):
            model.train()
            if linear:   # BN of a frozen encoder keeps its pre-trained statistics
                model.eval()
                head.train()
            total, n = 0.0, 0
            bar = tqdm(data_mod.batches(x_tr, y_tr, recipe.batch_size, shuffle=True, generator=g),
                       total=steps_per_epoch, desc=f"ACL {protocol} fine-tuning {epoch + 1}/{recipe.epochs}",
                       disable=not progress, leave=False, mininterval=2.0)
            for xb, yb in bar:
                xb = data_mod.to_float(xb)
                if recipe.augment:
                    xb = data_mod.augment(xb, splits.card, g)
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                if protocol == "slf":
                    loss = F.cross_entropy(model(xb), yb, label_smoothing=recipe.label_smoothing)
                else:
                    loss = trades.loss(model, xb, yb, dev_g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * yb.shape[0]
                n += yb.shape[0]
                bar.set_postfix(loss=f"{total / n:.3f}", refresh=False)
            model.eval()
            if cfg.select_by == "robust" or (n_sel and epoch == recipe.epochs - 1):
                clean, rob = _robust_accuracy(model, xv, yv, cfg.sel_eps, cfg.sel_step, cfg.select_steps, seed + 2)
            else:
                clean, rob = (float((predict(model, xv) == yv).float().mean()) if n_sel else float("nan"),
                              float("nan"))
            hist["epoch"].append(epoch + 1)
            hist["train_loss"].append(total / max(n, 1))
            hist["val_accuracy"].append(clean)
            hist["val_robust_accuracy"].append(rob)
            hist["seconds"].append(time.time() - t0)
            score = {"robust": rob, "clean": clean, "last": float(epoch)}[cfg.select_by]
            if score > best_score:   # strict: the first best epoch on ties
                best_score, best_state = score, copy.deepcopy(model.state_dict())
                hist["selected_epoch"] = epoch + 1
            log.info("ACL %s fine-tuning epoch %d/%d: loss %.4f, val clean %.4f, val robust %.4f (%.0fs)", protocol,
                     epoch + 1, recipe.epochs, total / max(n, 1), clean, rob, time.time() - t0)
    finally:
        for p, r in grads.items():
            p.requires_grad_(r)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return hist


# ================================================================================ the training procedure
class ACLProcedure:
    """Implements ``robustbench_lab.core.defense_base.TrainingProcedure`` plus ``fit`` (the whole two-stage
    training, which ``get_or_train`` calls instead of its standard loop). ``loss`` is the fine-tuning loss."""

    def __init__(self, variant: str, protocol: str, temperature: float, proj_dims: list[int] | None,
                 transfer_bn: str, pretrain: PretrainConfig, downstream: DownstreamConfig) -> None:
        self.variant, self.protocol = variant, protocol
        self.temperature = float(temperature)
        self.proj_dims = proj_dims
        self.transfer_bn = transfer_bn
        self.pretrain_cfg, self.downstream = pretrain, downstream
        self.last_fit: dict[str, Any] | None = None

    @property
    def branch(self) -> str:
        """The BN set carried into the classifier: the adversarial branch's, except for SimCLR (never trains
        its pgd set)."""
        if self.transfer_bn != "auto":
            return self.transfer_bn
        return "normal" if self.variant == "simclr" else "pgd"

    def pretrain_spec(self) -> dict[str, Any]:
        if self.variant == "none":
            return {"variant": "none"}
        return {"variant": self.variant, "temperature": self.temperature, "proj_dims": self.proj_dims,
                **self.pretrain_cfg.spec()}

    def spec(self) -> dict[str, Any]:
        return {"procedure": "acl", "acl_version": ACL_CODE_VERSION, "pretrain": self.pretrain_spec(),
                "downstream": {"protocol": self.protocol,
                               "transfer_bn": self.branch if self.variant != "none" else None,
                               **self.downstream.spec()}}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.protocol == "slf":
            return F.cross_entropy(model(x), y)
        d = self.downstream
        return AdversarialTrainingProcedure("trades", PGD(norm="linf", steps=d.steps, step_size=d.step_size), d.eps,
                                            d.beta, d.trades_init_std).loss(model, x, y, generator)

    def encoder_key_spec(self, run_spec: Mapping[str, Any] | None) -> dict[str, Any]:
        """The cache spec of the pre-trained encoder: the run's model, data split and seed, and the
        pre-training settings; nothing of the fine-tuning (so downstream sweeps share it)."""
        rs = dict(run_spec or {})
        return {"stage": "acl_pretrain", "version": rs.get("version"), "acl_version": ACL_CODE_VERSION,
                "model": rs.get("model"), "data": rs.get("data"), "seed": rs.get("seed"),
                "pretrain": self.pretrain_spec()}

    def get_or_pretrain(self, model: nn.Module, splits: data_mod.Splits, device: torch.device, seed: int,
                        cache: CheckpointCache | None, run_spec: Mapping[str, Any] | None,
                        progress: bool) -> tuple[ContrastiveModel, dict[str, Any]]:
        """The pre-trained contrastive model for ``model``'s architecture: from the cache, or pre-trained
        now (and stored). Returns it and its info (key, cache_hit, history)."""
        check_head(model, data_mod.to_float(splits.x_train[:2]).to(next(model.parameters()).device))
        with torch.random.fork_rng(devices=[]):   # the projection head's init, without touching the caller's RNG
            torch.manual_seed(int(seed) + 7)
            cmodel = ContrastiveModel(model, self.proj_dims)
        if cmodel.n_dual == 0:
            log.warning("ACL: %s has no BatchNorm; the normal and pgd branches are one and the same network",
                        getattr(model, "name", "the model"))
        spec = self.encoder_key_spec(run_spec)
        key = content_key(spec)
        if cache is not None:
            meta = cache.load(key, cmodel, spec)
            if meta is None:
                with cache.lock(key):   # a parallel job pre-training the same encoder: wait, then load it
                    meta = cache.load(key, cmodel, spec)
                    if meta is None:
                        hist = pretrain(cmodel, splits.x_train, splits.card, self.pretrain_cfg, self.variant,
                                        self.temperature, device, seed, progress)
                        cache.save(key, cmodel.cpu(), spec, {"history": hist})
                        cmodel.to(device)
                        log.info("ACL: pre-trained encoder stored as %s", cache.weights_path(key))
                        return cmodel, {"key": key, "cache_hit": False, "history": hist}
            log.info("ACL: loaded the pre-trained encoder %s", cache.weights_path(key))
            return cmodel.to(device), {"key": key, "cache_hit": True, "history": meta.get("history")}
        hist = pretrain(cmodel, splits.x_train, splits.card, self.pretrain_cfg, self.variant, self.temperature,
                        device, seed, progress)
        return cmodel, {"key": key, "cache_hit": False, "history": hist}

    def fit(self, model: nn.Module, splits: data_mod.Splits, recipe: Any, device: torch.device, seed: int, *,
            cache: CheckpointCache | None = None, spec: Mapping[str, Any] | None = None,
            progress: bool = False) -> dict[str, Any]:
        """Pre-train (or load the cached encoder), initialise ``model`` from it, fine-tune. In place.

        Returns the history ``get_or_train`` stores with the checkpoint: the fine-tuning history, with
        ``seconds`` counted from the start of ``fit`` (pre-training included when it ran here), and the
        pre-training's (``pretrain``)."""
        t0 = time.time()
        model.to(device)
        pre: dict[str, Any] = {"key": None, "cache_hit": None, "history": None}
        if self.variant != "none":
            cmodel, pre = self.get_or_pretrain(model, splits, device, seed, cache, spec, progress)
            load_pretrained(model, cmodel, self.branch)
            del cmodel
        t_ft = time.time() - t0
        hist = finetune(model, splits, recipe, self.protocol, self.downstream, device, seed, progress)
        hist["seconds"] = [t_ft + s for s in hist["seconds"]]
        hist["pretrain"] = {**pre, "seconds": t_ft}
        hist["variant"], hist["transfer_bn"] = self.variant, (self.branch if self.variant != "none" else None)
        self.last_fit = hist
        return hist


class ACL(Defense):
    """Adversarial contrastive pre-training + a downstream protocol (a training procedure; identity transform).

    ``variant``: none | simclr | a2a | a2s | ds. ``protocol``: slf | alf | aff. ``temperature``: NT-Xent's
    (0.5). ``proj_dims``: the projection head's layer widths (null: [d, d], d the encoder's feature width;
    the paper's 512-512-512 on ResNet-18). ``transfer_bn``: auto (pgd, or normal for simclr) | normal | pgd.
    ``pretrain`` / ``downstream``: ``PretrainConfig`` / ``DownstreamConfig`` fields. The fine-tuning recipe is
    the run's ``model.train``.
    """

    name = "acl"

    def __init__(self, *, variant: str = "ds", protocol: str = "aff", temperature: float = 0.5,
                 proj_dims: Sequence[int] | None = None, transfer_bn: str = "auto",
                 pretrain: Mapping[str, Any] | None = None, downstream: Mapping[str, Any] | None = None) -> None:
        if variant not in VARIANTS:
            raise ConfigError("defense.variant", variant, VARIANTS)
        if protocol not in PROTOCOLS:
            raise ConfigError("defense.protocol", protocol, PROTOCOLS)
        _number("defense.temperature", temperature, 0, strict=True)
        proj_dims = _plain(proj_dims)
        if proj_dims is not None and (not isinstance(proj_dims, (list, tuple)) or not proj_dims or
                                      not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                              for d in proj_dims)):
            raise ConfigError("defense.proj_dims", proj_dims, "a non-empty list of positive integers, or null "
                              "([d, d] with d the encoder's feature width)")
        if transfer_bn not in TRANSFER_BN:
            raise ConfigError("defense.transfer_bn", transfer_bn, TRANSFER_BN)
        try:
            pre = _from_dict(PretrainConfig, pretrain, "defense.pretrain").validate()
            down = _from_dict(DownstreamConfig, downstream, "defense.downstream").validate()
        except TypeError as e:   # a wrong type the dataclass cannot take
            raise ConfigError("defense", pretrain, "PretrainConfig / DownstreamConfig fields", str(e)) from e
        self.procedure = ACLProcedure(variant, protocol, float(temperature),
                                      [int(d) for d in proj_dims] if proj_dims is not None else None,
                                      transfer_bn, pre, down)

    def training_procedure(self) -> ACLProcedure:
        return self.procedure

    def describe(self) -> dict[str, Any]:
        # the spec only: metrics.json must not differ between a fresh and a cached checkpoint; the training
        # history (selected epoch, validation robust accuracy, pre-training loss) is in the checkpoint sidecar
        return self.procedure.spec()
