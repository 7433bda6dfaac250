"""SimCLR views: random resized crop, horizontal flip, colour jitter and grayscale, per image.

The image operations are torchvision's (``torchvision.transforms.v2.functional``); the random parameters
are drawn here, per image, from the caller's ``torch.Generator`` only, because torchvision's transforms
draw from the global RNG and a view must be reproducible from the run's seed alone. The parameter laws are
torchvision's (``RandomResizedCrop.get_params``, ``ColorJitter``, ``RandomGrayscale``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from defenses.acl.settings import PretrainConfig
from robustbench_lab.core.data import DataCard

CROP_TRIES = 10   # as torchvision: up to 10 (scale, ratio) draws, the first that fits is kept


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def crop_boxes(b: int, h: int, w: int, scale: Sequence[float], ratio: Sequence[float],
               generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(b, 4) integer boxes (top, left, height, width) of RandomResizedCrop: area fraction uniform in
    ``scale``, log aspect ratio (width / height) uniform in log ``ratio``; the whole image when no draw fits."""
    area = _uniform(b * CROP_TRIES, float(scale[0]), float(scale[1]), generator, device).view(b, -1) * (h * w)
    logr = _uniform(b * CROP_TRIES, math.log(ratio[0]), math.log(ratio[1]), generator, device).view(b, -1)
    cw = torch.round(torch.sqrt(area * torch.exp(logr)))
    ch = torch.round(torch.sqrt(area / torch.exp(logr)))
    fits = (cw >= 1) & (ch >= 1) & (cw <= w) & (ch <= h)
    first = fits.float().argmax(1, keepdim=True)
    any_fit = fits.any(1)
    cw = torch.where(any_fit, cw.gather(1, first).squeeze(1), torch.full_like(cw[:, 0], w))
    ch = torch.where(any_fit, ch.gather(1, first).squeeze(1), torch.full_like(ch[:, 0], h))
    left = torch.floor(torch.rand(b, generator=generator, device=device) * (w - cw + 1))
    top = torch.floor(torch.rand(b, generator=generator, device=device) * (h - ch + 1))
    return torch.stack([top, left, ch, cw], 1).long()


def color_jitter(x: torch.Tensor, strength: Sequence[float], p: float, generator: torch.Generator) -> torch.Tensor:
    """ColorJitter(brightness, contrast, saturation, hue) applied with probability ``p`` per image, its four
    operations in a random order per image. ``x`` (B, 3, H, W) in [0, 1]; returns a new tensor."""
    b_, c_, s_, h_ = (float(v) for v in strength)
    n, dev = x.shape[0], x.device
    apply = torch.rand(n, generator=generator, device=dev) < p
    factors = torch.stack([_uniform(n, max(0.0, 1 - b_), 1 + b_, generator, dev),
                           _uniform(n, max(0.0, 1 - c_), 1 + c_, generator, dev),
                           _uniform(n, max(0.0, 1 - s_), 1 + s_, generator, dev),
                           _uniform(n, -h_, h_, generator, dev)], 1).tolist()
    order = torch.argsort(torch.rand(n, 4, generator=generator, device=dev), dim=1).tolist()
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = x.clone()
    for i in apply.nonzero().squeeze(1).tolist():
        img = out[i]
        for k in order[i]:
            img = ops[k](img, factors[i][k])
        out[i] = img
    return out


def simclr_augment(x: torch.Tensor, generator: torch.Generator, *, crop_scale: Sequence[float],
                   crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: bool = True,
                   jitter: Sequence[float] | None = (0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8,
                   gray_p: float = 0.2) -> torch.Tensor:
    """One SimCLR view of each image of ``x`` (B, C, H, W) in [0, 1], on ``x``'s device, randomness from
    ``generator`` only: RandomResizedCrop(scale, ratio) back to (H, W) with bicubic interpolation (the
    authors' choice; antialiased) and a horizontal flip with probability 0.5; then, on colour images only
    (C = 3) and if ``jitter`` is given, colour jitter with probability ``jitter_p`` and grayscale with
    probability ``gray_p``. Output (B, C, H, W) in [0, 1]."""
    b, c, h, w = x.shape
    dev = x.device
    boxes = crop_boxes(b, h, w, crop_scale, crop_ratio, generator, dev).tolist()
    flip = ((torch.rand(b, generator=generator, device=dev) < 0.5) if hflip else
            torch.zeros(b, dtype=torch.bool, device=dev)).tolist()
    out = torch.empty_like(x)
    for i, (top, left, ch, cw) in enumerate(boxes):
        img = TF.resized_crop(x[i], top, left, ch, cw, [h, w], interpolation=InterpolationMode.BICUBIC,
                              antialias=True)
        out[i] = TF.horizontal_flip(img) if flip[i] else img
    out = out.clamp_(0, 1)   # bicubic overshoots
    if c == 3 and jitter is not None:
        out = color_jitter(out, jitter, jitter_p, generator)
        gray = torch.rand(b, generator=generator, device=dev) < gray_p
        if gray.any():
            out[gray] = TF.rgb_to_grayscale(out[gray], num_output_channels=3)
    return out


def augment_settings(cfg: PretrainConfig, card: DataCard) -> dict[str, Any]:
    """The augmentation keyword arguments for ``card``'s data (per-dataset defaults resolved)."""
    colour = card.channels == 3
    scale = cfg.crop_scale if cfg.crop_scale is not None else ((0.1, 1.0) if colour else (0.3, 1.0))
    return {"crop_scale": tuple(float(s) for s in scale), "crop_ratio": tuple(float(r) for r in cfg.crop_ratio),
            "hflip": card.hflip if cfg.hflip is None else bool(cfg.hflip),
            "jitter": tuple(cfg.color_jitter) if (colour and cfg.color_jitter is not None) else None,
            "jitter_p": cfg.jitter_p, "gray_p": cfg.gray_p}
