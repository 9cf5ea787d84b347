/* pair_style ltau: see pair_ltau.h.

   Copyright (C) the ltau_lmp authors. GPL-2.0-only (it links against LAMMPS). */

#include "pair_ltau.h"

#include "ltau_bridge.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"
#include "utils.h"

#include <algorithm>
#include <cmath>
#include <cstring>

using namespace LAMMPS_NS;

// Columns per LAMMPS communication round of an exchange (comm_forward/comm_reverse, which size
// LAMMPS's buffers at init): wider arrays go in several rounds.
static constexpr int EXCHANGE_COLUMNS = 128;

PairLTAU::PairLTAU(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  no_virial_fdotr_compute = 1;    // the runtime sums the virial over pairs (exact when folded)
  centroidstressflag = CENTROID_NOTAVAIL;
  std::string why = ltau::ensure_runtime();
  if (!why.empty()) error->all(FLERR, "Pair style ltau: {}", why);
}

PairLTAU::~PairLTAU()
{
  if (ltau::callbacks().pair_destroy && ltau::python_alive()) ltau::callbacks().pair_destroy(this);
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

// The keywords are parsed by the runtime, with the model, at the next pair_coeff.
void PairLTAU::settings(int narg, char **arg) { settings_words.assign(arg, arg + narg); }

void PairLTAU::coeff(int narg, char **arg)
{
  int ntypes = atom->ntypes;
  if (narg < 3 || std::strcmp(arg[0], "*") != 0 || std::strcmp(arg[1], "*") != 0)
    error->all(FLERR, "Pair style ltau: usage is pair_coeff * * MODEL_FILE El1 El2 ...");
  if (narg != 3 + ntypes)
    error->all(FLERR, "Pair style ltau: pair_coeff needs one element per atom type: {} types but {} elements given",
               ntypes, narg - 3);
  std::vector<const char *> words;
  for (const auto &w : settings_words) words.push_back(w.c_str());
  ltau_pair_coeff_args args = {};
  args.ntypes = ntypes;
  args.fcomm = MPI_Comm_c2f(world);
  args.narg = narg - 2;
  args.nsettings = (int32_t) words.size();
  args.arg = arg + 2;
  args.settings = words.data();
  char msg[LTAU_MSGLEN] = "";
  int status = ltau::callbacks().pair_coeff(this, &args, msg);
  ltau::reduce_status(lmp, world, status, msg, "Pair style ltau", LTAU_HALT);
  cutoff = args.cutoff;
  receptive_field = args.receptive_field;
  message_passing = args.message_passing;
  announced = false;
  if (!allocated) {
    allocated = 1;
    memory->create(setflag, ntypes + 1, ntypes + 1, "pair:setflag");
    memory->create(cutsq, ntypes + 1, ntypes + 1, "pair:cutsq");
  }
  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++) setflag[i][j] = 1;
}

void PairLTAU::init_style()
{
  if (force->newton_pair == 0) error->all(FLERR, "Pair style ltau requires newton pair on");
  if (std::strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR, "Pair style ltau requires units metal (eV, Angstrom), not units {}",
               update->unit_style);
  if (atom->tag_enable == 0) error->all(FLERR, "Pair style ltau requires atom IDs");
  // One rank holds every atom: a message-passing graph is folded onto the local atoms (each
  // ghost is a periodic image), exactly the periodic graph, with no ghost nodes at all.
  fold = message_passing != LTAU_MP_LOCAL && comm->nprocs == 1;
  shell = message_passing == LTAU_MP_SHELL && !fold;
  exchange_mode = message_passing == LTAU_MP_EXCHANGE && !fold;
  // Folding finds a ghost's owner through LAMMPS's atom map (owned atoms take precedence over
  // their images); an atomic system has none unless asked for, so the fold asks for one.
  if (fold && atom->map_style == Atom::MAP_NONE) {
    atom->map_init();
    atom->map_set();
  }
  neighbor->add_request(this, shell ? NeighConst::REQ_FULL | NeighConst::REQ_GHOST
                                    : NeighConst::REQ_FULL);
  if (shell) ensure_ghost_cutoff();
  else if (raised_cutghost) {    // the shell is gone (new model or keyword): back to the default
    comm->cutghostuser = 0.0;
    raised_cutghost = false;
  }
  // comm->init() runs after this and sizes its buffers for these widths
  comm_forward = comm_reverse = exchange_mode ? EXCHANGE_COLUMNS : 0;
  if (exchange_mode && !announced && comm->me == 0)
    utils::logmesg(lmp, "Pair style ltau: message passing with ghost atoms out to one cutoff and "
                   "a ghost exchange after each layer (pair_style ltau message_passing exchange)\n");
  announced = exchange_mode;
}

double PairLTAU::init_one(int, int) { return cutoff; }

// Exchange rounds: columns [xcol, xcol + xwidth) of the (nall, xcols) array xdata.
int PairLTAU::pack_forward_comm(int n, int *list, double *buf, int, int *)
{
  int m = 0;
  for (int i = 0; i < n; i++) {
    const double *row = xdata + (int64_t) list[i] * xcols + xcol;
    for (int k = 0; k < xwidth; k++) buf[m++] = row[k];
  }
  return m;
}

void PairLTAU::unpack_forward_comm(int n, int first, double *buf)
{
  int m = 0;
  for (int i = first; i < first + n; i++) {
    double *row = xdata + (int64_t) i * xcols + xcol;
    for (int k = 0; k < xwidth; k++) row[k] = buf[m++];
  }
}

int PairLTAU::pack_reverse_comm(int n, int first, double *buf)
{
  int m = 0;
  for (int i = first; i < first + n; i++) {
    const double *row = xdata + (int64_t) i * xcols + xcol;
    for (int k = 0; k < xwidth; k++) buf[m++] = row[k];
  }
  return m;
}

void PairLTAU::unpack_reverse_comm(int n, int *list, double *buf)
{
  int m = 0;
  for (int i = 0; i < n; i++) {
    double *row = xdata + (int64_t) list[i] * xcols + xcol;
    for (int k = 0; k < xwidth; k++) row[k] += buf[m++];
  }
}

// ltau_exchange_fn (ltau_abi.h): collective over the ranks, in chunks of EXCHANGE_COLUMNS.
int PairLTAU::exchange(double *data, int ncols, int direction)
{
  if (failure_check(0)) {
    peer_failed = true;
    return LTAU_ERROR;
  }
  xdata = data;
  xcols = ncols;
  for (xcol = 0; xcol < ncols; xcol += EXCHANGE_COLUMNS) {
    xwidth = std::min(EXCHANGE_COLUMNS, ncols - xcol);
    if (direction == LTAU_EXCHANGE_FORWARD)
      comm->forward_comm(this, xwidth);
    else
      comm->reverse_comm(this, xwidth);
  }
  if (direction == LTAU_EXCHANGE_REVERSE)
    std::fill(data + (int64_t) atom->nlocal * ncols,
              data + (int64_t) (atom->nlocal + atom->nghost) * ncols, 0.0);
  xdata = nullptr;
  return LTAU_OK;
}

int32_t PairLTAU::exchange_callback(void *self, double *data, int32_t ncols, int32_t direction)
{
  return static_cast<PairLTAU *>(self)->exchange(data, ncols, direction);
}

// One step of the exchange's failure protocol: true when any rank reports a failure.
bool PairLTAU::failure_check(int failed)
{
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, world);
  return any != 0;
}

// Flatten the full list into int64 pairs, keeping only r < cutoff: the list carries the
// neighbour skin too, and those pairs contribute exactly 0 but would cost the model time.
// Folded (one rank): every ghost j becomes its owner, with the periodic shift x_j - x_owner.
int64_t PairLTAU::build_edges()
{
  int inum = list->inum + (shell ? list->gnum : 0);
  int *ilist = list->ilist, *numneigh = list->numneigh, **firstneigh = list->firstneigh;
  double **x = atom->x, cutsq_model = cutoff * cutoff;
  int64_t maxedges = 0;
  for (int ii = 0; ii < inum; ii++) maxedges += numneigh[ilist[ii]];
  maxedges = std::max<int64_t>(maxedges, 1);
  centers.resize(maxedges);
  neighbors.resize(maxedges);
  if (fold) shifts.resize(3 * maxedges);
  int nlocal = atom->nlocal;
  int64_t nedges = 0;
  for (int ii = 0; ii < inum; ii++) {
    int i = ilist[ii], *jl = firstneigh[i];
    for (int jj = 0; jj < numneigh[i]; jj++) {
      int j = jl[jj] & NEIGHMASK;
      double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz >= cutsq_model) continue;
      centers[nedges] = i;
      if (fold) {
        int owner = j < nlocal ? j : atom->map(atom->tag[j]);
        for (int d = 0; d < 3; d++) shifts[3 * nedges + d] = x[j][d] - x[owner][d];
        j = owner;
      }
      neighbors[nedges++] = j;
    }
  }
  return nedges;
}

void PairLTAU::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  ltau_pair_compute_args args = {};
  args.nedges = build_edges();
  args.step = update->ntimestep;
  args.nlocal = atom->nlocal;
  args.nghost = atom->nghost;
  args.x = atom->x[0];
  args.type = atom->type;
  args.tag = atom->tag;
  args.centers = centers.data();
  args.neighbors = neighbors.data();
  args.shifts = fold ? shifts.data() : nullptr;
  args.exchange = exchange_mode ? &exchange_callback : nullptr;
  args.cutghost = comm->get_comm_cutoff();
  args.eflag_atom = eflag_atom;
  args.vflag_atom = vflag_atom;
  args.f = atom->f[0];
  args.eatom = eflag_atom ? eatom : nullptr;
  args.vatom = vflag_atom ? vatom[0] : nullptr;
  args.vflag_global = vflag_global;
  char msg[LTAU_MSGLEN] = "";
  peer_failed = false;
  int status = ltau::callbacks().pair_compute(this, &args, msg);
  // A rank that failed between two exchanges meets the others, waiting in their next exchange,
  // here: they learn of the failure and return. A rank that learnt of one already skips it.
  if (exchange_mode && !peer_failed) failure_check(status >= LTAU_ERROR);
  ltau::reduce_status(lmp, world, status, msg, "Pair style ltau", LTAU_HALT);
  if (eflag_global) eng_vdwl += args.energy;
  if (vflag_global)
    for (int k = 0; k < 6; k++) virial[k] += args.virial[k];
}

// Exact forces on a subdomain need ghost atoms out to the receptive field (+ skin, for the
// steps between neighbour-list builds). A ghost cutoff the user did not set is raised here;
// one the user set too short stops the run with the line that fixes it.
void PairLTAU::ensure_ghost_cutoff()
{
  double need = receptive_field + neighbor->skin;
  if (need <= cutoff + neighbor->skin) return;    // one cutoff of ghosts is enough
  if (comm->mode != Comm::SINGLE)
    error->all(FLERR, "Pair style ltau: this model needs ghost atoms out to {:.6g} A (receptive "
               "field {:.6g} + skin {:.6g}); use comm_modify mode single cutoff {:.6g}", need,
               receptive_field, neighbor->skin, need);
  if (comm->cutghostuser >= need) return;
  if (comm->cutghostuser > 0.0 && !raised_cutghost)
    error->all(FLERR, "Pair style ltau: the model needs ghost atoms out to {:.6g} A (receptive "
               "field {:.6g} A = {} layers x cutoff {:.6g} A, + skin {:.6g} A) but comm_modify "
               "cutoff is {:.6g} A; add `comm_modify cutoff {:.6g}`", need, receptive_field,
               (int) std::lround(receptive_field / cutoff), cutoff, neighbor->skin,
               comm->cutghostuser, need);
  comm->cutghostuser = need;
  raised_cutghost = true;
  if (comm->me == 0)
    utils::logmesg(lmp, "Pair style ltau: ghost atoms out to {:.6g} A (receptive field {:.6g} A "
                   "+ skin {:.6g} A), as `comm_modify cutoff {:.6g}`\n", need, receptive_field,
                   neighbor->skin, need);
}
