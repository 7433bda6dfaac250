"""User-facing errors: every one names the bad value, the allowed values and the config key."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping


class ConfigError(ValueError):
    """A configuration value is invalid. Raised before any expensive work starts."""

    def __init__(self, key: str, value: Any, allowed: Iterable[Any] | str, hint: str = "") -> None:
        allowed_s = allowed if isinstance(allowed, str) else ", ".join(repr(a) for a in allowed)
        msg = f"invalid value {value!r} for config key '{key}'; allowed: {allowed_s}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)
        self.key = key
        self.value = value


def check_known_fields(cls: type, d: Mapping[str, Any], key: str, what: str = "key") -> None:
    """Raise a ConfigError naming ``key.<name>`` for the first entry of ``d`` that is not a field of the
    dataclass ``cls`` (a typo in a settings node), with the known fields as the allowed values."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", d[unknown[0]], sorted(fields), f"unknown {what}")


class DataNotFoundError(FileNotFoundError):
    """A dataset is not on disk and may not be downloaded."""


# -- shared value checks: constructors call these instead of writing their own isinstance tests ----------
def check_choice(key: str, value: Any, allowed: Iterable[Any], hint: str = "") -> Any:
    """``value`` if it is one of ``allowed``, else a ConfigError naming ``key`` and the choices."""
    allowed = tuple(allowed)
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed) or value not in allowed:
        raise ConfigError(key, value, allowed, hint)
    return value


def check_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 allow_none: bool = False, hint: str = "") -> Any:
    """``value`` if it is a number (an integer when ``integer``; never a bool) within the bounds, else a
    ConfigError naming ``key`` and the range, e.g. ``check_number("attack.steps", 0, low=1, integer=True)``."""
    if value is None and allow_none:
        return None
    kind = "an integer" if integer else "a number"
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    allowed = " ".join(p for p in (kind, lo, "and" if lo and hi else "", hi) if p)
    if allow_none:
        allowed += ", or null"
    ok_type = not isinstance(value, bool) and (isinstance(value, int) if integer else isinstance(value, (int, float)))
    if not ok_type or value != value:   # NaN fails every range
        raise ConfigError(key, value, allowed, hint)
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(key, value, allowed, hint)
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(key, value, allowed, hint)
    return value


def check_bool(key: str, value: Any, hint: str = "") -> bool:
    """``value`` if it is a bool, else a ConfigError naming ``key``."""
    if not isinstance(value, bool):
        raise ConfigError(key, value, [True, False], hint)
    return value
