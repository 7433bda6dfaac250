"""From raw unit responses to regression targets: steps 1-3 of the authors' pipeline, as modules.

1. average the repeats of each image (``neural_data_proc/prep_beta.py``);
2. z-score every unit with the mean and standard deviation over the fit images (``+ 1e-6``);
3. PCA fitted on the fit images, keeping the leading components that explain ``variance_fraction`` of the
   variance (0.95 there; ``max_components`` optionally caps the count for CPU-sized heads).

Also the small modules every source shares: a surrogate's pooled raw response, and response -> pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core import data as data_mod


def pool_flatten(h: torch.Tensor, pool: int) -> torch.Tensor:
    """(B, C, H, W) -> adaptive average pool to (pool, pool) -> (B, C * pool * pool); (B, D) passes through."""
    if h.dim() == 4:
        return F.adaptive_avg_pool2d(h, pool).flatten(1)
    return h.flatten(1)


@torch.no_grad()
def batched(fn: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Apply ``fn`` to float images ``x`` (N, C, H, W) in [0, 1] (or uint8) in batches; returns (N, ...) on CPU."""
    out = []
    for i in range(0, x.shape[0], batch_size):
        out.append(fn(data_mod.to_float(x[i:i + batch_size]).to(device)).cpu())
    return torch.cat(out)


def average_repeats(r: np.ndarray) -> np.ndarray:
    """(n, R, U) -> mean over repeats (n, U); (n, U) is returned as is."""
    return r.mean(axis=1) if r.ndim == 3 else r


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


class PipelineChain(nn.Module):
    """A surrogate's exact target: images (B, C, H, W) in [0, 1] -> raw response -> pipeline scores (B, k)."""

    def __init__(self, response: nn.Module, pipeline: ResponsePipeline) -> None:
        super().__init__()
        self.response, self.pipeline = response, pipeline

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pipeline(self.response(x))
