"""Concrete attacks, one file per family; each holds only its method (the contract is in
``robustbench_lab.core.attack_base``)."""
