"""The options of the linearization analysis (``task=linearize``), defined once.

``LinearizeOptions`` and its nested ``StageOptions``, ``SweepOptions`` and ``PerturbationOptions`` are the
only definition of the ``linearize`` config node: the config schema is derived from them
(``robustbench_lab.app.schema``), ``robustbench_lab/conf/linearize/default.yaml`` documents the same defaults (a test keeps
the two in step), and ``LinearizeOptions.from_dict`` checks a plain mapping field by field with the check
each field declares, so a ConfigError names the full key (``linearize.stages.k``), the bad value and the
allowed values. Plain values only (no torch, no Hydra): the schema module imports this before any model code.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from typing import Any, Callable, Mapping, Optional, Tuple

from robustbench_lab.core.errors import ConfigError, check_choice, check_known_fields, check_number

BOUNDARIES = ("pre", "post")
BOUNDARY_OPTIONS = BOUNDARIES + ("both",)
BACKENDS = ("torch", "jax")
METHODS = ("auto", "explicit", "lowrank", "lanczos")
WHICH = ("LM", "SM", "both")
DTYPES = ("float32", "float64")
ANALYSES = ("units", "stages", "sweep", "propagation", "energy")

Check = Callable[[str, Any], Any]


# ------------------------------------------------------------------------------------------------ checks
def _choice(allowed: tuple[str, ...], hint: str = "") -> Check:
    return lambda key, v: str(check_choice(key, v, allowed, hint))


def _integer(low: int, allow_none: bool = False, hint: str = "") -> Check:
    def check(key: str, v: Any) -> int | None:
        v = check_number(key, v, low=low, integer=True, allow_none=allow_none, hint=hint)
        return None if v is None else int(v)
    return check


def _positive(allow_none: bool = False, hint: str = "") -> Check:
    def check(key: str, v: Any) -> float | None:
        v = check_number(key, v, low=0, low_open=True, allow_none=allow_none, hint=hint)
        return None if v is None else float(v)
    return check


def _numbers(low: float | None = None) -> Check:
    def check(key: str, v: Any) -> tuple[float, ...]:
        if not isinstance(v, (list, tuple)) or not v or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) for a in v):
            raise ConfigError(key, v, "a non-empty list of numbers")
        if low is not None and any(a < low for a in v):
            raise ConfigError(key, v, f"numbers >= {low}")
        return tuple(float(a) for a in v)
    return check


def _names(allowed: tuple[str, ...] | None = None, optional: bool = False) -> Check:
    """A list of names (``None``: empty, or kept as ``None`` when ``optional``); each one of ``allowed``."""
    def check(key: str, v: Any) -> tuple[str, ...] | None:
        if v is None:
            return None if optional else ()
        if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(a, str) for a in v):
            raise ConfigError(key, v, "a list of unit names, e.g. [s1u1, s3u9]" if allowed is None
                              else f"a list of names from {list(allowed)}")
        for i, a in enumerate(v):
            if allowed is not None:
                check_choice(f"{key}[{i}]", a, allowed)
        return tuple(v)
    return check


def _units(key: str, v: Any) -> Any:
    if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    if isinstance(v, (list, tuple)) and v and all(isinstance(u, str) for u in v):
        return list(v)
    raise ConfigError(key, v, "all, N (evenly spaced units per stage, N >= 1), or a non-empty list of unit "
                      "names such as [s1u1, s3u9]")


def _text(key: str, v: Any) -> str:
    return str(v)


def _as_is(key: str, v: Any) -> Any:
    return v


def _opt(default: Any, check: Check) -> Any:
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"check": check})
    return dataclasses.field(default=default, metadata={"check": check})


# ------------------------------------------------------------------------------------------------ options
@dataclasses.dataclass(frozen=True)
class StageOptions:
    """Whole-stage linearizations (large: top/bottom-k by Lanczos unless explicit is affordable)."""

    method: str = _opt("lanczos", _choice(METHODS))
    k: int = _opt(6, _integer(1))
    which: str = _opt("both", _choice(WHICH))
    n_images: int = _opt(2, _integer(1))


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """The skip scale lambda (at weight scale 1) and the residual-weight scale (at lambda 1) of one unit."""

    unit: str = _opt("s3u2", _text)
    skip_scales: Tuple[float, ...] = _opt((0.0, 0.5, 0.9, 1.0, 1.1, 2.0), _numbers())
    weight_scales: Tuple[float, ...] = _opt((0.5, 1.0, 2.0), _numbers(low=0.0))
    n_images: int = _opt(2, _integer(1))
    method: str = _opt("auto", _choice(METHODS))


TRUST_REGION_L2 = {"_target_": "attacks.trust_region.TrustRegion", "name": "trust_region", "norm": "l2",
                   "eps": None, "iterations": 100}


@dataclasses.dataclass(frozen=True)
class PerturbationOptions:
    """The perturbations pushed through the network (propagation and energy).

    ``attack``: the spec of the L2 attack that makes the adversarial d (a mapping with ``_target_``, as
    robustbench_lab/conf/attack/*.yaml), built by the application; ``l2``: None gives the random d each image's adversarial
    norm, a number rescales both to it.
    """

    attack: Any = _opt(TRUST_REGION_L2, _as_is)
    l2: Optional[float] = _opt(None, _positive(allow_none=True, hint="null: the adversarial norm of each image"))


@dataclasses.dataclass(frozen=True)
class LinearizeOptions:
    """Every option of the analysis; robustbench_lab/conf/linearize/default.yaml says what each one means."""

    backend: str = _opt("torch", _choice(BACKENDS))
    boundary: str = _opt("pre", _choice(BOUNDARY_OPTIONS))
    method: str = _opt("auto", _choice(METHODS))
    k: int = _opt(6, _integer(1))
    which: str = _opt("both", _choice(WHICH))
    lanczos_maxiter: Optional[int] = _opt(100, _integer(1, allow_none=True, hint="null: ARPACK's default"))
    explicit_max: int = _opt(4096, _integer(1))
    dtype: str = _opt("float32", _choice(DTYPES))
    batch_size: int = _opt(256, _integer(1))
    n_images: int = _opt(8, _integer(1))
    units: Any = _opt("all", _units)                 # "all" | N | list of unit names (checked against the net later)
    explicit_units: Tuple[str, ...] = _opt((), _names())
    explicit_images: int = _opt(2, _integer(1))
    hist_units: Optional[Tuple[str, ...]] = _opt(None, _names(optional=True))
    tol: float = _opt(1e-3, _positive())
    analyses: Tuple[str, ...] = _opt(ANALYSES, _names(ANALYSES))
    stages: StageOptions = dataclasses.field(default_factory=StageOptions)
    sweep: SweepOptions = dataclasses.field(default_factory=SweepOptions)
    perturbation: PerturbationOptions = dataclasses.field(default_factory=PerturbationOptions)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, key: str = "linearize") -> "LinearizeOptions":
        """The options of a plain mapping (missing keys take their defaults); ConfigError for a bad value."""
        return _parse(cls, d, key)

    @property
    def boundaries(self) -> tuple[str, ...]:
        """("pre",), ("post",) or ("pre", "post") for boundary both."""
        return BOUNDARIES if self.boundary == "both" else (self.boundary,)

    @property
    def images_needed(self) -> int:
        """How many correctly classified test images the selected analyses use."""
        n = [1]
        if {"units", "propagation", "energy"} & set(self.analyses):
            n.append(self.n_images)
        if "units" in self.analyses and self.explicit_units:
            n.append(self.explicit_images)
        if "stages" in self.analyses:
            n.append(self.stages.n_images)
        if "sweep" in self.analyses:
            n.append(self.sweep.n_images)
        return max(n)


def _parse(cls: type, d: Mapping[str, Any] | None, key: str) -> Any:
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(key, d, f"a mapping with keys {[f.name for f in dataclasses.fields(cls)]}")
    check_known_fields(cls, d, key)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        sub = f"{key}.{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _parse(hints[f.name], d[f.name], sub)
        else:
            values[f.name] = f.metadata["check"](sub, d[f.name])
    return cls(**values)


def as_plain(options: Any) -> dict[str, Any]:
    """``options`` as the plain mapping a config file holds (tuples as lists), e.g. to compare with YAML."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(a) for a in v]
        if isinstance(v, dict):
            return {k: plain(a) for k, a in v.items()}
        return v
    return plain(dataclasses.asdict(options))
