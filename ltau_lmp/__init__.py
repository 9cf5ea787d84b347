"""ltau_lmp: LTAU-FF uncertainty quantification for machine-learned force fields, inside LAMMPS.

Import the pieces from their sub-packages (``ltau_lmp.estimator``, ``ltau_lmp.model``, ...);
this top level stays light so that ``ltau-lmp --help`` does not import torch or faiss.
"""

__version__ = "0.1.0"
