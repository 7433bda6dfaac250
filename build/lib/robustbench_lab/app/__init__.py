"""The application layer: the only one that knows Hydra and OmegaConf.

Config nodes become core objects here (``builders``), tasks run (``evaluate``, ``linearize``) inside
resumable cells (``execute``, ``cells``), the sanity checks run (``checks``), and results are tracked and
aggregated (``tracking``, ``report``, ``callbacks``). Importing the package registers the config schemas in
Hydra's ConfigStore, so every entry point that composes ``robustbench_lab/conf/config.yaml`` finds its ``base_config``.
"""

from robustbench_lab.app import schema as _schema  # noqa: F401
