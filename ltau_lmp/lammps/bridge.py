"""The callback bridge between the C++ plugin and the per-rank Python objects.

The plugin (``plugin/``) calls the functions registered here by :func:`bootstrap` through
ctypes; each gets one argument struct of ``plugin/ltau_abi.h`` (mirrored in
:mod:`ltau_lmp.lammps.abi`) and hands it on: ``pair_*`` to the :class:`PairRuntime` of the
plugin's pair object, ``fix_*`` to the :class:`FixLtau` of its fix object (both kept here,
keyed by the C++ ``this`` pointer). Each callback returns a status and writes a message
instead of raising: the plugin reduces the status over all ranks and stops every rank with
the message, so an exception on one rank never hangs the others.
Contract: doc/architecture.md, "LAMMPS runtime".
"""

from __future__ import annotations

import ctypes
import os
import sys
import traceback

import numpy as np

from ltau_lmp.collective import HaltCondition, PeerFailed
from ltau_lmp.errors import LTAUError
from ltau_lmp.lammps import abi
from ltau_lmp.lammps.abi import view
from ltau_lmp.lammps.fix import FixLtau
from ltau_lmp.lammps.fix_step import StepView
from ltau_lmp.lammps.pair import PairOptions, PairRuntime

_pairs: dict[int, PairRuntime] = {}
_fixes: dict[int, FixLtau] = {}
_registered: dict[str, tuple] = {}   # plugin path -> (CDLL, callback table): kept alive for the process


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
    if handle not in _pairs:
        _pairs[handle] = PairRuntime(handle, _comm(a.fcomm))
    runtime = _pairs[handle]
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


def _pair_features(pair_handle):
    """What the pair object ``pair_handle`` publishes for the fix (features.PairFeatures)."""
    runtime = _pairs.get(pair_handle) if pair_handle else None
    if runtime is None:
        raise LTAUError("it needs pair_style ltau with its pair_coeff * * MODEL_FILE ... "
                        "(the pair style was redefined without pair_coeff, or is not ltau)")
    return runtime.features


@_guarded
def _fix_create(handle, a: abi.FixCreateArgs):
    fix = FixLtau(a.fix_id.decode(), _words(a.narg, a.arg), _comm(a.fcomm), _pair_features(a.pair))
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
    fix.bind(_pair_features(a.pair))
    return fix.start(a.step, a.natoms_group)   # collective; the plugin prints rank 0's report


@_guarded
def _fix_step(handle, a: abi.FixStepArgs):
    fix = _fixes[handle]
    n = a.nlocal
    fix.end_of_step(StepView(
        step=a.step, x=view(a.x, (n, 3)), f=view(a.f, (n, 3)), type=view(a.type, (n,), np.int32),
        tag=view(a.tag, (n,), np.int32), in_group=(view(a.mask, (n,), np.int32) & a.groupbit) != 0,
        peratom=view(a.peratom, (n, fix.n_peratom)), global_out=view(a.global_, (1 + fix.n_vector,)),
        box=np.array(a.box[:]), periodic=tuple(bool(p) for p in a.periodic), check_halt=bool(a.check_halt)))


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
