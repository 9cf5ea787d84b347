"""The baseline LTAU is compared against: a deep ensemble's force spread.

Member 0 is the production model (the one LAMMPS runs and LTAU watches); the spread of the
members' forces is its uncertainty. For calibration the ensemble's error distribution is the
usual Gaussian reading: each force component's error ~ N(0, s²) with s² the members' variance
averaged over components, so the error norm is s times a chi variable with 3 degrees of freedom.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def ensemble_forces(models, frames) -> tuple[np.ndarray, np.ndarray]:
    """Forces of every member (n_models, n_atoms, 3) and the reference forces (n_atoms, 3)."""
    from ltau_lmp.prediction import predict_frames

    members = np.stack([predict_frames(model, frames).forces for model in models])
    return members, np.concatenate([atoms.get_forces() for atoms in frames])


def ensemble_sigma(member_forces: np.ndarray) -> np.ndarray:
    """Per-atom component-averaged standard deviation s of the members' forces (eV/Å)."""
    return np.sqrt(member_forces.var(axis=0, ddof=1).mean(axis=1))


def ensemble_uncertainty(member_forces: np.ndarray) -> np.ndarray:
    """Expected error norm under the Gaussian reading: s · E[chi_3] = s · 2·sqrt(2/π)."""
    return ensemble_sigma(member_forces) * stats.chi.mean(3)


def ensemble_coverage(sigma: np.ndarray, true_error: np.ndarray, levels) -> np.ndarray:
    """Observed fraction of true errors inside the central ``levels`` intervals of s·chi_3."""
    out = []
    for c in levels:
        lo, hi = stats.chi.ppf([(1 - c) / 2, (1 + c) / 2], 3)
        out.append(np.mean((true_error >= sigma * lo) & (true_error <= sigma * hi)))
    return np.asarray(out)
