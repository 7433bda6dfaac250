"""robustbench_lab: an adversarial-robustness benchmark harness.

The core package holds the typed vocabulary (norms), the model wrapper and zoo, data loading, training and
the checkpoint cache, the attack contract, the defense protocols, the evaluator and the result writers.
Concrete attacks live in the top-level ``attacks`` package, concrete defenses in ``defenses``.
"""

__version__ = "0.1.0"
