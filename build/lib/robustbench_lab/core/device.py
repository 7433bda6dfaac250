"""The device a run uses: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""

from __future__ import annotations

import torch

from robustbench_lab.core.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu" or name == "mps" or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device", name, DEVICES, "CUDA is not available on this machine; use device=cpu or auto")
        return torch.device(name)
    raise ConfigError("device", name, DEVICES)
