"""Linearization of ResNets (Rothauge et al., arXiv 1905.13386; docs/methods.md section 6).

Core: ``units`` (residual units as functions, boundaries, scaling, hidden states), ``operators`` (Jacobian
operators through batched jvp / vjp), ``spectra`` (explicit SVD, exact low-rank reduction, Lanczos).
The analysis task lives in ``app`` / ``experiments`` (imported on demand, not here).
"""

from robustbench_lab.linearization.operators import JacobianOperator, TorchJacobian, dense_jacobian
from robustbench_lab.linearization.spectra import (METHODS, Spectrum, count_equal_one, count_near, fraction_equal_one, reduction_rank,
                      singular_values, svd_explicit, svd_lanczos, svd_lowrank, svdvals)
from robustbench_lab.linearization.units import (BOUNDARIES, ModuleFunction, UnitRef, find_unit, get_block, has_identity_shortcut,
                    hidden_states, list_units, scaled, stage_function, unit_function, unit_input)

__all__ = [
    "BOUNDARIES", "METHODS", "JacobianOperator", "ModuleFunction", "Spectrum", "TorchJacobian", "UnitRef",
    "count_equal_one", "count_near", "dense_jacobian", "find_unit", "fraction_equal_one", "get_block",
    "has_identity_shortcut", "hidden_states", "list_units", "reduction_rank", "scaled", "singular_values",
    "stage_function", "svd_explicit", "svd_lanczos", "svd_lowrank", "svdvals", "unit_function", "unit_input",
]
