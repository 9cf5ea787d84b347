/* LAMMPS plugin registration: `pair_style ltau` (pair_ltau.cpp) and `fix ltau` (fix_ltau.cpp),
   thin shims over a per-rank Python runtime reached through ltau_bridge.cpp.

   Copyright (C) the ltau_lmp authors. GPL-2.0-only (it links against LAMMPS). */

#include "lammpsplugin.h"

#include "fix_ltau.h"
#include "pair_ltau.h"

using namespace LAMMPS_NS;

static void *pair_creator(LAMMPS *lmp) { return new PairLTAU(lmp); }
static void *fix_creator(LAMMPS *lmp, int narg, char **arg) { return new FixLTAU(lmp, narg, arg); }

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  auto reg = (lammpsplugin_regfunc) regfunc;
  lammpsplugin_t plugin;
  plugin.version = nullptr;    // version.h is not in the wheel; NULL skips the version message
  plugin.author = "ltau_lmp";
  plugin.handle = handle;

  plugin.style = "pair";
  plugin.name = "ltau";
  plugin.info = "ltau_lmp torch force field pair style (Python runtime)";
  plugin.creator.v1 = (lammpsplugin_factory1 *) &pair_creator;
  (*reg)(&plugin, lmp);

  plugin.style = "fix";
  plugin.name = "ltau";
  plugin.info = "ltau_lmp LTAU uncertainty fix (Python runtime)";
  plugin.creator.v2 = (lammpsplugin_factory2 *) &fix_creator;
  (*reg)(&plugin, lmp);
}
