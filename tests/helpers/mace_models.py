"""A tiny random MACE model (needs mace-torch: import after ``pytest.importorskip("mace")``)."""

import numpy as np
import torch
from e3nn import o3
from mace import modules


def tiny_mace(seed=0, heads=None):
    """A randomly initialised two-species ScaleShiftMACE (8 channels, L = 1, r_max 4, 2 layers), float64."""
    torch.manual_seed(seed)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=4.0, num_bessel=6, num_polynomial_cutoff=5, max_ell=2, interaction_cls=block,
        interaction_cls_first=block, num_interactions=2, num_elements=2,
        hidden_irreps=o3.Irreps("8x0e+8x1o"), MLP_irreps=o3.Irreps("8x0e"),
        atomic_energies=np.array([[-7.5, -4.0]] * len(heads or ["Default"])),
        avg_num_neighbors=14.0, atomic_numbers=[6, 14], correlation=2,
        gate=torch.nn.functional.silu, radial_MLP=[16], heads=heads,
        atomic_inter_scale=2.0, atomic_inter_shift=0.1)
    return model.double()
