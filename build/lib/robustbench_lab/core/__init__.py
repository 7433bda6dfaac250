"""The core library: torch (and numpy, pandas, matplotlib), never Hydra.

Value types and norms, the model wrapper and zoo, data, the training loop and the checkpoint cache, the
attack contract, the defense protocols, the evaluator and the result writers. Modules here import only
each other; plug-ins (``attacks``, ``defenses``) and the application build on them.
"""
