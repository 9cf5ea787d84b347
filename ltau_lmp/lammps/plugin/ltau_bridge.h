/* The plugin's side of the bridge to the per-rank Python runtime (ltau_lmp/lammps/bridge.py).

   Copyright (C) the ltau_lmp authors. GPL-2.0-only (it links against LAMMPS).

   Holds the callback table the runtime registers (ltau_abi.h), starts Python when the plugin
   runs inside the native `lmp` binary, and turns the statuses the callbacks return into one
   LAMMPS error on every rank. Used by pair_ltau.cpp and fix_ltau.cpp. */

#ifndef LTAU_BRIDGE_H
#define LTAU_BRIDGE_H

#include "ltau_abi.h"

#include <mpi.h>
#include <string>

namespace LAMMPS_NS {
class LAMMPS;
}

namespace ltau {

// The registered callback table (all NULL before registration or after a refused one).
const ltau_callbacks &callbacks();

// "" when the callbacks are registered (the running interpreter is used, or an embedded one
// is started and imports the runtime), else the reason they could not be, for the user.
std::string ensure_runtime();

// Whether a Python interpreter is still running (the destroy callbacks need one).
bool python_alive();

/* Collective: every rank calls it with its own status. If any rank has a status >= threshold,
   all ranks stop with `who: message` of the lowest such rank. Returns the maximum status. */
int reduce_status(LAMMPS_NS::LAMMPS *lmp, MPI_Comm world, int status, const char *msg,
                  const char *who, int threshold);

}    // namespace ltau

#endif
