"""Tiny random NequIP and Allegro models (needs nequip and allegro: import after
``pytest.importorskip``). Importing this sets nequip's global state, as nequip's own entry points do."""

from allegro.model import AllegroModel
from nequip.model import NequIPGNNModel
from nequip.utils.global_state import set_global_state

set_global_state()
TYPES = ["C", "Si"]


def tiny(kind: str, seed: int = 0, dtype: str = "float64"):
    """A randomly initialised two-species NequIP (2 convolutions) or Allegro (2 layers), r_max 4 A."""
    common = dict(seed=seed, model_dtype=dtype, type_names=TYPES, r_max=4.0, avg_num_neighbors=12.0,
                  per_type_energy_shifts={"C": -7.5, "Si": -4.3}, per_type_energy_scales={"C": 1.2, "Si": 0.7})
    if kind == "nequip":
        model = NequIPGNNModel(num_layers=2, l_max=1, num_features=8, radial_mlp_width=16, **common)
    else:
        model = AllegroModel(l_max=1, num_layers=2, num_scalar_features=8, num_tensor_features=4,
                             radial_chemical_embed={"_target_": "allegro.nn.TwoBodyBesselScalarEmbed",
                                                    "num_bessels": 8},
                             allegro_mlp_hidden_layers_width=16, readout_mlp_hidden_layers_width=8, **common)
    return model.eval()
