"""Reference data with ground truth from LAMMPS classical potentials.

``generate`` (MD data sets to extxyz), ``reference`` (``reference_calculation``: true energy,
forces and stress of any configuration), ``datasets`` (extxyz to batched tensors with global atom
ids).  Import from the sub-modules; this package stays light so ``ltau-lmp --help`` is fast.
"""
