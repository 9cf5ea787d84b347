"""Per-rank Python runtime behind ``pair_style ltau`` and ``fix ltau``.

The C++ plugin (``plugin/ltau_plugin.cpp``) calls the functions registered here by
:func:`bootstrap` through ctypes. Every call gets zero-copy views of LAMMPS's arrays; results are
written in place. Each callback returns a status and writes a message instead of raising: the
plugin reduces the status over all ranks and stops every rank with the message, so an
exception on one rank never hangs the others. Contract: doc/architecture.md, "LAMMPS runtime".
"""

from __future__ import annotations

import ctypes
import os
import sys
import traceback
from ctypes import POINTER, c_char_p, c_double, c_int, c_int64, c_void_p
from dataclasses import dataclass, field

import numpy as np
import torch

from ltau_lmp.errors import LTAUError

_PD, _PI, _PI64 = POINTER(c_double), POINTER(c_int), POINTER(c_int64)
# message buffers are passed as c_void_p: writable memory owned by the plugin

PAIR_COEFF = ctypes.CFUNCTYPE(c_int, c_void_p, c_int, c_int, c_int, POINTER(c_char_p), _PD,
                              c_void_p, c_int)
PAIR_COMPUTE = ctypes.CFUNCTYPE(c_int, c_void_p, c_int64, c_int, c_int, _PD, _PI, _PI,
                                c_int64, _PI64, _PI64, c_int, c_int, c_int, c_double,
                                _PD, _PD, _PD, _PD, c_void_p, c_int)
DESTROY = ctypes.CFUNCTYPE(None, c_void_p)
FIX_CREATE = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_int, c_char_p, c_int,
                              POINTER(c_char_p), c_void_p, c_int)
FIX_STEP = ctypes.CFUNCTYPE(c_int, c_void_p, c_int64, c_int, _PD, _PI, _PI, c_int, _PD, _PD,
                            _PD, _PI, c_void_p, c_int)

_pairs: dict[int, "PairRuntime"] = {}
_fixes: dict[int, object] = {}
_registered: dict[str, tuple] = {}   # plugin path -> (CDLL, callbacks): kept alive for the process


def _view(ptr, shape, dtype=None) -> np.ndarray:
    """Zero-copy numpy view of a LAMMPS array; an empty array when nothing is there (NULL)."""
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype=dtype or np.float64)
    return np.ctypeslib.as_array(ptr, shape=shape)


def _local_rank() -> tuple[int, int]:
    """(rank, size) among the ranks of this node, from the launcher's environment."""
    for rank_var, size_var in (("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
                               ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
                               ("SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")):
        if rank_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ.get(size_var, "1").split("(")[0])
    return 0, 1


def select_device() -> torch.device:
    """One GPU per rank (by local rank) when CUDA is available, else the CPU.

    On the CPU the cores are shared out between the ranks of the node, unless the user set
    OMP_NUM_THREADS (torch already honours it); oversubscription slows every rank down.
    """
    local_rank, local_size = _local_rank()
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // max(1, local_size)))
    return torch.device("cpu")


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
    model_hash: str = ""
    _latent: torch.Tensor | None = None

    @property
    def latent(self) -> np.ndarray:
        """(nlocal, latent_dim) float32 descriptors of the local atoms, converted on first use."""
        if self._latent is None:
            return np.empty((0, 0), np.float32)
        if not isinstance(self._latent, np.ndarray):
            self._latent = self._latent.detach().to("cpu", torch.float32).numpy()
        return self._latent


class PairRuntime:
    """The model of one ``pair_style ltau`` instance on this rank and its force evaluation."""

    def __init__(self) -> None:
        self.model = None
        self.device = select_device()
        self.comm = None
        self.cache = ForceCache()
        self.type2species = np.zeros(1, np.int64)

    def coeff(self, comm, ntypes: int, model_file: str, elements: list[str]) -> float:
        """Load the model and map LAMMPS types 1..ntypes to its species; returns its cutoff."""
        from ltau_lmp.model import load_model

        if len(elements) != ntypes:
            raise LTAUError(f"pair_coeff needs one element per atom type: {ntypes} types, "
                            f"{len(elements)} elements given")
        model = load_model(model_file, map_location=self.device)
        missing = [e for e in elements if e not in model.species]
        if missing:
            raise LTAUError(f"element(s) {', '.join(missing)} not in model {model_file} "
                            f"(its species: {', '.join(model.species)})")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dtype = next(self.model.parameters()).dtype
        self.comm = comm
        self.type2species = np.array([0] + [model.species.index(e) for e in elements], np.int64)
        self.cache = ForceCache(symbols=list(model.species), model_hash=model.model_hash)
        return float(model.cutoff)

    def compute(self, step, nlocal, nghost, x, type_, tag, nedges, centers, neighbors,
                eflag_global, eflag_atom, vflag_atom, cutghost, f, energy, eatom, vatom) -> None:
        """Energy, forces on local and ghost atoms, per-atom energy/virial for one step.

        ``centers``/``neighbors`` hold LAMMPS's full list, pruned to r < cutoff by the shim.

        The gradient is taken with respect to a zero offset added to every pair vector, which
        gives dE/dr_ij per pair in one backward pass: forces follow by scattering it onto both
        atoms of the pair, and the per-atom virial by splitting -r_ij (x) dE/dr_ij between them,
        so the per-atom virials sum exactly to LAMMPS's f.r global virial.
        """
        model = self.model
        if model is None:
            raise LTAUError("pair_coeff * * MODEL_FILE ... was not given")
        needed = float(getattr(model, "receptive_field", model.cutoff))
        if cutghost < needed:
            raise LTAUError(f"model {self.cache.model_hash[:12]} needs ghost atoms out to "
                            f"{needed:g} A but LAMMPS communicates only {cutghost:g} A; "
                            f"add `comm_modify cutoff {needed + 2.0:g}`")
        nall = nlocal + nghost
        self.cache.step = step
        tags = _view(tag, (nlocal,), np.int32)
        self.cache.tags = tags.copy()
        self.cache.forces = _view(f, (nlocal, 3))
        if nlocal == 0:
            self.cache._latent, self.cache.species = None, np.empty(0, np.int64)
            energy[0] = 0.0
            return
        dev, dtype = self.device, self.dtype
        species_np = self.type2species[_view(type_, (nall,), np.int32)]
        self.cache.species = species_np[:nlocal]
        pos = torch.from_numpy(_view(x, (nall, 3))).to(dev, dtype)
        species = torch.from_numpy(species_np).to(dev)
        c = torch.from_numpy(_view(centers, (nedges,), np.int64)).to(dev)
        n = torch.from_numpy(_view(neighbors, (nedges,), np.int64)).to(dev)
        offset = torch.zeros((nedges, 3), dtype=dtype, device=dev, requires_grad=True)
        with torch.enable_grad():
            atom_energy, latent = model(pos, species, c, n, offset, nlocal)
            (g,) = torch.autograd.grad(atom_energy.sum(), offset)
        self.cache._latent = latent
        g = g.to(torch.float64)
        # r_ij = x_j - x_i: dE/dx_j = g, dE/dx_i = -g, F = -dE/dx
        forces = torch.from_numpy(_view(f, (nall, 3)))
        if dev.type == "cpu":
            forces.index_add_(0, c, g).index_add_(0, n, g, alpha=-1.0)
        else:
            acc = torch.zeros((nall, 3), dtype=torch.float64, device=dev)
            forces += acc.index_add_(0, c, g).index_add_(0, n, g, alpha=-1.0).cpu()
        atom_energy = atom_energy.detach().to(torch.float64)
        energy[0] = float(atom_energy.sum())
        if eflag_atom:
            _view(eatom, (nall,))[:nlocal] += atom_energy.cpu().numpy()
        if vflag_atom:
            r = (pos[n] - pos[c]).to(torch.float64)
            a, b = (0, 1, 2, 0, 0, 1), (0, 1, 2, 1, 2, 2)
            half = -0.5 * r[:, a] * g[:, b]
            acc = torch.zeros((nall, 6), dtype=torch.float64, device=dev)
            acc.index_add_(0, c, half).index_add_(0, n, half)
            torch.from_numpy(_view(vatom, (nall, 6))).add_(acc.cpu())


def _fail(msg_buf, msglen: int, exc: BaseException) -> None:
    """Write the message for LAMMPS (the user's error verbatim, anything else with its type)."""
    if isinstance(exc, LTAUError):
        text = str(exc)
    else:
        traceback.print_exc(file=sys.stderr)
        text = f"{type(exc).__name__}: {exc}"
    data = text.encode("utf-8", "replace")[: msglen - 1] + b"\0"
    ctypes.memmove(msg_buf, data, len(data))


def _args(narg: int, arg) -> list[str]:
    return [arg[i].decode() for i in range(narg)]


def _comm(fcomm: int):
    from mpi4py import MPI

    return MPI.Comm.f2py(fcomm)


def _pair_coeff(handle, fcomm, ntypes, narg, arg, cutoff, msg, msglen):
    try:
        args = _args(narg, arg)
        runtime = _pairs.setdefault(handle, PairRuntime())
        cutoff[0] = runtime.coeff(_comm(fcomm), ntypes, args[0], args[1:])
        return 0
    except BaseException as exc:
        _fail(msg, msglen, exc)
        return 1


def _pair_compute(handle, step, nlocal, nghost, x, type_, tag, nedges, centers, neighbors,
                  eflag_global, eflag_atom, vflag_atom, cutghost, f, energy, eatom, vatom,
                  msg, msglen):
    try:
        runtime = _pairs.get(handle)
        if runtime is None:
            raise LTAUError("pair_coeff * * MODEL_FILE El1 El2 ... was not given")
        runtime.compute(step, nlocal, nghost, x, type_, tag, nedges, centers, neighbors,
                        eflag_global, eflag_atom, vflag_atom, cutghost, f, energy, eatom, vatom)
        return 0
    except BaseException as exc:
        _fail(msg, msglen, exc)
        return 1


def _pair_destroy(handle):
    _pairs.pop(handle, None)


def _fix_create(handle, pair_handle, fcomm, fix_id, narg, arg, msg, msglen):
    try:
        from ltau_lmp.lammps.fix import FixLtau

        runtime = _pairs.get(pair_handle)
        if runtime is None:
            raise LTAUError("fix ltau needs pair_coeff * * MODEL_FILE ... of pair_style ltau first")
        _fixes[handle] = FixLtau(fix_id.decode(), _args(narg, arg), _comm(fcomm), runtime)
        return 0
    except BaseException as exc:
        _fail(msg, msglen, exc)
        return 2


def _fix_end_of_step(handle, step, nlocal, x, tag, mask, groupbit, peratom, global6, box9,
                     periodic3, msg, msglen):
    try:
        return int(_fixes[handle].end_of_step(
            step, nlocal, _view(x, (nlocal, 3)), _view(tag, (nlocal,), np.int32),
            _view(mask, (nlocal,), np.int32), groupbit, _view(peratom, (nlocal, 4)),
            _view(global6, (6,)), box=_view(box9, (9,)).copy(),
            periodic=tuple(bool(periodic3[i]) for i in range(3))))
    except BaseException as exc:
        _fail(msg, msglen, exc)
        return 2


def _fix_destroy(handle):
    _fixes.pop(handle, None)


def bootstrap(so_path: str) -> None:
    """Register the callbacks with the plugin at ``so_path`` (idempotent, once per process).

    The plugin must already be loaded by LAMMPS (``plugin load`` or auto-load): ctypes then
    gets the very same library handle, hence the same callback table.
    """
    so_path = os.path.realpath(so_path)
    if so_path in _registered:
        return
    lib = ctypes.CDLL(so_path, mode=ctypes.RTLD_GLOBAL)
    callbacks = (PAIR_COEFF(_pair_coeff), PAIR_COMPUTE(_pair_compute), DESTROY(_pair_destroy),
                 FIX_CREATE(_fix_create), FIX_STEP(_fix_end_of_step), DESTROY(_fix_destroy))
    lib.ltau_set_callbacks.argtypes = [type(cb) for cb in callbacks]
    lib.ltau_set_callbacks.restype = None
    lib.ltau_set_callbacks(*callbacks)
    _registered[so_path] = (lib, callbacks)
