"""A MACE model (mace-torch 0.3.16) behind ltau_lmp's model contract.

``MACEForceField`` wraps a loaded MACE module so that it is called exactly like the built-in
model::

    atom_energy, latent = model(positions, species, centers, neighbors, shifts, n_local)

and the contract's ``evaluate`` (``ltau_lmp.model.contract``), hence the trainer's helpers, the ASE
calculator and the LAMMPS runtime, work with it unchanged. Differences from the strictly local model, all consequences of message
passing:

* ``centers`` may include ghost atoms (``i >= n_local``). MACE runs on all ``n_all`` nodes of the
  graph; the energies and latents of the first ``n_local`` nodes are returned. With ghost atoms
  out to ``card.receptive_field`` and the pairs of local *and* ghost atoms, the local energies are
  exact (the "thick ghost shell" of ``../shared/external-models.md``).
* Node ``i`` gathers its messages over the pairs it centres (``i -> j``, its own neighbour list).
  For a symmetric list (every ``i -> j`` also listed as ``j -> i``) this is MACE's own graph; for a
  LAMMPS list over a finite ghost region it means an atom's environment is its own list.
* ``atom_energy`` is MACE's ``node_energy``: the atomic reference energy E0 plus the scaled
  interaction energy of the node, so it sums to MACE's total ``energy`` (for
  ``ScaleShiftMACE`` MACE returns it in float64 whatever the model dtype).
* ``latent`` is the invariant (``0e``) part of the node features of the selected interaction
  layers, all of them by default: the LTAU-FF reference convention, the same numbers as
  ``MACECalculator.get_descriptors(invariants_only=True, num_layers=-1)``.
* ``exchange=`` (per-layer ghost exchange, ``card.ghost_exchange``): with pairs centred on the
  local atoms only and ghost atoms out to one cutoff, MACE runs its own LAMMPS ML-IAP code path
  (``lammps_mliap=True``): every layer's messages reach the local atoms only, and before each
  layer after the first the ghost rows of the node features are refreshed from their owners by
  ``exchange``, so the local energies are exact without a thick ghost shell.

Edge vectors are formed inside MACE's differentiable graph as ``x[j] - x[i] + shift_ij`` (MACE's
``get_edge_vectors_and_lengths`` from ``positions``, ``edge_index`` and ``shifts``), so the energy
differentiates with respect to ``positions`` and ``shifts``: forces and the runtime's per-pair
offsets both work.

``mace`` itself is imported only when a model is wrapped, so importing ``ltau_lmp.model`` stays fast.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from ase.data import chemical_symbols
from torch import Tensor, nn

from ltau_lmp.errors import ConfigError
from ltau_lmp.model.contract import ForceField


def import_mace() -> None:
    """Import mace-torch's model classes without the warning that import prints: mace sets
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` and e3nn, which it imports, then reads its constants with a
    ``torch.load`` that warns about the variable (ltau_lmp's own loads name ``weights_only``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD detected",
                                category=UserWarning)
        import mace.modules  # noqa: F401


def invariant_columns(irreps_per_layer: Sequence, layers: Sequence[int]) -> list[int]:
    """Columns of MACE's concatenated ``node_feats`` that hold the ``0e`` channels of ``layers``.

    ``irreps_per_layer[k]`` are the e3nn irreps of layer k's output (``products[k].linear.irreps_out``);
    ``node_feats`` is their concatenation in layer order.
    """
    starts, offset = [], 0
    for irreps in irreps_per_layer:
        starts.append(offset)
        offset += irreps.dim
    columns = []
    for layer in layers:
        position = starts[layer]
        for mul, ir in irreps_per_layer[layer]:
            if ir.l == 0 and ir.p == 1:
                columns.extend(range(position, position + mul))
            position += mul * ir.dim
    return columns


class MACEModule(ForceField):
    """What every MACE behind the contract shares: a MACE module (``self.mace``, Python or scripted)
    whose dtype is its cutoff's and which is what MACE's trainer optimises and checkpoints."""

    family = "mace"

    @property
    def dtype(self) -> torch.dtype:
        return self.mace.r_max.dtype

    @property
    def trainable(self) -> nn.Module:
        """The MACE module: what MACE's trainer optimises and its checkpoints hold (replay)."""
        return self.mace


class MACEForceField(MACEModule):
    """A MACE energy model honouring the forward contract of ``ltau_lmp.model`` (module docstring).

    ``layers``: interaction layers (0-based, negative counts from the end) whose invariant node
    features form the latent, in this order; ``None`` = all layers (the LTAU-FF convention),
    ``[-1]`` = the last layer only. ``head``: which readout head of a multi-head model; by default
    the only head, else the one named "Default" (as ``MACECalculator``).
    """

    ghost_exchange = True

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None, head: str | None = None):
        super().__init__()
        from e3nn import o3
        from mace.modules.models import MACE

        if not isinstance(model, MACE):
            raise ConfigError(f"expected a MACE energy model (mace.modules.models.MACE or ScaleShiftMACE), "
                              f"got {type(model).__module__}.{type(model).__qualname__}")
        if hasattr(model, "joint_embedding"):
            raise ConfigError("this MACE model embeds per-structure inputs (embedding_specs: charge, spin, ...) "
                              "that the ltau_lmp model contract does not carry")
        heads = list(model.heads)
        if head is None:  # as MACECalculator: the only head, else the one called "default"
            defaults = [h for h in heads if len(heads) == 1 or h.lower() == "default"]
            if not defaults:
                raise ConfigError(f"the MACE model has several heads {heads} and none is 'Default': "
                                  f"choose one with head=...")
            head = defaults[0]
        if head not in heads:
            raise ConfigError(f"head {head!r} is not one of the MACE model's heads {heads}")
        num_layers = int(model.num_interactions)
        chosen = list(range(num_layers)) if layers is None else [int(k) for k in layers]
        if not chosen or any(not -num_layers <= k < num_layers for k in chosen):
            raise ConfigError(f"latent layers must be a non-empty list of layer indices in "
                              f"[-{num_layers}, {num_layers}), got {layers}")
        chosen = [k % num_layers for k in chosen]
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"latent layers repeat a layer: {layers}")
        irreps = [o3.Irreps(str(product.linear.irreps_out)) for product in model.products]
        columns = invariant_columns(irreps, chosen)
        if not columns:
            raise ConfigError(f"MACE layers {chosen} have no invariant (0e) node features")

        self.mace = model
        self.head = head
        self.layers = tuple(chosen)
        self.species = tuple(chemical_symbols[int(z)] for z in model.atomic_numbers)
        self.cutoff = float(model.r_max)
        self.num_layers = num_layers
        self.register_buffer("head_index", torch.tensor([heads.index(head)]), persistent=False)
        self.register_buffer("latent_columns", torch.tensor(columns), persistent=False)
        self.latent_dim = len(columns)
        # widths of the node features MACE exchanges before each layer after the first (ML-IAP path)
        self.exchange_widths = tuple(o3.Irreps(str(block.linear_up.irreps_out)).dim
                                     for block in model.interactions[1:])
        per_layer = " + ".join(str(len(invariant_columns(irreps, [k]))) for k in chosen)
        self.latent_description = (f"MACE invariant (0e) node features of interaction layer(s) "
                                   f"{', '.join(str(k + 1) for k in chosen)} of {num_layers} ({per_layer} channels)")

    def architecture(self) -> dict:
        """The class, module tree, heads and latent choice (the hash adds every weight)."""
        return {
            "family": self.family, "class": f"{type(self.mace).__module__}.{type(self.mace).__qualname__}",
            "modules": repr(self.mace), "heads": list(self.mace.heads), "head": self.head,
            "latent_layers": list(self.layers),
        }

    def forward(self, positions: Tensor, species: Tensor, centers: Tensor, neighbors: Tensor,
                shifts: Tensor | None, n_local: int, exchange=None) -> tuple[Tensor, Tensor]:
        """Return (atom_energy (n_local,), latent (n_local, latent_dim)); contract in architecture.md."""
        dtype = self.dtype
        positions = positions.to(dtype)
        if not positions.requires_grad:
            # MACE calls requires_grad_() on its input: give it a fresh leaf, not the caller's tensor.
            positions = positions.detach()
        n_all = positions.shape[0]
        if n_local == 0:  # a rank without local atoms: nothing to compute, outputs stay in the graph
            return self.no_local_atoms(positions, shifts, exchange)
        # MACE sums messages at edge_index[1] with vector x[edge_index[1]] - x[edge_index[0]] + shift,
        # so pair i -> j enters as edge j -> i with shift -s_ij: node i gathers over its own list.
        edge_index = torch.stack([neighbors, centers])
        node_attrs = nn.functional.one_hot(species, len(self.species)).to(dtype)
        if exchange is not None:
            vectors = positions[centers] - positions[neighbors]
            if shifts is not None:
                vectors = vectors - shifts.to(dtype)
            data = {"vectors": vectors, "node_attrs": node_attrs, "edge_index": edge_index,
                    "batch": torch.zeros(n_local, dtype=torch.int64, device=positions.device),
                    "head": self.head_index, "natoms": (n_local, n_all - n_local),
                    "lammps_class": _MLIAPExchange(exchange)}
            out = self.mace(data, training=False, compute_force=False, lammps_mliap=True)
        else:
            data = mace_graph(positions, species, centers, neighbors, shifts, len(self.species), self.head_index)
            out = self.mace(data, training=False, compute_force=False)
        latent = out["node_feats"][:n_local].index_select(1, self.latent_columns)
        return out["node_energy"][:n_local], latent


def mace_graph(positions: Tensor, species: Tensor, centers: Tensor, neighbors: Tensor, shifts: Tensor | None,
               n_species: int, head_index: Tensor) -> dict[str, Tensor]:
    """MACE's input dict for the contract's graph, one structure over all nodes. MACE sums messages
    at edge_index[1] with vector x[edge_index[1]] - x[edge_index[0]] + shift, so pair i -> j enters
    as edge j -> i with shift -s_ij: node i gathers over its own list."""
    n_all, dtype = positions.shape[0], positions.dtype
    return {
        "positions": positions,
        "node_attrs": nn.functional.one_hot(species, n_species).to(dtype),
        "edge_index": torch.stack([neighbors, centers]),
        "shifts": positions.new_zeros(len(centers), 3) if shifts is None else -shifts.to(dtype),
        "batch": torch.zeros(n_all, dtype=torch.int64, device=positions.device),
        "ptr": torch.tensor([0, n_all], device=positions.device),
        "cell": positions.new_zeros(3, 3),
        "head": head_index,
    }


class _MLIAPExchange:
    """MACE's ML-IAP exchange protocol over the contract's differentiable ``exchange``.

    MACE's ``LAMMPS_MP`` calls ``forward_exchange`` in its forward and ``reverse_exchange`` in its
    backward. The forward keeps the graph of each ``exchange`` call; the backward, which visits
    the layers in reverse order, takes the gradient through the latest one (a reverse exchange),
    so each layer costs one forward and one reverse communication, as in ML-IAP.
    """

    def __init__(self, exchange):
        self.exchange = exchange
        self.pending: list[tuple[Tensor, Tensor]] = []

    def forward_exchange(self, feats: Tensor, out: Tensor, vec_len: int) -> None:
        with torch.enable_grad():
            x = feats.detach().requires_grad_()
            y = self.exchange(x)
        out.copy_(y.detach())
        self.pending.append((x, y))

    def reverse_exchange(self, grad: Tensor, gout: Tensor, vec_len: int) -> None:
        x, y = self.pending.pop()
        (g,) = torch.autograd.grad(y, x, grad)
        gout.copy_(g)
