"""``pair_style ltau`` on one rank: the keywords, the model and its force evaluation.

Called through the callback bridge (:mod:`ltau_lmp.lammps.bridge`) with the argument structs
of ``plugin/ltau_abi.h`` (mirrored in :mod:`ltau_lmp.lammps.abi`): zero-copy views of LAMMPS's
arrays, results written in place. Each force call publishes the local atoms' latent features
in :class:`~ltau_lmp.lammps.features.PairFeatures`, what ``fix ltau`` reads.
Contract: doc/architecture.md, "LAMMPS runtime".
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from ltau_lmp.collective import PeerFailed
from ltau_lmp.errors import LTAUError
from ltau_lmp.lammps import abi
from ltau_lmp.lammps import keywords as kw
from ltau_lmp.lammps.abi import view
from ltau_lmp.lammps.devices import select_device
from ltau_lmp.lammps.features import PairFeatures
from ltau_lmp.lammps.keywords import Words
from ltau_lmp.lammps.messages import describe_tags
from ltau_lmp.model.contract import VOIGT_COLS, VOIGT_ROWS, evaluate, non_finite


MESSAGE_PASSING = ("exchange", "shell")


@dataclass
class PairOptions:
    """Keywords of ``pair_style ltau`` (see doc/pair_ltau.md)."""

    allow_pickle: bool = False       # a pickled model file (MACE .model) runs code when loaded
    family: str | None = None        # None: detected from the file
    message_passing: str | None = None   # None: exchange when the model declares it, else shell

    @classmethod
    def parse(cls, words: list[str]) -> "PairOptions":
        from ltau_lmp.model import FAMILIES

        opts, words = cls(), Words(words)
        while words:
            keyword = words.pop()
            if keyword == "allow_pickle":
                opts.allow_pickle = kw.yes_no(words.take(keyword, "yes|no"), "allow_pickle")
            elif keyword == "family":
                opts.family = kw.choice(words.take(keyword, "|".join(FAMILIES)), "family", FAMILIES)
            elif keyword == "message_passing":
                opts.message_passing = kw.choice(words.take(keyword, "|".join(MESSAGE_PASSING)),
                                                 "message_passing", MESSAGE_PASSING)
            else:
                raise LTAUError(f"unknown keyword {keyword!r} "
                                f"(valid: allow_pickle, family, message_passing)")
        return opts


def message_passing_mode(card, requested: str | None) -> int:
    """The ``ltau_message_passing`` of a model on several ranks (one rank always folds).

    Exchange is the default: exact like the ghost shell, with one cutoff of ghosts instead of
    the receptive field. A model whose card does not declare ``ghost_exchange`` gets the shell,
    or an error when exchange was asked for. A strictly local model needs neither.
    """
    if card.num_layers == 1:
        return abi.MP_LOCAL
    if requested == "exchange" and not card.ghost_exchange:
        raise LTAUError(f"message_passing exchange: this {card.family} model cannot "
                        f"exchange ghost node features (its model card does not declare "
                        f"ghost_exchange); use message_passing shell")
    if requested == "shell" or not card.ghost_exchange:
        return abi.MP_SHELL
    return abi.MP_EXCHANGE


class _GhostRows(torch.autograd.Function):
    """Forward: ghost rows := their owners' rows. Backward, its transpose: ghost-row gradients
    summed onto the owners, ghost rows 0. Both are LAMMPS communications, collective over ranks."""

    @staticmethod
    def forward(ctx, rows, exchange):
        ctx.exchange = exchange
        return exchange.communicate(rows, abi.EXCHANGE_FORWARD)

    @staticmethod
    def backward(ctx, grad):
        return ctx.exchange.communicate(grad, abi.EXCHANGE_REVERSE), None


class GhostExchange:
    """The model contract's ``exchange=`` for one force call: Tensor (n_all, F) -> (n_all, F)
    with the ghost rows refreshed from their owners on other ranks (differentiable)."""

    def __init__(self, fn, handle, n_all: int):
        self.fn, self.handle, self.n_all = fn, handle, n_all

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.dim() != 2 or rows.shape[0] != self.n_all:
            raise LTAUError(f"exchange= takes an (n_all, F) = ({self.n_all}, F) tensor, got shape "
                            f"{tuple(rows.shape)}")
        return _GhostRows.apply(rows, self)

    def communicate(self, rows: torch.Tensor, direction: int) -> torch.Tensor:
        buf = rows.detach().to("cpu", torch.float64, copy=True).contiguous()
        status = self.fn(self.handle, ctypes.cast(buf.data_ptr(), ctypes.POINTER(ctypes.c_double)),
                         buf.shape[1], direction)
        if status != abi.OK:
            raise PeerFailed()
        return buf.to(rows.device, rows.dtype)


class PairRuntime:
    """The model of one ``pair_style ltau`` instance on this rank and its force evaluation.

    ``handle`` is the plugin's pair object (its callbacks' ``self``), which the ghost exchange
    takes back as its first argument; ``comm`` the LAMMPS world (mpi4py). ``features`` is what
    it publishes for ``fix ltau``.
    """

    def __init__(self, handle, comm) -> None:
        self.handle = handle
        self.model = None
        self.device = select_device(comm)
        self.features = PairFeatures()
        self.type2species = np.zeros(1, np.int64)

    def coeff(self, ntypes: int, model_file: str, elements: list[str], options: PairOptions):
        """Load the model and map LAMMPS types 1..ntypes to its species; returns its card."""
        from ltau_lmp.model import load_model

        if len(elements) != ntypes:
            raise LTAUError(f"pair_coeff needs one element per atom type: {ntypes} types, "
                            f"{len(elements)} elements given")
        model = load_model(model_file, map_location=self.device, family=options.family,
                           allow_pickle=options.allow_pickle)
        card = model.card
        missing = [e for e in elements if e not in card.species]
        if missing:
            raise LTAUError(f"element(s) {', '.join(missing)} not in model {model_file} "
                            f"(its species: {', '.join(card.species)})")
        self.message_passing = message_passing_mode(card, options.message_passing)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.card = card
        self.dtype = getattr(torch, card.dtype)
        self.type2species = np.array([0] + [card.species.index(e) for e in elements], np.int64)
        self.features.configure(card, elements)
        return card

    def compute(self, a: abi.PairComputeArgs) -> None:
        """One force call: forces on every node, the energy, per-atom and global virials, all
        written into LAMMPS's arrays and ``a`` (``ltau_pair_compute_args``).

        ``a.centers``/``a.neighbors`` hold LAMMPS's full list, pruned to r < cutoff by the shim;
        with ``a.shifts`` the graph is folded onto the local atoms (one rank, message passing);
        with ``a.exchange`` the model refreshes ghost node features through it after each layer,
        on every rank, even one without local atoms, since the exchanges are collective.

        Forces and virials come from the model contract's ``evaluate`` (ltau_lmp/model/contract.py),
        the one force formulation that the ASE calculator and the trainers use too: the gradient
        with respect to the per-pair offset (zero, or the folding shift) scattered onto both atoms
        of each pair, the virial summed over pairs.
        """
        model = self.model
        if model is None:
            raise LTAUError("pair_coeff * * MODEL_FILE ... was not given")
        step, nlocal, nghost, nedges = a.step, a.nlocal, a.nghost, a.nedges
        folded, exchange = bool(a.shifts), None
        if a.exchange:
            exchange = GhostExchange(a.exchange, self.handle, nlocal + nghost)
        needed = self.card.cutoff if exchange else self.card.receptive_field
        if not folded and a.cutghost < needed:   # the shim raises the ghost cutoff at init: a safety net
            raise LTAUError(f"model {self.card.model_hash[:12]} needs ghost atoms out to "
                            f"{needed:g} A but LAMMPS communicates only {a.cutghost:g} A; "
                            f"add `comm_modify cutoff {needed + 2.0:g}`")
        nodes = nlocal if folded else nlocal + nghost
        tags = view(a.tag, (nodes,), np.int32)
        a.energy = 0.0
        a.virial[:] = [0.0] * 6
        if nlocal == 0 and exchange is None:
            self.features.publish(step, tags[:0], None)
            return
        dev, dtype = self.device, self.dtype
        species_np = self.type2species[view(a.type, (nodes,), np.int32)]
        pos = torch.from_numpy(view(a.x, (nodes, 3))).to(dev, dtype)
        species = torch.from_numpy(species_np).to(dev)
        c = torch.from_numpy(view(a.centers, (nedges,), np.int64)).to(dev)
        n = torch.from_numpy(view(a.neighbors, (nedges,), np.int64)).to(dev)
        shifts = torch.from_numpy(view(a.shifts, (nedges, 3))).to(dev, dtype) if folded else None
        out = evaluate(model, pos, species, c, n, shifts, nlocal, exchange=exchange, virial=bool(a.vflag_global),
                       atom_virial=bool(a.vflag_atom), force_dtype=torch.float64)
        self.features.publish(step, tags[:nlocal], out.latent)
        _check_finite(step, out, c, n, tags)
        torch.from_numpy(view(a.f, (nodes, 3))).add_(out.forces.cpu())
        atom_energy = out.atom_energy.to(torch.float64)
        a.energy = float(atom_energy.sum())
        if a.eflag_atom:
            view(a.eatom, (nodes,))[:nlocal] += atom_energy.cpu().numpy()
        if a.vflag_global:
            a.virial[:] = out.virial[VOIGT_ROWS, VOIGT_COLS].tolist()
        if a.vflag_atom:
            torch.from_numpy(view(a.vatom, (nodes, 6))).add_(out.atom_virial.cpu())


def _check_finite(step: int, out, centers: torch.Tensor, neighbors: torch.Tensor, tags: np.ndarray) -> None:
    """Stop on NaN or inf energies or forces before they reach LAMMPS (a run would otherwise go on
    with ``PotEng -nan``), naming the atoms by ID (``non_finite``)."""
    found = non_finite(out, centers, neighbors)
    if found is not None:
        what, nodes = found
        raise LTAUError(f"step {step}: the model gave non-finite (NaN or inf) {what} involving "
                        f"{describe_tags(tags[nodes.cpu().numpy()])}: overlapping atoms, or a configuration "
                        "far outside the model's training data? (check the last dump or write_data before this step)")
