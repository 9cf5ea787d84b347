"""metatomic ``AtomisticModel`` archives (what ``pair_style metatomic`` reads: PET, SOAP-BPNN and
others exported by metatrain) behind the model contract.

The archive is TorchScript with metatomic's custom classes: ``metatomic-torch`` (the ``metatomic``
extra) registers them; nothing is unpickled. The card comes from the model's capabilities: atomic
types, the neighbour-list cutoff it requests, ``interaction_range`` (-> layers), dtype, units.

* **Forces**: metatomic models (metatrain's PET and SOAP-BPNN among them) recompute their pair
  vectors from the positions and the neighbour-list samples; the pair vectors handed to them are
  not read. The card therefore declares ``forces_from_positions`` and ``evaluate`` differentiates
  the energy with respect to the positions (``contract._evaluate_positions``): exact for any
  metatomic model, with no per-atom virials (as ``pair_style metatomic``).
* **Graph**: with zero offsets (LAMMPS's explicit ghost atoms) the model sees every node and the
  pairs given, and returns the energies of the local atoms (``selected_atoms``). A periodic graph
  (pairs with image offsets: the ASE calculator, one LAMMPS rank) becomes a periodic system: the
  cell is three of the offsets that every offset is an integer combination of (``lattice_of``),
  taken from the offsets tensor so that the energy depends on them and the virial follows. Offsets
  that fit no such cell are unfolded into explicit images out to ``num_layers`` hops of the local
  atoms (``unfold``), whose positions are the atom's plus the offsets along the way.
* **Latent**: the standard per-atom ``feature`` output (metatomic 0.1.19's name; ``features``,
  deprecated, where only that exists).
* **Receptive field**: ``interaction_range``, except for metatrain's PET with its default
  ``featurizer_type: feedforward``, whose atoms see (num_gnn_layers + 1) x cutoff although it
  declares num_gnn_layers x cutoff (measured: forces off by 5e-4 eV/Å at the declared range,
  exact at the longer one): the longer range is used, and said on the card.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from ase.data import chemical_symbols
from torch import Tensor, nn

from ltau_lmp.errors import ConfigError, LTAUError
from ltau_lmp.model.contract import ForceField

FEATURE_OUTPUTS = ("feature", "features")  # metatomic 0.1.19's standard name first, then the deprecated one


def import_metatomic():
    """metatomic.torch (registers the archive's TorchScript classes) and metatensor.torch."""
    try:
        import metatensor.torch as metatensor
        import metatomic.torch as metatomic
    except ImportError as exc:
        raise LTAUError(f"a metatomic model needs metatomic-torch (pip install 'ltau-lmp[metatomic]'): {exc}") from exc
    return metatomic, metatensor


class MetatomicForceField(ForceField):
    """A metatomic ``AtomisticModel`` archive honouring the forward contract (module docstring)."""

    family = "metatomic"
    forces_from_positions = True

    def __init__(self, path: str):
        super().__init__()
        metatomic, _ = import_metatomic()
        try:
            model = metatomic.load_atomistic_model(path)
        except Exception as exc:  # missing extensions, corrupt archive: metatomic's message says which
            raise ConfigError(f"metatomic could not load it ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
        caps = model.capabilities()
        feature = next((name for name in FEATURE_OUTPUTS if name in caps.outputs), None)
        if "energy" not in caps.outputs:
            raise ConfigError(f"the metatomic model has no energy output (outputs: {', '.join(caps.outputs)})")
        if feature is None or not _per_atom(caps.outputs[feature]):
            raise ConfigError(f"the metatomic model exposes no per-atom 'feature' output (outputs: "
                              f"{', '.join(caps.outputs)}): LTAU has no latent to index")
        if caps.length_unit.lower() not in ("angstrom", "a"):
            raise ConfigError(f"the metatomic model works in {caps.length_unit}; ltau_lmp runs LAMMPS metal units "
                              f"(Angstrom)")
        lists = model.requested_neighbor_lists()
        if not lists:
            raise ConfigError("the metatomic model requests no neighbour list (no cutoff to build its graph with)")
        self.model, self._lists, self._feature = model, list(lists), feature
        self.species = tuple(chemical_symbols[int(z)] for z in caps.atomic_types)
        self.register_buffer("atomic_numbers", torch.tensor([int(z) for z in caps.atomic_types]), persistent=False)
        self.cutoff = max(float(nl.cutoff) for nl in lists)
        reach, why = _receptive_field(model, float(caps.interaction_range), self.cutoff)
        self.num_layers = max(1, math.ceil(reach / self.cutoff - 1e-9))
        self._dtype = getattr(torch, caps.dtype)
        self._options = metatomic.ModelEvaluationOptions(length_unit="angstrom", outputs={
            "energy": metatomic.ModelOutput(unit="eV", sample_kind="atom"),
            feature: metatomic.ModelOutput(sample_kind="atom")})
        self._metadata = {"capabilities": str(caps), "interaction_range": float(caps.interaction_range), "reach": why}
        probe = self._run(torch.zeros(1, 3, dtype=self._dtype), torch.zeros(1, dtype=torch.int64),
                          torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 1)
        self.latent_dim = probe[1].shape[1]
        self.latent_description = (f"metatomic per-atom '{feature}' output ({self.latent_dim} channels); "
                                   f"receptive field: {why}")

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def trainable(self) -> nn.Module:
        return self.model

    def architecture(self) -> dict:
        return {"family": self.family, "modules": repr(self.model), **self._metadata}

    def forward(self, positions: Tensor, species: Tensor, centers: Tensor, neighbors: Tensor,
                shifts: Tensor | None, n_local: int, exchange=None) -> tuple[Tensor, Tensor]:
        """Return (atom_energy (n_local,), latent (n_local, latent_dim)); contract in architecture.md."""
        if exchange is not None:
            raise LTAUError("a metatomic model cannot exchange ghost node features; use message_passing shell")
        positions = positions.to(self.dtype)
        if n_local == 0:
            return positions[:0, 0] + 0 * positions.sum(), positions.new_zeros(0, self.latent_dim)
        cell = cell_shifts = None
        if shifts is not None and bool((shifts != 0).any()):
            shifts = shifts.to(self.dtype)
            lattice = lattice_of(shifts) if n_local == len(positions) else None
            if lattice is None:  # no periodic cell the offsets fit: explicit images
                positions, species, centers, neighbors = unfold(positions, species, centers, neighbors, shifts,
                                                                n_local, self.num_layers)
            else:  # a periodic system, as metatomic's own engines give it
                rows, cell_shifts = lattice
                cell = shifts[rows]  # differentiable in the offsets: the virial's cell term
        return self._run(positions, species, centers, neighbors, n_local, cell, cell_shifts)

    def _run(self, positions, species, centers, neighbors, n_local, cell=None, cell_shifts=None):
        """The model on ``positions`` (explicit nodes, or a periodic ``cell`` with integer
        ``cell_shifts`` per pair): energies and features of the first ``n_local``."""
        metatomic, metatensor = import_metatomic()
        periodic = cell is not None
        system = metatomic.System(types=self.atomic_numbers[species].to(torch.int32), positions=positions,
                                  cell=cell if periodic else positions.new_zeros(3, 3),
                                  pbc=torch.full((3,), periodic, dtype=torch.bool, device=positions.device))
        vectors = positions[neighbors] - positions[centers]
        if periodic:
            vectors = vectors + cell_shifts.to(positions.dtype) @ cell
        else:
            cell_shifts = torch.zeros(len(centers), 3, dtype=torch.int64, device=positions.device)
        lengths = torch.linalg.vector_norm(vectors.detach(), dim=1)
        for options in self._lists:
            keep = lengths < float(options.cutoff)
            if not options.full_list:  # each pair once: i < j, or i == j with the first nonzero shift positive
                first = cell_shifts[:, 0] * 4 + cell_shifts[:, 1] * 2 + cell_shifts[:, 2]
                keep &= (centers < neighbors) | ((centers == neighbors) & (first > 0))
            i, j = centers[keep], neighbors[keep]
            samples = torch.cat([i[:, None], j[:, None], cell_shifts[keep].to(i.dtype)], 1)
            system.add_neighbor_list(options, metatensor.TensorBlock(
                values=vectors[keep].reshape(-1, 3, 1),
                samples=metatensor.Labels(["first_atom", "second_atom", "cell_shift_a", "cell_shift_b",
                                           "cell_shift_c"], samples.to(torch.int32)),
                components=[metatensor.Labels("xyz", torch.arange(3, device=i.device).reshape(-1, 1))],
                properties=metatensor.Labels("distance", torch.zeros(1, 1, dtype=torch.int64, device=i.device))))
        self._options.selected_atoms = metatensor.Labels(["system", "atom"], torch.stack(
            [torch.zeros(n_local, dtype=torch.int32), torch.arange(n_local, dtype=torch.int32)], 1).to(positions.device))
        out = self.model([system], self._options, check_consistency=False)
        energy, feature = out["energy"].block(), out[self._feature].block()
        order = energy.samples.column("atom").argsort()  # selected atoms, in their order
        return energy.values[order, 0], feature.values[feature.samples.column("atom").argsort()].reshape(n_local, -1)


def _per_atom(output) -> bool:
    kind = getattr(output, "sample_kind", None)
    return kind == "atom" if kind is not None else bool(getattr(output, "per_atom", False))


def _receptive_field(model, declared: float, cutoff: float) -> tuple[float, str]:
    """(how far an atom's energy reaches, why): ``interaction_range``, or metatrain PET's real reach."""
    module = getattr(model, "module", None)
    if getattr(module, "original_name", "") == "PET" and getattr(module, "featurizer_type", "") == "feedforward":
        layers = int(module.num_gnn_layers) + 1
        reach = max(declared, layers * float(module.cutoff))
        if reach > declared:
            return reach, (f"{reach:g} A: PET with the feedforward featurizer reaches (num_gnn_layers + 1) x cutoff, "
                           f"more than its declared interaction_range {declared:g} A")
    return max(declared, cutoff), f"interaction_range {declared:g} A"


def lattice_of(shifts: Tensor) -> tuple[Tensor, Tensor] | None:
    """A periodic cell that the pair offsets are images of: (rows of ``shifts`` whose offsets form
    the cell's vectors, integer cell shift of every pair), or None when the offsets span fewer
    than three directions or are not integer combinations of the shortest independent three."""
    offsets = shifts.detach().cpu().to(torch.float64).numpy()
    nonzero = np.flatnonzero(np.abs(offsets).max(axis=1) > 0)
    if not len(nonzero):
        return None
    _, first = np.unique(np.round(offsets[nonzero] * 1e6).astype(np.int64), axis=0, return_index=True)
    candidates = nonzero[first][np.argsort(np.linalg.norm(offsets[nonzero[first]], axis=1), kind="stable")]
    rows: list[int] = []
    for row in candidates:
        trial = offsets[rows + [int(row)]]
        if np.linalg.matrix_rank(trial, tol=1e-8 * np.abs(trial).max()) == len(rows) + 1:
            rows.append(int(row))
            if len(rows) == 3:
                break
    if len(rows) < 3:
        return None
    fractional = offsets @ np.linalg.inv(offsets[rows])
    integer = np.round(fractional)
    if np.abs(fractional - integer).max() > 1e-6:
        return None
    return torch.tensor(rows, device=shifts.device), torch.from_numpy(integer.astype(np.int64)).to(shifts.device)


def unfold(positions: Tensor, species: Tensor, centers: Tensor, neighbors: Tensor, shifts: Tensor, n_local: int,
           hops: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A periodic graph (pairs i -> j with image offsets) as explicit nodes: the local atoms, then
    the images reached within ``hops`` pairs of them (an image = an atom and the sum of the
    offsets along the way; the same image reached twice is one node), and every pair between
    nodes. Node positions are ``positions[atom] + offset sum``: differentiable in both, so the
    energy's dependence on the offsets (the virial) survives. Returns (positions, species,
    centers, neighbors) of the nodes; the first ``n_local`` are the local atoms."""
    c, n = centers.cpu().numpy(), neighbors.cpu().numpy()
    shift_keys = np.round(shifts.detach().cpu().numpy().astype(np.float64) * 1e4).astype(np.int64)
    order = np.argsort(c, kind="stable")
    starts = np.searchsorted(c[order], np.arange(len(positions) + 1))

    def pairs_of(nodes: np.ndarray, node_atom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(node, pair) for every pair centred on the atom of each of ``nodes``."""
        first, counts = starts[node_atom[nodes]], starts[node_atom[nodes] + 1] - starts[node_atom[nodes]]
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(nodes, counts), order[np.repeat(first, counts) + within]

    atom, offset_key = np.arange(n_local), np.zeros((n_local, 3), np.int64)
    keys, levels, frontier = _keys(atom, offset_key), [], np.arange(n_local)
    for _ in range(hops):
        from_node, pair = pairs_of(frontier, atom)
        cand_atom, cand_key = n[pair], offset_key[from_node] + shift_keys[pair]
        cand = _keys(cand_atom, cand_key)
        _, first = np.unique(np.concatenate([keys, cand]), return_index=True)
        new = np.sort(first[first >= len(keys)] - len(keys))
        if not len(new):
            break
        frontier = np.arange(len(atom), len(atom) + len(new))
        levels.append((from_node[new], pair[new]))  # each new node's parent node and the pair that reached it
        atom, offset_key = np.concatenate([atom, cand_atom[new]]), np.concatenate([offset_key, cand_key[new]])
        keys = np.concatenate([keys, cand[new]])
    # node offsets level by level (parents come first): differentiable in ``shifts``
    device = positions.device
    node_offset = shifts.new_zeros(n_local, 3)
    for parent, via in levels:
        node_offset = torch.cat([node_offset, node_offset[torch.from_numpy(parent).to(device)]
                                 + shifts[torch.from_numpy(via).to(device)]])
    # every pair between nodes: node (a, O) -> node (b, O + s) when that image is a node
    from_node, pair = pairs_of(np.arange(len(atom)), atom)
    target = _keys(n[pair], offset_key[from_node] + shift_keys[pair])
    sorter = np.argsort(keys)
    found = np.minimum(np.searchsorted(keys, target, sorter=sorter), len(keys) - 1)
    hit = keys[sorter[found]] == target
    node_atom = torch.from_numpy(atom).to(device)
    return (positions[node_atom] + node_offset, species[node_atom],
            torch.from_numpy(from_node[hit]).to(device), torch.from_numpy(sorter[found][hit]).to(device))


def _keys(atom: np.ndarray, offset_key: np.ndarray) -> np.ndarray:
    """One sortable, comparable key per (atom, rounded offset) row."""
    rows = np.ascontiguousarray(np.column_stack([atom.astype(np.int64), offset_key]))
    return rows.view(np.dtype((np.void, rows.dtype.itemsize * 4))).ravel()
