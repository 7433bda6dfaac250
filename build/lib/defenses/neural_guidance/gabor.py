"""The V1-like surrogate (``v1_gabor``): a fixed Gabor filter bank in the design of VOneNet (Dapello et al. 2020).

Simple cells (rectified responses of Gabor filters at several phases) and complex cells (quadrature-pair
energy) over a grid of orientations and spatial frequencies, average-pooled. VOneNet draws its parameters
from primate V1 distributions; we use an evenly spaced grid over the same dimensions, so the bank is
deterministic and its tuning can be checked. Model-derived, not brain data.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core import data as data_mod
from robustbench_lab.core.errors import ConfigError, check_bool, check_number

from .pipeline import PooledResponse
from .target import MODEL_DERIVED, TargetSource


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


def _numbers(key: str, values: Any, what: str, allow_empty: bool = False) -> list[float]:
    """The list of numbers at config ``key`` as floats; a bad entry is named by its index in the error."""
    if not isinstance(values, (list, tuple)) or not (values or allow_empty):
        raise ConfigError(key, values, f"a {'' if allow_empty else 'non-empty '}list of {what}")
    return [float(check_number(f"{key}[{i}]", v)) for i, v in enumerate(values)]


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
        if isinstance(orientations, int) and not isinstance(orientations, bool):
            check_number(f"{key}.orientations", orientations, low=1, integer=True)
            thetas = [180.0 * i / orientations for i in range(orientations)]
        else:
            thetas = _numbers(f"{key}.orientations", orientations, "angles in degrees (or an integer >= 1)")
        freqs = _numbers(f"{key}.frequencies", frequencies, "cycles/pixel in (0, 0.5] (Nyquist)")
        for i, f in enumerate(freqs):
            check_number(f"{key}.frequencies[{i}]", f, low=0, low_open=True, high=0.5, hint="cycles/pixel (Nyquist)")
        self.phases = _numbers(f"{key}.phases", phases, "simple-cell phases in degrees", allow_empty=True)
        self.complex_cells = check_bool(f"{key}.complex_cells", complex_cells)
        if not self.phases and not self.complex_cells:
            raise ConfigError(f"{key}.phases", phases, "at least one phase, or complex_cells: true",
                              "the bank has no cells")
        self.sigma_cycles = float(check_number(f"{key}.sigma_cycles", sigma_cycles, low=0, low_open=True,
                                               hint="envelope sigma in carrier cycles"))
        self.aspect = float(check_number(f"{key}.aspect", aspect, low=0, low_open=True))
        self.thetas, self.freqs = thetas, freqs
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


class V1GaborTarget(TargetSource):
    """V1-like surrogate: a fixed Gabor bank of simple and complex cells (VOneNet design), average-pooled to
    ``pool`` x ``pool`` per cell type, PCA-reduced. Model-derived, not brain data."""

    kind = "v1_gabor"
    source_kind = "surrogate"

    def __init__(self, *, orientations: int | Sequence[float] = 8, frequencies: Sequence[float] = (0.1, 0.2, 0.3),
                 phases: Sequence[float] = (0.0, 90.0, 180.0, 270.0), complex_cells: bool = True,
                 sigma_cycles: float = 0.5, aspect: float = 1.0, pool: int = 4, **kw: Any) -> None:
        super().__init__(**kw)
        self.bank = GaborBank(orientations, frequencies, phases, complex_cells, sigma_cycles, aspect, key=self.key)
        self.pool = check_number(f"{self.key}.pool", pool, low=1, integer=True)

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
