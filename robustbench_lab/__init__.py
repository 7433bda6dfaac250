"""robustbench_lab: an adversarial-robustness benchmark harness.

The core package holds the typed vocabulary (norms), the model wrapper and zoo, data loading, training and
the checkpoint cache, the attack contract, the defense protocols, the evaluator and the result writers.
Concrete attacks live in the top-level ``attacks`` package, concrete defenses in ``defenses``.
"""

__version__ = "0.1.0"

# Any use of the package registers the config schemas in Hydra's ConfigStore, so every entry point that
# composes conf/config.yaml (run.py, tests, benchmarks, notebooks) finds its base_config.
from . import schema as _schema  # noqa: E402,F401
