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
