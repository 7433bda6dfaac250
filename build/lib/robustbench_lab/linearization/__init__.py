"""Linearization of ResNets (Rothauge et al., arXiv 1905.13386; docs/methods.md section 6).

A library of the analyses layer (the core and attacks below it; no Hydra). Import the modules themselves;
this package imports nothing, so that importing one module never drags in the others:

- ``options``: the analysis options (``LinearizeOptions``), defined once; the names shared by all modules;
- ``units``: residual units as functions, boundaries, scaling, hidden states;
- ``operators``: Jacobian operators through batched jvp / vjp, dense Jacobians and their singular values;
- ``lowrank``: the exact low-rank reduction of a unit's Jacobian;
- ``spectra``: the ``Spectrum`` type and ``singular_values``, the one method dispatcher (explicit, lowrank,
  Lanczos);
- ``analyses``: the analyses of ``task=linearize`` (unit and stage spectra, scale sweep, perturbation
  propagation and energy), their shared context, tables and plots, and ``analyses.runner.run_all``;
- ``jax_backend``: the optional JAX implementation (``jax_params``, ``jax_net``, ``jax_jacobian``,
  ``jax_classifier``), imported only when asked for.
"""
