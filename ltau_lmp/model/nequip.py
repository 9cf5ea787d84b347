"""NequIP and Allegro models (nequip 0.19 / nequip-allegro 0.8) behind ltau_lmp's model contract.

``NequIPForceField`` wraps a nequip ``GraphModel`` (what ``nequip.model.NequIPGNNModel``,
``allegro.model.AllegroModel``, a training checkpoint or a ``nequip-package`` file give) so that
it is called like the built-in model::

    atom_energy, latent = model(positions, species, centers, neighbors, shifts, n_local)

nequip's own graph conventions match ours: ``edge_index[0]`` is the centre that gathers the
messages and ``edge_vectors = x[edge_index[1]] - x[edge_index[0]] + shift``, so pair ``i -> j``
enters as edge ``(i, j)``. The edge vectors are formed here, differentiably in ``positions`` and
``shifts`` (forces and the runtime's per-pair offsets both work), and handed to nequip's energy
model (the module inside ``ForceStressOutput``), which then takes them as given, as in its
LAMMPS ML-IAP path. Species index k is nequip atom type k: the model's type names must be
chemical symbols.

* **NequIP** (message passing): ``num_layers`` = its convolution layers, receptive field
  ``r_max x num_layers``. Without ``exchange=`` it runs on all ``n_all`` nodes, node i gathering
  over the pairs it centres (ghost atoms out to the receptive field make local energies exact:
  the thick ghost shell). With ``exchange=`` (``card.ghost_exchange``; one cutoff of ghosts,
  pairs centred on local atoms) the node features after every convolution but the last go
  through ``exchange``, so each later convolution reads its neighbours' rows from their owners.
  ``latent``: the model's own ``node_features`` field once every stage ran (the LTAU-FF reference
  convention): in nequip 0.19 the last convolution's output (its invariant ``0e`` channels, the
  energy readout's input); in nequip 0.5 / 0.6 archives the invariant hidden features that
  ``conv_to_output_hidden`` makes of it.
* **Allegro** (strictly local): ``num_layers`` 1, receptive field ``r_max``: one cutoff of ghost
  atoms, pairs centred on local atoms only (it has no convolution, so ``exchange=`` is never
  called). Allegro has no node features; ``latent`` is, per atom, the sum over the pairs it
  centres of the scalar edge features that Allegro hands its edge-energy readout (whose
  outputs, summed over the same pairs, are the atom's energy).

``atom_energy`` is nequip's per-atom energy (scale, shift and any pair potential included): it
sums to nequip's total energy. The energy model's stages run one by one (``forward``): the
exchange goes between them. nequip's convolutions run on every row they are given here: they
cut their input to the local nodes only in nequip's own LAMMPS ML-IAP mode
(``AtomicDataDict.LMP_MLIAP_DATA_KEY`` in the data, with its ghost-exchange module swapped in),
which is not used, so the wrapped model is left exactly as loaded. Ghost rows of a convolution's
output are computed (from no messages) and then overwritten by the exchange; nequip's pair
potentials give each pair's centre half of the pair energy, so pairs centred on local atoms
give the local atoms' energies exactly.

``NequIPStages`` is the part shared with deployed TorchScript archives
(``ltau_lmp.model.torchscript``): the stage-by-stage forward over nequip's field names, which are
the same plain strings in nequip 0.5 to 0.19 and in their TorchScript archives.

nequip itself is imported only when a model is wrapped or loaded.
"""

from __future__ import annotations

import torch
from ase.data import atomic_numbers
from torch import Tensor, nn

from ltau_lmp.errors import ConfigError
from ltau_lmp.model.contract import ForceField

# class names, not isinstance: a model from a nequip-package file brings its own copies of the classes,
# a TorchScript archive names them in ``original_name``
_CONVOLUTION = "ConvNetLayer"
_ALLEGRO = "Allegro_Module"
# nequip's field names (nequip.data.AtomicDataDict), unchanged from nequip 0.5 to 0.19
POSITIONS, ATOM_TYPES, EDGE_INDEX, EDGE_VECTORS = "pos", "atom_types", "edge_index", "edge_vectors"
NODE_FEATURES, EDGE_FEATURES, PER_ATOM_ENERGY = "node_features", "edge_features", "atomic_energy"
CHECKPOINT_PREFIX = "model.sole_model."  # a nequip training module's path to its model


def model_state(lightning_state: dict) -> dict:
    """The model's state dict inside a nequip training module's (a Lightning checkpoint's "state_dict")."""
    return {k[len(CHECKPOINT_PREFIX):]: v for k, v in lightning_state.items() if k.startswith(CHECKPOINT_PREFIX)}


def stage_kind(module: nn.Module) -> str:
    """The nequip class a stage is: its Python class name, or a scripted module's ``original_name``."""
    return getattr(module, "original_name", None) or type(module).__name__


class NequIPStages(ForceField):
    """The stage-by-stage forward of a nequip energy model (a ``SequentialGraphNetwork``: a
    sequence of graph modules, dict in, dict out), shared by Python models and TorchScript archives.

    ``_setup_stages`` reads the family, layers and stages; a subclass then sets ``species``,
    ``cutoff``, ``latent_dim``, ``latent_description``, ``exchange_widths`` and, for a model with
    calls ``_set_pair_cutoffs`` (per-edge-type cutoffs, species x species, Å: longer pairs are
    dropped, as ``pair_nequip`` and ``pair_allegro`` drop them).
    """

    def _set_pair_cutoffs(self, cutoffs: Tensor | None) -> None:
        self.register_buffer("pair_cutoffs", cutoffs, persistent=False)

    def _setup_stages(self, energy_model: nn.Module) -> None:
        stages = [stage_kind(m) for m in energy_model.children()]
        convolutions = stages.count(_CONVOLUTION)
        if convolutions and _ALLEGRO not in stages:
            self.family, self.num_layers = "nequip", convolutions
        elif stages.count(_ALLEGRO) == 1 and not convolutions:
            self.family, self.num_layers = "allegro", 1
        else:
            raise ConfigError(f"a nequip model that is neither NequIP nor Allegro (stages: {', '.join(stages)})")
        self.energy_model = energy_model
        self.ghost_exchange = self.family == "nequip"
        named = list(energy_model.named_children())
        # the convolutions after which node features are exchanged: all but the last
        self._exchange_stages = tuple(name for name, m in named if stage_kind(m) == _CONVOLUTION)[:-1]

    def forward(self, positions: Tensor, species: Tensor, centers: Tensor, neighbors: Tensor,
                shifts: Tensor | None, n_local: int, exchange=None) -> tuple[Tensor, Tensor]:
        """Return (atom_energy (n_local,), latent (n_local, latent_dim)); contract in architecture.md."""
        positions = positions.to(self.dtype)
        if n_local == 0:  # a rank without local atoms: nothing to compute, outputs stay in the graph
            return self.no_local_atoms(positions, shifts, exchange)
        vectors = positions.index_select(0, neighbors) - positions.index_select(0, centers)
        if shifts is not None:
            vectors = vectors + shifts.to(self.dtype)
        if self.pair_cutoffs is not None:  # per-edge-type cutoffs: the longer pairs do not exist for the model
            keep = torch.linalg.vector_norm(vectors, dim=1) < self.pair_cutoffs[species[centers], species[neighbors]]
            centers, neighbors, vectors = centers[keep], neighbors[keep], vectors[keep]
        data = {POSITIONS: positions, ATOM_TYPES: species, EDGE_INDEX: torch.stack([centers, neighbors]),
                EDGE_VECTORS: vectors}
        # Stage by stage: with exchange= the node features after each convolution but the last get
        # their ghost rows (computed from no messages) from their owners.
        for name, stage in self.energy_model.named_children():
            data = stage(data)
            if exchange is not None and name in self._exchange_stages:
                data[NODE_FEATURES] = exchange(data[NODE_FEATURES])
        if self.family == "nequip":
            latent = data[NODE_FEATURES]
        else:
            features = data[EDGE_FEATURES]
            latent = features.new_zeros(len(positions), features.shape[1]).index_add_(0, centers, features)
        return data[PER_ATOM_ENERGY][:n_local, 0], latent[:n_local]


class NequIPForceField(NequIPStages):
    """A nequip ``GraphModel`` (NequIP or Allegro) honouring the forward contract (module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not getattr(model, "is_graph_model", False):
            raise ConfigError(f"expected a nequip GraphModel (NequIPGNNModel, AllegroModel, ...), got "
                              f"{type(model).__module__}.{type(model).__qualname__}")
        if getattr(model, "is_compile_graph_model", False):
            raise ConfigError("this nequip model was built with compile_mode 'compile' (torch.compile for "
                              "training); build or load it in 'eager' mode")
        energy_model = getattr(model.model, "func", model.model)  # inside ForceStressOutput, if any
        if not isinstance(energy_model, nn.Sequential):
            raise ConfigError(f"unsupported nequip model structure: expected a SequentialGraphNetwork energy "
                              f"model, found {type(energy_model).__qualname__}")
        self._setup_stages(energy_model)
        metadata = model.metadata
        self.species = chemical_types(str(metadata["type_names"]).split())
        self.graph_model = model
        self.cutoff = float(metadata["r_max"])
        self._set_pair_cutoffs(per_edge_type_cutoffs(metadata.get("per_edge_type_cutoff"), len(self.species),
                                                     self.cutoff))
        self._metadata = {k: str(v) for k, v in metadata.items()}
        stages = dict(energy_model.named_children())
        self.exchange_widths = tuple(stages[name].irreps_out[NODE_FEATURES].dim for name in self._exchange_stages)
        last = [m for m in stages.values() if stage_kind(m) in (_CONVOLUTION, _ALLEGRO)][-1]
        if self.family == "nequip":
            irreps = last.irreps_out[NODE_FEATURES]
            if any(ir.l != 0 or ir.p != 1 for _, ir in irreps):
                raise ConfigError(f"the last NequIP convolution outputs {irreps}, not only invariant (0e) "
                                  f"features")
            self.latent_dim = irreps.dim
        else:
            self.latent_dim = last.irreps_out[EDGE_FEATURES].dim
        self.latent_description = latent_description(self.family, self.num_layers, self.latent_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.graph_model.model_dtype

    @property
    def trainable(self) -> nn.Module:
        """The nequip GraphModel: what nequip's training module optimises."""
        return self.graph_model

    def architecture(self) -> dict:
        """The family, module tree and nequip metadata (the hash adds every weight)."""
        return {"family": self.family, "modules": repr(self.graph_model), "metadata": self._metadata}

    def checkpoint_state(self, payload) -> dict:
        """The live weights (not EMA: those of that epoch's training steps) in a nequip Lightning
        checkpoint (``torch.load`` with ``weights_only=True``)."""
        return model_state(payload.get("state_dict", {}) if isinstance(payload, dict) else {})


def chemical_types(type_names) -> tuple[str, ...]:
    """nequip type names as species: they must be chemical symbols (LAMMPS types map by symbol)."""
    species = tuple(str(t) for t in type_names)
    unknown = [t for t in species if t not in atomic_numbers]
    if unknown:
        raise ConfigError(f"nequip type names {unknown} are not chemical symbols: ltau_lmp maps LAMMPS "
                          f"types to species by chemical symbol (train with type names = symbols)")
    return species


def per_edge_type_cutoffs(text, num_types: int, r_max: float) -> Tensor | None:
    """nequip's ``per_edge_type_cutoff`` metadata (num_types^2 numbers, row = centre type), or None."""
    values = str(text or "").split()
    if not values:
        return None
    if len(values) != num_types * num_types:
        raise ConfigError(f"per_edge_type_cutoff holds {len(values)} values, expected {num_types}^2")
    cutoffs = torch.tensor([float(v) for v in values], dtype=torch.float64).view(num_types, num_types)
    if bool((cutoffs > r_max).any()) or bool((cutoffs <= 0).any()):
        raise ConfigError(f"per_edge_type_cutoff values must lie in (0, r_max = {r_max}]")
    return cutoffs


def latent_description(family: str, num_layers: int, width: int) -> str:
    if family == "nequip":
        return (f"NequIP node features, the model's node_features output after {num_layers} convolutions "
                f"({width} channels)")
    return (f"Allegro scalar edge features (the edge-energy readout's input) summed over the atom's pairs "
            f"({width} channels)")
