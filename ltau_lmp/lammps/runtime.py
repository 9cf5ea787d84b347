"""Per-rank Python runtime behind ``pair_style ltau`` and ``fix ltau``.

The C++ plugin (``plugin/ltau_plugin.cpp``) calls the functions registered here by
:func:`bootstrap` through ctypes; each gets one argument struct of ``plugin/ltau_abi.h``
(mirrored in :mod:`ltau_lmp.lammps.abi`) holding zero-copy views of LAMMPS's arrays, and writes
its results in place. Each callback returns a status and writes a message instead of raising:
the plugin reduces the status over all ranks and stops every rank with the message, so an
exception on one rank never hangs the others. Contract: doc/architecture.md, "LAMMPS runtime".
"""

from __future__ import annotations

import ctypes
import os
import sys
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from ltau_lmp.errors import LTAUError
from ltau_lmp.lammps import abi
from ltau_lmp.lammps import keywords as kw
from ltau_lmp.lammps.devices import select_device
from ltau_lmp.lammps.fix import FixLtau, HaltCondition, PeerFailed, describe_tags
from ltau_lmp.lammps.keywords import Words

_pairs: dict[int, "PairRuntime"] = {}
_fixes: dict[int, FixLtau] = {}
_registered: dict[str, tuple] = {}   # plugin path -> (CDLL, callback table): kept alive for the process


def _view(ptr, shape, dtype=None) -> np.ndarray:
    """Zero-copy numpy view of a LAMMPS array; an empty array when nothing is there (NULL)."""
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype=dtype or np.float64)
    return np.ctypeslib.as_array(ptr, shape=shape)


@dataclass
class ForceCache:
    """What the last force call on this rank left for ``fix ltau`` (local atoms only).

    ``forces`` is a view into LAMMPS's force array: it holds the complete force on each local
    atom (ghost contributions summed, other fixes included) at ``end_of_step`` of the same step.
    """

    step: int = -1
    tags: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    species: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    forces: np.ndarray = field(default_factory=lambda: np.empty((0, 3)))
    symbols: list[str] = field(default_factory=list)
    _latent: torch.Tensor | None = None

    @property
    def latent(self) -> np.ndarray:
        """(nlocal, latent_dim) float32 descriptors of the local atoms, converted on first use."""
        if self._latent is None:
            return np.empty((0, 0), np.float32)
        if not isinstance(self._latent, np.ndarray):
            self._latent = self._latent.detach().to("cpu", torch.float32).numpy()
        return self._latent


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
    takes back as its first argument.
    """

    def __init__(self, handle) -> None:
        self.handle = handle
        self.model = None
        self.device = select_device()
        self.cache = ForceCache()
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
        self.cache = ForceCache(symbols=list(card.species))
        return card

    def compute(self, a: abi.PairComputeArgs) -> None:
        """One force call: forces on every node, the energy, per-atom and global virials, all
        written into LAMMPS's arrays and ``a`` (``ltau_pair_compute_args``).

        ``a.centers``/``a.neighbors`` hold LAMMPS's full list, pruned to r < cutoff by the shim;
        with ``a.shifts`` the graph is folded onto the local atoms (one rank, message passing);
        with ``a.exchange`` the model refreshes ghost node features through it after each layer,
        on every rank, even one without local atoms, since the exchanges are collective.

        The gradient is taken with respect to the per-pair offset (zero, or the folding shift)
        added to every pair vector, which gives g_ij = dE/dr_ij in one backward pass: forces
        follow by scattering g onto both atoms of the pair, the global virial is
        -sum r_ij (x) g_ij, and the per-atom virial splits each pair's term between its atoms.
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
        self.cache.step = step
        self.cache.tags = _view(a.tag, (nlocal,), np.int32).copy()
        self.cache.forces = _view(a.f, (nlocal, 3))
        a.energy = 0.0
        a.virial[:] = [0.0] * 6
        if nlocal == 0 and exchange is None:
            self.cache._latent, self.cache.species = None, np.empty(0, np.int64)
            return
        dev, dtype = self.device, self.dtype
        species_np = self.type2species[_view(a.type, (nodes,), np.int32)]
        self.cache.species = species_np[:nlocal]
        pos = torch.from_numpy(_view(a.x, (nodes, 3))).to(dev, dtype)
        species = torch.from_numpy(species_np).to(dev)
        c = torch.from_numpy(_view(a.centers, (nedges,), np.int64)).to(dev)
        n = torch.from_numpy(_view(a.neighbors, (nedges,), np.int64)).to(dev)
        if folded:
            offset = torch.from_numpy(_view(a.shifts, (nedges, 3))).to(dev, dtype)
        else:
            offset = torch.zeros((nedges, 3), dtype=dtype, device=dev)
        offset.requires_grad_()
        with torch.enable_grad():
            if exchange is None:
                atom_energy, latent = model(pos, species, c, n, offset, nlocal)
            else:
                atom_energy, latent = model(pos, species, c, n, offset, nlocal, exchange=exchange)
            (g,) = torch.autograd.grad(atom_energy.sum(), offset)
        self.cache._latent = latent
        _check_finite(step, atom_energy, g, c, n, _view(a.tag, (nodes,), np.int32))
        g = g.to(torch.float64)
        # r_ij = x_j - x_i + offset_ij: dE/dx_j = g, dE/dx_i = -g, F = -dE/dx
        forces = torch.from_numpy(_view(a.f, (nodes, 3)))
        if dev.type == "cpu":
            forces.index_add_(0, c, g).index_add_(0, n, g, alpha=-1.0)
        else:
            acc = torch.zeros((nodes, 3), dtype=torch.float64, device=dev)
            forces += acc.index_add_(0, c, g).index_add_(0, n, g, alpha=-1.0).cpu()
        atom_energy = atom_energy.detach().to(torch.float64)
        a.energy = float(atom_energy.sum())
        if a.eflag_atom:
            _view(a.eatom, (nodes,))[:nlocal] += atom_energy.cpu().numpy()
        if a.vflag_global or a.vflag_atom:
            r = (pos[n] - pos[c] + offset.detach()).to(torch.float64)
            rows, cols = (0, 1, 2, 0, 0, 1), (0, 1, 2, 1, 2, 2)    # xx yy zz xy xz yz
            pair_virial = -r[:, rows] * g[:, cols]
            if a.vflag_global:
                a.virial[:] = pair_virial.sum(0).tolist()
            if a.vflag_atom:
                half = 0.5 * pair_virial
                acc = torch.zeros((nodes, 6), dtype=torch.float64, device=dev)
                acc.index_add_(0, c, half).index_add_(0, n, half)
                torch.from_numpy(_view(a.vatom, (nodes, 6))).add_(acc.cpu())


def _check_finite(step: int, atom_energy: torch.Tensor, g: torch.Tensor, centers: torch.Tensor,
                  neighbors: torch.Tensor, tags: np.ndarray) -> None:
    """Stop on NaN or inf energies or forces before they reach LAMMPS (a run would otherwise go on
    with ``PotEng -nan``), naming the atoms: a local atom whose energy is not finite, and both
    atoms of every pair whose force is not. Two reductions per force call: negligible."""
    energy_ok, force_ok = bool(torch.isfinite(atom_energy).all()), bool(torch.isfinite(g).all())
    if energy_ok and force_ok:
        return
    bad_energy = (~torch.isfinite(atom_energy)).nonzero().flatten()
    bad_pairs = (~torch.isfinite(g).all(dim=1)).nonzero().flatten()
    atoms = torch.cat([bad_energy, centers[bad_pairs], neighbors[bad_pairs]]).cpu().numpy()
    what = " and ".join(w for w, bad in (("energies", not energy_ok), ("forces", not force_ok)) if bad)
    raise LTAUError(f"step {step}: the model gave non-finite (NaN or inf) {what} involving "
                    f"{describe_tags(tags[atoms])}: overlapping atoms, or a configuration far outside "
                    "the model's training data? (check the last dump or write_data before this step)")


def _write_message(msg, text: str) -> None:
    """Copy ``text`` into the plugin's message buffer (truncated to ``abi.MSGLEN``)."""
    data = text.encode("utf-8", "replace")[: abi.MSGLEN - 1] + b"\0"
    ctypes.memmove(msg, data, len(data))


def _fail(msg, exc: BaseException) -> None:
    """Write the message for LAMMPS (the user's error verbatim, anything else with its type)."""
    if isinstance(exc, (LTAUError, HaltCondition)):
        text = str(exc)
    else:
        traceback.print_exc(file=sys.stderr)
        text = f"{type(exc).__name__}: {exc}"
    _write_message(msg, text)


def _words(narg: int, arg) -> list[str]:
    return [arg[i].decode() for i in range(narg)]


def _comm(fcomm: int):
    from mpi4py import MPI

    return MPI.Comm.f2py(fcomm)


def _guarded(fn):
    """Callback wrapper: the status for the plugin, the message of any exception (or, with
    status OK, the report ``fn`` returned for the user).

    ``PeerFailed`` means another rank failed in a collective step: this rank returns OK and
    the plugin shows the failing rank's message on all ranks.
    """
    def callback(handle, args, msg):
        try:
            report = fn(handle, args.contents)
            if report:
                _write_message(msg, report)
            return abi.OK
        except PeerFailed:
            return abi.OK
        except HaltCondition as exc:
            _fail(msg, exc)
            return abi.HALT
        except BaseException as exc:
            _fail(msg, exc)
            return abi.ERROR
    return callback


@_guarded
def _pair_coeff(handle, a: abi.PairCoeffArgs):
    words = _words(a.narg, a.arg)
    options = PairOptions.parse(_words(a.nsettings, a.settings))
    runtime = _pairs.setdefault(handle, PairRuntime(handle))
    card = runtime.coeff(a.ntypes, words[0], words[1:], options)
    a.cutoff = card.cutoff
    a.receptive_field = card.receptive_field
    a.message_passing = runtime.message_passing


@_guarded
def _pair_compute(handle, a: abi.PairComputeArgs):
    runtime = _pairs.get(handle)
    if runtime is None:
        raise LTAUError("pair_coeff * * MODEL_FILE El1 El2 ... was not given")
    runtime.compute(a)


def _pair_destroy(handle):
    _pairs.pop(handle, None)


def _pair_runtime(pair_handle) -> "PairRuntime":
    runtime = _pairs.get(pair_handle) if pair_handle else None
    if runtime is None:
        raise LTAUError("it needs pair_style ltau with its pair_coeff * * MODEL_FILE ... "
                        "(the pair style was redefined without pair_coeff, or is not ltau)")
    return runtime


@_guarded
def _fix_create(handle, a: abi.FixCreateArgs):
    fix = FixLtau(a.fix_id.decode(), _words(a.narg, a.arg), _comm(a.fcomm), _pair_runtime(a.pair))
    _fixes[handle] = fix
    a.nevery = fix.opts.every
    a.halt_mode = fix.opts.halt_mode_code
    a.halt_message = int(fix.opts.halt_message)
    a.size_peratom_cols = fix.n_peratom
    a.size_vector = fix.n_vector


@_guarded
def _fix_init(handle, a: abi.FixInitArgs):
    if not a.pair:
        raise LTAUError("it requires pair_style ltau: the pair style was redefined to another "
                        "style (unfix the ltau fix first, or define pair_style ltau again)")
    fix = _fixes[handle]
    fix.bind(_pair_runtime(a.pair))
    return fix.start(a.step, a.natoms_group)   # collective; the plugin prints rank 0's report


@_guarded
def _fix_step(handle, a: abi.FixStepArgs):
    fix = _fixes[handle]
    n = a.nlocal
    fix.end_of_step(
        a.step, n, _view(a.x, (n, 3)), _view(a.tag, (n,), np.int32), _view(a.mask, (n,), np.int32),
        a.groupbit, _view(a.peratom, (n, fix.n_peratom)), _view(a.global_, (1 + fix.n_vector,)),
        box=np.array(a.box[:]), periodic=tuple(bool(p) for p in a.periodic), check_halt=bool(a.check_halt))


def _fix_destroy(handle):
    _fixes.pop(handle, None)


def bootstrap(so_path: str) -> None:
    """Register the callbacks with the plugin at ``so_path`` (idempotent, once per process).

    The plugin must already be loaded by LAMMPS (``plugin load`` or auto-load): ctypes then
    gets the very same library handle, hence the same callback table. A plugin built for
    another ABI version is refused with "rebuild the plugin".
    """
    so_path = os.path.realpath(so_path)
    if so_path in _registered:
        return
    lib = ctypes.CDLL(so_path, mode=ctypes.RTLD_GLOBAL)
    table = abi.Callbacks(
        abi_version=abi.ABI_VERSION,
        pair_coeff=abi.PAIR_COEFF(_pair_coeff), pair_compute=abi.PAIR_COMPUTE(_pair_compute),
        pair_destroy=abi.DESTROY(_pair_destroy), fix_create=abi.FIX_CREATE(_fix_create),
        fix_init=abi.FIX_INIT(_fix_init), fix_step=abi.FIX_STEP(_fix_step),
        fix_destroy=abi.DESTROY(_fix_destroy))
    abi.register(lib, so_path, table)
    _registered[so_path] = (lib, table)
