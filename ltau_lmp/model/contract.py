"""The model contract: what every force field declares (``ForceField``) and the one force formulation
(``evaluate``) that the ASE calculator, ``ltau_lmp.prediction`` (the trainer's loss, evaluate,
select, replay, the artefact writer) and the LAMMPS pair style share.

Forward contract (doc/architecture.md, "Model contract")::

    atom_energy, latent = model(positions, species, centers, neighbors, shifts, n_local[, exchange=])

``evaluate`` adds the forces and virials. It differentiates the energy with respect to a per-pair
offset added to every pair vector r_ij = x_j - x_i + offset_ij (zero, or the pair's periodic
shift), which gives g_ij = dE/dr_ij in one backward pass: forces on all nodes follow by scattering
g onto both atoms of each pair, the virial is -sum r_ij (x) g_ij, and the per-atom virial gives
half of each pair's term to each of its atoms. Exact for any model whose energy depends on the
positions only through the pair vectors (every model behind the contract).

``ForceField`` is the base class of the built-in model and the MACE and NequIP/Allegro adapters:
it builds the card once (rebuilt only when a weight changed), relays the ghost exchanges of a rank
without local atoms, names the trainable module and loads one epoch's checkpoint into it.
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ltau_lmp.errors import LTAUError
from ltau_lmp.model.card import ModelCard, hash_state

# the six virial components as LAMMPS orders them (xx yy zz xy xz yz): rows and columns of the 3x3
VOIGT_ROWS, VOIGT_COLS = (0, 1, 2, 0, 0, 1), (0, 1, 2, 1, 2, 2)
_FULL_FROM_VOIGT = [0, 3, 4, 3, 1, 5, 4, 5, 2]  # the symmetric 3x3, row by row


class ModelOutput(NamedTuple):
    """What ``evaluate`` returns; what was not asked for is None."""

    atom_energy: Tensor               # (n_local,)
    forces: Tensor | None             # (n_all, 3), ghosts included
    latent: Tensor                    # (n_local, latent_dim)
    virial: Tensor | None             # (3, 3) symmetric, W = -dE/d(strain) = -sum_ij r_ij (x) g_ij
    atom_virial: Tensor | None = None     # (n_all, 6) float64, xx yy zz xy xz yz; half of each pair to each atom
    pair_gradient: Tensor | None = None   # (E, 3) g_ij = dE/dr_ij, in the forces' dtype


def evaluate(model: nn.Module, positions: Tensor, species: Tensor, centers: Tensor, neighbors: Tensor,
             shifts: Tensor | None, n_local: int, forces: bool = True, virial: bool = False,
             create_graph: bool = False, *, exchange=None, atom_virial: bool = False,
             force_dtype: torch.dtype | None = None) -> ModelOutput:
    """Energies, latents, forces and virials of any model honouring the forward contract.

    ``shifts`` (E, 3) are the per-pair offsets (periodic image shifts; ``None`` = zero: LAMMPS's
    explicit ghost images); the energy is differentiated with respect to them (module docstring).
    ``exchange``: the per-layer ghost exchange, passed to the model as ``exchange=`` (only for a
    model whose card declares ``ghost_exchange``). Forces and the pair gradient come in
    ``force_dtype`` (default: the model's dtype; LAMMPS asks float64), the virial in the same dtype
    (computed in float64), the per-atom virial in float64. ``create_graph=True`` keeps the graph
    (force-matching losses); otherwise the outputs are detached. Nothing is moved between devices.
    """
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    positions = torch.as_tensor(positions, dtype=dtype)
    species, centers, neighbors = (torch.as_tensor(a, dtype=torch.int64) for a in (species, centers, neighbors))
    extra = {} if exchange is None else {"exchange": exchange}
    if not (forces or virial or atom_virial):
        shifts = None if shifts is None else torch.as_tensor(shifts, dtype=dtype)
        atom_energy, latent = model(positions, species, centers, neighbors, shifts, n_local, **extra)
        if not create_graph:
            atom_energy, latent = atom_energy.detach(), latent.detach()
        return ModelOutput(atom_energy, None, latent, None)

    if shifts is None:
        offset = torch.zeros((len(centers), 3), dtype=dtype, device=positions.device)
    else:
        offset = torch.as_tensor(shifts, dtype=dtype).detach()
    offset.requires_grad_()
    if getattr(model, "forces_from_positions", False):
        return _evaluate_positions(model, positions, species, centers, neighbors, offset, n_local, forces, virial,
                                   create_graph, atom_virial, force_dtype or dtype)
    with torch.enable_grad():
        atom_energy, latent = model(positions, species, centers, neighbors, offset, n_local, **extra)
        energy = atom_energy.sum()
        if energy.requires_grad:
            # materialize_grads: a rank with no local atoms or no pairs still gets zero forces, not an error
            (g,) = torch.autograd.grad(energy, offset, create_graph=create_graph,
                                       allow_unused=True, materialize_grads=True)
        else:  # no local atoms: nothing depends on the pairs
            g = torch.zeros_like(offset)
    g = g.to(force_dtype or dtype)
    nodes = positions.shape[0]
    out_forces = out_virial = out_atom_virial = None
    if forces:  # r_ij = x_j - x_i + offset_ij: dE/dx_j = g, dE/dx_i = -g, F = -dE/dx
        out_forces = torch.zeros((nodes, 3), dtype=g.dtype, device=g.device)
        out_forces = out_forces.index_add_(0, centers, g).index_add_(0, neighbors, g, alpha=-1.0)
    if virial or atom_virial:
        r = (positions[neighbors] - positions[centers] + offset.detach()).to(torch.float64)
        pair_virial = -r[:, VOIGT_ROWS] * g.to(torch.float64)[:, VOIGT_COLS]
        if virial:
            out_virial = pair_virial.sum(0)[_FULL_FROM_VOIGT].view(3, 3).to(g.dtype)
        if atom_virial:
            half = 0.5 * pair_virial
            out_atom_virial = torch.zeros((nodes, 6), dtype=torch.float64, device=g.device)
            out_atom_virial.index_add_(0, centers, half).index_add_(0, neighbors, half)
    out = ModelOutput(atom_energy, out_forces, latent, out_virial, out_atom_virial, g)
    if not create_graph:
        out = ModelOutput(*(None if t is None else t.detach() for t in out))
    return out


def _evaluate_positions(model, positions, species, centers, neighbors, offset, n_local, forces, virial, create_graph,
                        atom_virial, force_dtype) -> ModelOutput:
    """``evaluate`` for a model that reads positions, not only the pair vectors it is given
    (``forces_from_positions``: metatomic models recompute their pair vectors): forces are
    -dE/dx on every node, the virial W = -(sum_i x_i (x) dE/dx_i + sum_ij o_ij (x) dE/do_ij) over
    the nodes and the per-pair offsets (origin-free for a translation-invariant energy),
    symmetrised as LAMMPS and ASE report it. Per-pair gradients, hence per-atom virials, do not
    exist for such a model."""
    if atom_virial:
        raise LTAUError(f"per-atom virials (compute stress/atom, centroid/stress/atom) are not available for "
                        f"this {model.card.family} model: it computes its pair vectors from the positions "
                        f"itself, so its energy has no per-pair gradient")
    positions = positions.detach().requires_grad_()
    with torch.enable_grad():
        atom_energy, latent = model(positions, species, centers, neighbors, offset, n_local)
        energy = atom_energy.sum()
        if energy.requires_grad:
            gx, go = torch.autograd.grad(energy, (positions, offset), create_graph=create_graph, allow_unused=True,
                                         materialize_grads=True)
        else:  # no local atoms
            gx, go = torch.zeros_like(positions), torch.zeros_like(offset)
    out_forces = (-gx).to(force_dtype) if forces else None
    out_virial = None
    if virial:
        w = -(positions.detach().to(torch.float64).T @ gx.to(torch.float64)
              + offset.detach().to(torch.float64).T @ go.to(torch.float64))
        out_virial = (0.5 * (w + w.T)).to(force_dtype)
    out = ModelOutput(atom_energy, out_forces, latent, out_virial)
    if not create_graph:
        out = ModelOutput(*(None if t is None else t.detach() for t in out))
    return out


def non_finite(out: ModelOutput, centers: Tensor, neighbors: Tensor) -> tuple[str, Tensor] | None:
    """None when ``evaluate``'s energies and pair gradients are all finite, else (what was not:
    "energies", "forces" or both, the sorted nodes involved: a node whose energy is not finite and
    both nodes of every pair whose gradient is not). Every engine checks its output with it before
    the numbers reach the user. A sum is finite only if every term is: one reduction each (~10x
    cheaper than an elementwise test) unless something is wrong, or a sum merely overflowed."""
    energy, g = out.atom_energy, out.pair_gradient
    if bool(torch.isfinite(energy.sum())) and (g is None or bool(torch.isfinite(g.sum()))):
        return None
    bad_energy = (~torch.isfinite(energy)).nonzero().flatten()
    bad_pairs = (~torch.isfinite(g).all(dim=1)).nonzero().flatten() if g is not None else bad_energy[:0]
    if not len(bad_energy) and not len(bad_pairs):
        return None
    what = " and ".join(w for w, bad in (("energies", bad_energy), ("forces", bad_pairs)) if len(bad))
    return what, torch.cat([bad_energy, centers[bad_pairs], neighbors[bad_pairs]]).unique()

class ForceField(nn.Module):
    """Base class of every model behind the contract (the built-in model and the adapters).

    A subclass sets ``family``, ``species``, ``cutoff``, ``num_layers``, ``latent_dim``,
    ``latent_description`` (the card's ``latent``) and, when it exchanges ghost features,
    ``ghost_exchange`` and ``exchange_widths``; it defines ``dtype``, ``architecture()`` (what the
    hash covers besides the weights) and, when it wraps another module, ``trainable``.
    """

    family: str
    species: tuple[str, ...]
    cutoff: float
    num_layers: int = 1
    latent_dim: int
    latent_description: str
    ghost_exchange: bool = False
    exchange_widths: tuple[int, ...] = ()   # widths F of the exchange= calls, in order
    forces_from_positions: bool = False     # the energy reads positions itself (``_evaluate_positions``)

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def trainable(self) -> nn.Module:
        """The module a trainer optimises and its checkpoints hold; its weights are the hashed ones."""
        return self

    def architecture(self) -> dict:
        """JSON-ready description of everything but the weights that the model hash covers."""
        raise NotImplementedError

    @property
    def card(self) -> ModelCard:
        """The declared contract, built once and rebuilt only after a weight changed (in place,
        loaded, replaced or moved), so reading it is cheap."""
        tensors = self.trainable.state_dict(keep_vars=True)
        key = _weights_key(tensors)
        memo = self.__dict__.get("_card_memo")
        if key is None or memo is None or memo[0] != key:
            model_hash = hash_state(hashlib.sha256(json.dumps(self.architecture(), sort_keys=True).encode()),
                                    tensors)
            card = ModelCard(
                family=self.family, species=tuple(self.species), cutoff=self.cutoff, num_layers=self.num_layers,
                receptive_field=self.cutoff * self.num_layers, latent_dim=self.latent_dim,
                latent=self.latent_description, dtype=str(self.dtype).removeprefix("torch."),
                model_hash=model_hash, ghost_exchange=self.ghost_exchange)
            # the tensors are kept so that no other tensor can take their addresses while the key holds
            memo = (key, [t.detach() for t in tensors.values()], card)
            if key is not None:
                self.__dict__["_card_memo"] = memo
        return memo[2]

    @property
    def model_hash(self) -> str:
        """sha256 over the architecture and every weight (the card's)."""
        return self.card.model_hash

    def checkpoint_state(self, payload) -> dict:
        """The state dict of ``trainable`` in one training checkpoint (a state dict, alone or under
        "model": MACE's layout)."""
        return payload["model"] if isinstance(payload, dict) and "model" in payload else payload

    def load_checkpoint(self, payload) -> None:
        """Load one epoch's weights (``torch.load`` of a per-epoch checkpoint) into ``trainable``."""
        self.trainable.load_state_dict(self.checkpoint_state(payload))

    def no_local_atoms(self, positions: Tensor, shifts: Tensor | None, exchange) -> tuple[Tensor, Tensor]:
        """Outputs of a rank without local atoms. With ``exchange`` it still makes every exchange,
        forward and (in the backward) reverse, as the other ranks do: they are collective, and its
        ghost rows may relay other ranks' rows. Zeros of each width go through, chained so that the
        backward visits them in reverse order, and the empty outputs depend on them."""
        if exchange is None:
            return positions[:0, 0], positions.new_zeros(0, self.latent_dim)
        link = positions.sum() * 0 + (0 if shifts is None else shifts.to(positions.dtype).sum() * 0)
        for width in self.exchange_widths:
            link = exchange(positions.new_zeros(positions.shape[0], width) + link).sum() * 0
        return positions[:0, 0] + link, positions.new_zeros(0, self.latent_dim)

    def __getstate__(self):  # copies and pickles rebuild the card
        state = super().__getstate__()
        state.pop("_card_memo", None)
        return state


def _weights_key(tensors: dict[str, Tensor]):
    """What identifies the current weights without reading them: every tensor's name, storage
    address, in-place version counter, dtype, shape and device (None: not trackable)."""
    try:
        return tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.device)
                     for name, t in tensors.items())
    except (RuntimeError, AttributeError):  # inference tensors have no version counter
        return None
