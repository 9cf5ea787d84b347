/* fix ltau: see fix_ltau.h.

   Copyright (C) the ltau_lmp authors. GPL-2.0-only (it links against LAMMPS). */

#include "fix_ltau.h"

#include "ltau_bridge.h"

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "group.h"
#include "memory.h"
#include "pair.h"
#include "timer.h"
#include "update.h"
#include "utils.h"

#include <cstring>

using namespace LAMMPS_NS;

FixLTAU::FixLTAU(LAMMPS *lmp, int narg, char **arg) : Fix(lmp, narg, arg)
{
  if (narg < 4) error->all(FLERR, "Fix ltau: usage is fix ID group ltau ESTIMATOR_FILE keyword value ...");
  Pair *pair = force->pair_match("ltau", 1, 0);
  if (!pair)
    error->all(FLERR, "Fix ltau requires pair_style ltau (define pair_style ltau and its pair_coeff before fix ltau)");
  ltau_fix_create_args args = {};
  args.pair = pair;
  args.fcomm = MPI_Comm_c2f(world);
  args.fix_id = id;
  args.narg = narg - 3;
  args.arg = arg + 3;
  char msg[LTAU_MSGLEN] = "";
  int status = ltau::callbacks().fix_create(this, &args, msg);
  ltau::reduce_status(lmp, world, status, msg, "Fix ltau", LTAU_HALT);
  created = true;
  nevery = args.nevery;
  halt_mode = args.halt_mode;
  halt_message = args.halt_message;
  ncols = args.size_peratom_cols;
  peratom_flag = 1;
  size_peratom_cols = ncols;
  peratom_freq = nevery;
  scalar_flag = 1;
  vector_flag = 1;
  size_vector = args.size_vector;
  global_freq = nevery;
  extscalar = 0;
  extvector = 0;
  global.assign(1 + size_vector, 0.0);
  grow(atom->nmax);
}

FixLTAU::~FixLTAU()
{
  if (created && ltau::callbacks().fix_destroy && ltau::python_alive()) ltau::callbacks().fix_destroy(this);
  memory->destroy(values);
}

int FixLTAU::setmask()
{
  return FixConst::END_OF_STEP | FixConst::POST_RUN | FixConst::MIN_POST_FORCE;
}

// The pair style may have been redefined since the fix was created (a new model between
// runs): the runtime rebinds to the current one or stops here, before any step runs.
void FixLTAU::init()
{
  ltau_fix_init_args args = {};
  args.pair = force->pair_match("ltau", 1, 0);
  args.step = update->ntimestep;
  args.natoms_group = group->count(igroup);
  char msg[LTAU_MSGLEN] = "";
  int status = ltau::callbacks().fix_init(this, &args, msg);
  ltau::reduce_status(lmp, world, status, msg, "Fix ltau", LTAU_HALT);
  if (comm->me == 0) report(msg);
}

// Like fix halt, the halt condition is checked at end of step (and at minimizer force
// calls), not in setup: the values of the first step are computed for output, and a run
// after `error continue` goes ahead until the next check.
void FixLTAU::setup(int) { evaluate(false); }
void FixLTAU::end_of_step() { evaluate(true); }

// Minimization: like fix halt, evaluate at the minimizer's force calls on steps that are
// multiples of nevery (every force call of such a step, so the values always describe the
// latest forces; the log keeps the first evaluation of each step).
void FixLTAU::min_setup(int) { evaluate(false); }
void FixLTAU::min_post_force(int)
{
  if (update->ntimestep % nevery == 0) evaluate(true);
}

// error continue: later runs go ahead. Only a timeout this fix forced is reset, never one
// that another fix (fix halt, a second fix ltau) or the timer command set.
void FixLTAU::post_run()
{
  if (halt_mode == LTAU_HALT_CONTINUE && forced_timeout) timer->reset_timeout();
  forced_timeout = false;
}

double FixLTAU::compute_scalar() { return global[0]; }
double FixLTAU::compute_vector(int i) { return global[1 + i]; }
double FixLTAU::memory_usage() { return (double) nmax * ncols * sizeof(double); }

// Rank 0's report from fix_init: plain lines to screen and log, "WARNING: " lines as warnings.
void FixLTAU::report(const char *msg)
{
  for (const auto &line : utils::split_lines(msg)) {
    if (line.rfind("WARNING: ", 0) == 0)
      error->warning(FLERR, line.substr(9));
    else if (!line.empty() && line[0] == ' ')    // a continuation line of the block
      utils::logmesg(lmp, "        {}\n", line);
    else if (!line.empty())
      utils::logmesg(lmp, "Fix ltau {}\n", line);
  }
}

void FixLTAU::grow(int n)
{
  nmax = n > 0 ? n : 1;
  memory->grow(values, nmax, ncols, "ltau:values");
  array_atom = values;
}

void FixLTAU::evaluate(bool check_halt)
{
  if (atom->nmax > nmax) grow(atom->nmax);
  ltau_fix_step_args args = {};
  args.step = update->ntimestep;
  args.nlocal = atom->nlocal;
  args.groupbit = groupbit;
  args.x = atom->x[0];
  args.f = atom->f[0];
  args.type = atom->type;
  args.tag = atom->tag;
  args.mask = atom->mask;
  args.peratom = values[0];
  args.global = global.data();
  const double box[9] = {domain->boxlo[0], domain->boxlo[1], domain->boxlo[2],
                         domain->boxhi[0], domain->boxhi[1], domain->boxhi[2],
                         domain->xy,       domain->xz,       domain->yz};
  std::memcpy(args.box, box, sizeof(box));
  args.periodic[0] = domain->xperiodic;
  args.periodic[1] = domain->yperiodic;
  args.periodic[2] = domain->zperiodic;
  args.check_halt = check_halt;
  char msg[LTAU_MSGLEN] = "";
  int status = ltau::callbacks().fix_step(this, &args, msg);
  if (ltau::reduce_status(lmp, world, status, msg, "Fix ltau", LTAU_ERROR) == LTAU_HALT) halt(msg);
}

// fix halt's semantics; the message is identical on all ranks (built from reduced values).
void FixLTAU::halt(const char *msg)
{
  if (halt_mode == LTAU_HALT_HARD) error->all(FLERR, "Fix ltau {}", msg);
  if (comm->me == 0 && halt_message) utils::logmesg(lmp, "Fix ltau {}\n", msg);
  if (!timer->is_timeout()) {
    timer->force_timeout();
    forced_timeout = true;
  }
}
