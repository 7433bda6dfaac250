"""What every analysis of a run shares: the images, the results so far, the unit selection and the
``Context`` (model, options, writer, the Jacobian-operator factory of the backend, and the raw spectra)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.results import ResultWriter
from robustbench_lab.linearization.analyses.tables import spectrum_stats
from robustbench_lab.linearization.options import LinearizeOptions
from robustbench_lab.linearization.spectra import Spectrum, singular_values
from robustbench_lab.linearization.units import UnitRef, get_block, has_identity_shortcut, list_units

@dataclasses.dataclass
class Images:
    """The analysed test images: ``x`` (N, C, H, W) in [0, 1], labels ``y`` (N,), test-set indices."""

    x: torch.Tensor
    y: torch.Tensor
    index: list[int]


@dataclasses.dataclass
class Results:
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    sections: list[str] = dataclasses.field(default_factory=list)
    tables: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)


def select_units(net: nn.Module, spec: Any, key: str = "linearize.units") -> list[UnitRef]:
    """Units named by ``spec``: ``"all"``, N (evenly spaced per stage, first and last included) or names."""
    units = list(list_units(net))
    names = [u.name for u in units]
    if spec == "all":
        return units
    if isinstance(spec, int):
        out = []
        for s in sorted({u.stage for u in units}):
            stage = [u for u in units if u.stage == s]
            pick = np.unique(np.round(np.linspace(0, len(stage) - 1, min(spec, len(stage)))).astype(int))
            out += [stage[i] for i in pick]
        return out
    for i, n in enumerate(spec):
        if n not in names:
            raise ConfigError(f"{key}[{i}]", n, names)
    return [u for u in units if u.name in set(spec)]


def check_units(net: nn.Module, opts: LinearizeOptions, model_name: str) -> list[UnitRef]:
    """Every unit name of the options exists in ``net`` (a ResNet with residual units); returns the units."""
    units = list(list_units(net))   # ConfigError naming model.name for a network without residual units
    if not units:
        raise ConfigError("model.name", model_name, "a ResNet with residual units (resnet20/32/44/56/110, "
                          "resnet56_bottleneck)", "task=linearize found no residual unit in this model")
    names = [u.name for u in units]
    select_units(net, opts.units)
    for key, seq in (("linearize.explicit_units", opts.explicit_units), ("linearize.hist_units", opts.hist_units)):
        for i, n in enumerate(seq or ()):
            if n not in names:
                raise ConfigError(f"{key}[{i}]", n, names)
    if "sweep" in opts.analyses and opts.sweep.unit not in names:
        raise ConfigError("linearize.sweep.unit", opts.sweep.unit, names)
    lowrank = [("linearize.method", select_units(net, opts.units))] if opts.method == "lowrank" else []
    if opts.sweep.method == "lowrank" and "sweep" in opts.analyses:
        lowrank.append(("linearize.sweep.method", [u for u in units if u.name == opts.sweep.unit]))
    for key, refs in lowrank:
        if "post" in opts.boundaries:
            raise ConfigError(key, "lowrank", ["auto", "explicit", "lanczos"],
                              "the exact low-rank reduction needs J = lambda*I + dF (boundary pre); after the "
                              "post-addition ReLU it does not apply")
        down = [u.name for u in refs if not has_identity_shortcut(get_block(net, u))]
        if down:
            raise ConfigError(key, "lowrank", ["auto", "explicit", "lanczos"],
                              f"the exact low-rank reduction needs an identity shortcut; {', '.join(down)} "
                              "downsample (use auto: it takes the reduction only where it applies)")
    if opts.stages.method == "lowrank":
        raise ConfigError("linearize.stages.method", "lowrank", ["auto", "explicit", "lanczos"],
                          "the low-rank reduction is for single units")
    return units


@dataclasses.dataclass
class Context:
    """What every analysis needs. ``make_op(fn, x0, batch_size=..., dtype=...)`` builds a Jacobian operator."""

    model: Classifier
    opts: LinearizeOptions
    images: Images
    writer: ResultWriter
    make_op: Callable[..., Any]
    seed: int
    label: str

    def __post_init__(self) -> None:
        self.net: nn.Module = self.model.net
        self.all_units = list(list_units(self.net))
        self.units = select_units(self.net, self.opts.units)
        types = []
        for u in self.all_units:
            t = type(get_block(self.net, u)).__name__
            if t not in types:
                types.append(t)
        self.block_type = "+".join(types)
        self.values: dict[str, np.ndarray] = {}     # raw singular values, saved as singular_values.npz
        self.per_image: list[dict[str, Any]] = []   # one row per spectrum computed (spectra_per_image.csv)

    def op(self, fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor) -> Any:
        return self.make_op(fn, x0.detach(), batch_size=self.opts.batch_size, dtype=self.opts.dtype)

    def spectrum(self, fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, method: str, k: int,
                 block: nn.Module | None = None, boundary: str = "pre", which: str | None = None) -> Spectrum:
        """The spectrum of ``fn``'s Jacobian at one example ``x0`` by ``method`` (``block``: the unit ``fn``
        linearizes, with its current scales, so that the low-rank reduction is available)."""
        return singular_values(self.op(fn, x0), x0.detach(), method=method, k=k, explicit_max=self.opts.explicit_max,
                               block=block, boundary=boundary, batch_size=self.opts.batch_size, dtype=self.opts.dtype,
                               which=which or self.opts.which, maxiter=self.opts.lanczos_maxiter)

    def spectra(self, level: str, boundary: str, name: str, fn: Callable[[torch.Tensor], torch.Tensor],
                x0: torch.Tensor, method: str, k: int, block: nn.Module | None = None, which: str | None = None,
                columns: dict[str, Any] | None = None) -> tuple[list[Spectrum], list[dict[str, float]]]:
        """The spectrum of ``fn`` at each example of ``x0`` (N, ...), the i-th the input of the i-th image, and
        its statistics (``opts.tol`` around 1); each one recorded, with ``columns`` in its row."""
        specs, stats = [], []
        for i in range(x0.shape[0]):
            sp = self.spectrum(fn, x0[i], method, k, block=block, boundary=boundary, which=which)
            st = spectrum_stats(sp, self.opts.tol)
            self.record(level, boundary, name, "trained", self.images.index[i], sp, st, **(columns or {}))
            specs.append(sp)
            stats.append(st)
        return specs, stats

    def record(self, level: str, boundary: str, name: str, setting: str, image: int, sp: Spectrum,
               stats: dict[str, float], **extra: Any) -> None:
        """Keep one spectrum's values (singular_values.npz) and its row of spectra_per_image.csv."""
        self.values[f"{level}/{boundary}/{name}/{setting}/img{image}"] = sp.values.astype(np.float32)
        self.per_image.append({"level": level, "boundary": boundary, "name": name, "setting": setting,
                               "image": image, "method": sp.method, "complete": sp.complete, "n_in": sp.n_in,
                               "n_out": sp.n_out, "n": sp.n, "frac_one": stats["frac"],
                               "frac_one_lo": stats["frac_lo"], "frac_one_hi": stats["frac_hi"],
                               "sigma_min": stats["min"], "sigma_median": stats["median"],
                               "sigma_max": stats["max"], "n_zero": sp.n_zero, "note": sp.note,
                               "seconds": sp.seconds, **extra})

    def stage_of(self, name: str) -> int:
        return next(u.stage for u in self.all_units if u.name == name)

    def stage_starts(self, refs: list[Any]) -> list[float]:
        """x positions (between items of ``refs``) where a new stage begins, for plot separators."""
        return [i - 0.5 for i in range(1, len(refs)) if refs[i].stage != refs[i - 1].stage]
