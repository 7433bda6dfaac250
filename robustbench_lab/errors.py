"""User-facing errors: every one names the bad value, the allowed values and the config key."""

from __future__ import annotations

from typing import Any, Iterable


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


class DataNotFoundError(FileNotFoundError):
    """A dataset is not on disk and may not be downloaded."""
