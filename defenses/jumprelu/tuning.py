"""The choice of the jump, and the tunings stored so that the cells of a sweep sharing a model tune once.

A stored tuning is a JSON file ``<cache_dir>/jumprelu/<key>.json`` (``{"chosen", "columns", "table"}``;
nothing is unpickled); the key hashes the model's weights, the validation points and every setting the
table depends on (``tuning_key``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from robustbench_lab.core.attack_base import Attack, AttackFamily
from robustbench_lab.core.cache import atomic_write_bytes, content_key
from robustbench_lab.core.errors import ConfigError, check_number

log = logging.getLogger(__name__)

# Default jump grid for the default data (Fashion-MNIST, BatchNorm ResNets): pre-activations after BatchNorm
# have roughly unit scale; on ResNet-20 the clean validation accuracy stays within 1 point of k = 0 up to
# k = 0.1-0.2 (two trainings of the default recipe) and is near chance (0.11) at k = 1 (docs/jumprelu.md).
# Another model needs its own grid: describe() records its pre-activation quantiles.
DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))   # 0, 0.05, ..., 1.0


def choose_jump(grid: Sequence[float], accuracies: Sequence[float], reference: float, max_drop: float) -> float:
    """The largest k whose accuracy is at most ``max_drop`` below ``reference`` (the k = 0 accuracy)."""
    ok = [k for k, a in zip(grid, accuracies) if reference - a <= max_drop + 1e-12]
    return max(ok) if ok else 0.0


def check_tradeoff_attacks(spec: Mapping[str, Any] | None) -> dict[str, tuple[Attack, float | None]]:
    """``{label: {attack: <Attack>, eps: null | number}}`` -> ``{label: (attack, eps)}``, validated."""
    out: dict[str, tuple[Attack, float | None]] = {}
    for label, item in (spec or {}).items():
        key = f"defense.tradeoff_attacks.{label}"
        if not isinstance(item, Mapping) or set(item) - {"attack", "eps"} or "attack" not in item:
            raise ConfigError(key, item, "{attack: <attack config node with _target_>, eps: null | number}")
        atk, eps = item["attack"], item.get("eps")
        if not isinstance(atk, Attack):
            raise ConfigError(f"{key}.attack", atk, "an attack config node (_target_)")
        if eps is None and atk.family != AttackFamily.MINIMIZATION:
            raise ConfigError(f"{key}.eps", eps, "a number >= 0", f"{atk.name} is a fixed-epsilon attack")
        check_number(f"{key}.eps", eps, low=0, allow_none=True,
                     hint="null for minimization attacks; epsilon is in input space")
        out[str(label)] = (atk, float(eps) if eps is not None else None)
    return out


def tuning_key(model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, settings: Mapping[str, Any]) -> str:
    """Hash of the model's weights, the validation points (N, C, H, W) and labels, and ``settings`` (every
    other input of the tuning, plain JSON values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    data = hashlib.sha256(x_val.detach().cpu().contiguous().numpy().tobytes())
    data.update(y_val.detach().cpu().contiguous().numpy().tobytes())
    # version 2: the table gained interval columns; a version-1 tuning is measured again, not adopted
    return content_key({"kind": "jumprelu_tuning", "version": 2, "model": h.hexdigest(), "val": data.hexdigest(),
                        "n_val": int(x_val.shape[0]), "device": x_val.device.type, **settings})


def store_tuning(path: Path, chosen: float, table: pd.DataFrame) -> None:
    """Write a tuning atomically; floats as JSON numbers, whose repr round-trips exactly."""
    atomic_write_bytes(path, json.dumps({"chosen": chosen, "columns": list(table.columns), "table": {
        c: table[c].tolist() for c in table.columns}}).encode())


def load_tuning(path: Path) -> tuple[float, pd.DataFrame] | None:
    """A stored tuning ``(chosen, table)``; None if absent or unreadable (then it is measured again)."""
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        table = pd.DataFrame({c: d["table"][c] for c in d["columns"]}, columns=d["columns"])
        chosen = float(d["chosen"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("jumprelu: stored tuning %s unreadable (%s); tuning again", path, e)
        return None
    return chosen, table
