"""ctypes mirror of ``plugin/ltau_abi.h``: the one C ABI between the plugin and the runtime.

Field for field the header's structs, in the same order; the header documents every field.
``tests/lammps/test_lammps_abi.py`` compiles the header and checks each size and offset against these
classes. Change both together and bump ``ABI_VERSION`` (the plugin checks it, and
:func:`check_plugin` checks the plugin's).
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, Structure, c_char, c_char_p, c_double, c_int, c_int32, c_int64, c_void_p

import numpy as np

from ltau_lmp.errors import LTAUError

ABI_VERSION = 9
MSGLEN = 2048

# enum ltau_status
OK, HALT, ERROR = 0, 1, 2
# enum ltau_halt_mode
HALT_NONE, HALT_HARD, HALT_SOFT, HALT_CONTINUE = 0, 1, 2, 3
HALT_MODES = {"hard": HALT_HARD, "soft": HALT_SOFT, "continue": HALT_CONTINUE}
# enum ltau_message_passing
MP_LOCAL, MP_SHELL, MP_EXCHANGE = 0, 1, 2
# enum ltau_exchange_direction
EXCHANGE_FORWARD, EXCHANGE_REVERSE = 0, 1

_PD, _PI32, _PI64 = POINTER(c_double), POINTER(c_int32), POINTER(c_int64)

EXCHANGE = ctypes.CFUNCTYPE(c_int32, c_void_p, _PD, c_int32, c_int32)   # ltau_exchange_fn


class PairCoeffArgs(Structure):
    _fields_ = [("ntypes", c_int32), ("narg", c_int32), ("nsettings", c_int32), ("fcomm", c_int32),
                ("arg", POINTER(c_char_p)), ("settings", POINTER(c_char_p)), ("cutoff", c_double),
                ("receptive_field", c_double), ("message_passing", c_int32), ("pad_", c_int32)]


class PairComputeArgs(Structure):
    _fields_ = [("step", c_int64), ("nlocal", c_int32), ("nghost", c_int32), ("x", _PD),
                ("type", _PI32), ("tag", _PI32), ("nedges", c_int64), ("centers", _PI64),
                ("neighbors", _PI64), ("shifts", _PD), ("exchange", EXCHANGE), ("cutghost", c_double), ("eflag_atom", c_int32),
                ("vflag_atom", c_int32), ("f", _PD), ("eatom", _PD), ("vatom", _PD),
                ("vflag_global", c_int32), ("pad_", c_int32), ("energy", c_double),
                ("virial", c_double * 6)]


class FixCreateArgs(Structure):
    _fields_ = [("pair", c_void_p), ("fcomm", c_int32), ("narg", c_int32), ("fix_id", c_char_p),
                ("arg", POINTER(c_char_p)), ("nevery", c_int32), ("halt_mode", c_int32),
                ("halt_message", c_int32), ("size_peratom_cols", c_int32), ("size_vector", c_int32),
                ("pad_", c_int32)]


class FixInitArgs(Structure):
    _fields_ = [("pair", c_void_p), ("step", c_int64), ("natoms_group", c_int64)]


class FixStepArgs(Structure):
    _fields_ = [("step", c_int64), ("nlocal", c_int32), ("groupbit", c_int32), ("x", _PD),
                ("f", _PD), ("type", _PI32), ("tag", _PI32), ("mask", _PI32), ("peratom", _PD),
                ("global_", _PD),
                ("box", c_double * 9), ("periodic", c_int32 * 3), ("check_halt", c_int32)]


def view(ptr, shape, dtype=None) -> np.ndarray:
    """Zero-copy numpy view of a LAMMPS array; an empty array when nothing is there (NULL)."""
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype=dtype or np.float64)
    return np.ctypeslib.as_array(ptr, shape=shape)


def _callback(args_type):
    return ctypes.CFUNCTYPE(c_int, c_void_p, POINTER(args_type), POINTER(c_char))


PAIR_COEFF = _callback(PairCoeffArgs)
PAIR_COMPUTE = _callback(PairComputeArgs)
FIX_CREATE = _callback(FixCreateArgs)
FIX_INIT = _callback(FixInitArgs)
FIX_STEP = _callback(FixStepArgs)
DESTROY = ctypes.CFUNCTYPE(None, c_void_p)


class Callbacks(Structure):
    _fields_ = [("abi_version", c_int32), ("pad_", c_int32), ("pair_coeff", PAIR_COEFF),
                ("pair_compute", PAIR_COMPUTE), ("pair_destroy", DESTROY), ("fix_create", FIX_CREATE),
                ("fix_init", FIX_INIT), ("fix_step", FIX_STEP), ("fix_destroy", DESTROY)]


STRUCTS = {"ltau_pair_coeff_args": PairCoeffArgs, "ltau_pair_compute_args": PairComputeArgs,
           "ltau_fix_create_args": FixCreateArgs, "ltau_fix_init_args": FixInitArgs,
           "ltau_fix_step_args": FixStepArgs, "ltau_callbacks": Callbacks}


def stale_plugin_message(so_path: str, plugin_version: int) -> str:
    return (f"the plugin {so_path} speaks C ABI version {plugin_version} but this ltau_lmp speaks "
            f"version {ABI_VERSION}: rebuild the plugin (`pip install -e .`)")


def register(lib: ctypes.CDLL, so_path: str, table: Callbacks) -> None:
    """Check the plugin's ABI version, then hand it the callback table (it checks ours)."""
    try:
        lib.ltau_abi_version.restype = c_int32
        lib.ltau_abi_version.argtypes = []
        plugin_version = lib.ltau_abi_version()
    except AttributeError:  # built before the ABI had a version: the positional-argument ABI 1
        plugin_version = 1
    if plugin_version != ABI_VERSION:
        raise LTAUError(stale_plugin_message(so_path, plugin_version))
    lib.ltau_set_callbacks.restype = c_int32
    lib.ltau_set_callbacks.argtypes = [POINTER(Callbacks)]
    refused = lib.ltau_set_callbacks(ctypes.byref(table))
    if refused:
        raise LTAUError(stale_plugin_message(so_path, refused))
