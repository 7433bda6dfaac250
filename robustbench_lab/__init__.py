"""robustbench_lab: an adversarial-robustness benchmark harness.

Layers, each importing only the ones below it (``docs/architecture.md``; ``tests/test_layers.py``):
``robustbench_lab.core`` (torch only, no Hydra) <- plug-ins (``attacks``, ``defenses``,
``robustbench_lab.linearization``) <- ``robustbench_lab.app`` (the only layer that knows Hydra) <- studies
(``experiments``, ``benchmarks``, ``run.py``).
"""

__version__ = "0.1.0"
