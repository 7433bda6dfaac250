"""robustbench_lab: an adversarial-robustness benchmark harness.

    import robustbench_lab as rbl
    result = rbl.evaluate(my_model, data="cifar10", attacks=["pgd"], eps=8/255)

Layers, each importing only the ones below it (``docs/architecture.md``; ``tests/test_layers.py``):
``robustbench_lab.core`` (torch only, no Hydra) <- plug-ins (``attacks``, ``defenses``,
``robustbench_lab.linearization``) <- ``robustbench_lab.app`` (the only layer that knows Hydra) <- the
public entry points (``robustbench_lab.api``, ``run.py``) and studies (``experiments``, ``benchmarks``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["evaluate", "EvaluationResult"]


def __getattr__(name: str) -> Any:
    # The API is loaded on first use, so importing the core (``robustbench_lab.core``) never imports Hydra.
    if name in __all__:
        from robustbench_lab import api
        return getattr(api, name)
    raise AttributeError(f"module 'robustbench_lab' has no attribute {name!r}")
