/* LAMMPS plugin: `pair_style ltau` and `fix ltau` as thin shims over a per-rank Python runtime.

   Copyright (C) the ltau_lmp authors. GPL-2.0-only (it links against LAMMPS).

   All the work happens in Python (ltau_lmp/lammps/runtime.py). This file only hands it
   zero-copy pointers to LAMMPS arrays through C function pointers that the runtime registers
   with ltau_set_callbacks() via ctypes; the structs and the version of that boundary are in
   ltau_abi.h. Every callback returns a status and writes a message;
   the shim reduces the status over all ranks and stops every rank with the message of the
   lowest failing rank, so a Python exception on one rank never leaves the others hanging.

   Inside a Python host (`ltau-lmp run`, `from lammps import lammps`) the running interpreter
   is used; inside the native `lmp` binary no Python runs, so the shim starts an embedded
   interpreter (the one the package was built with, see setup.py) and imports the runtime. */

#include "lammpsplugin.h"
#include "ltau_abi.h"

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "fix.h"
#include "group.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "pair.h"
#include "timer.h"
#include "update.h"
#include "utils.h"

#include <dlfcn.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifndef LTAU_LIBPYTHON
#define LTAU_LIBPYTHON ""
#endif
#ifndef LTAU_PYTHON
#define LTAU_PYTHON ""
#endif

using namespace LAMMPS_NS;

/* ---------------------------------------------------------------------------------------------
   The C ABI with the Python runtime: ltau_abi.h (mirrored in ltau_lmp/lammps/abi.py)
--------------------------------------------------------------------------------------------- */

static ltau_callbacks cbs = {};
static int32_t refused_abi = 0;    // abi_version of a refused table (stale plugin or runtime)

extern "C" {
int32_t ltau_abi_version() { return LTAU_ABI_VERSION; }

int32_t ltau_set_callbacks(const ltau_callbacks *table)
{
  if (!table || table->abi_version != LTAU_ABI_VERSION) {
    cbs = {};    // this process's runtime is stale: no style may call into it
    refused_abi = table ? table->abi_version : -1;
    return LTAU_ABI_VERSION;
  }
  cbs = *table;
  refused_abi = 0;
  return 0;
}
}

static bool callbacks_registered() { return cbs.pair_compute != nullptr; }

/* ---------------------------------------------------------------------------------------------
   Python bootstrap: use the running interpreter or start an embedded one (recipe section 10).
   libpython is not linked; its functions are looked up with dlsym so that a Python host with
   a statically linked interpreter never gets a second one.
--------------------------------------------------------------------------------------------- */

namespace {

template <typename T> T pysym(void *handle, const char *name)
{
  return reinterpret_cast<T>(dlsym(handle, name));
}

std::string plugin_path()
{
  Dl_info info;
  if (dladdr(reinterpret_cast<void *>(&ltau_set_callbacks), &info) && info.dli_fname)
    return info.dli_fname;
  return "";
}

std::string stale_message()
{
  return fmt::format("the plugin {} speaks C ABI version {} but the Python runtime speaks version "
                     "{}: rebuild the plugin (`pip install -e .`)",
                     plugin_path(), LTAU_ABI_VERSION, refused_abi);
}

// Returns "" when the callbacks are registered, else the reason they could not be.
std::string ensure_runtime()
{
  if (callbacks_registered()) return "";
  if (refused_abi) return stale_message();

  void *py = RTLD_DEFAULT;
  if (!dlsym(py, "Py_IsInitialized")) {    // native lmp: no Python in this process
    if (std::strlen(LTAU_LIBPYTHON) == 0)
      return "this Python has no shared libpython, so the plugin cannot start Python inside "
             "the lmp binary; run the script with `ltau-lmp run` instead";
    py = dlopen(LTAU_LIBPYTHON, RTLD_NOW | RTLD_GLOBAL);
    if (!py)
      return std::string("cannot load ") + LTAU_LIBPYTHON + " (" + dlerror() +
          "); run the script with `ltau-lmp run` instead";
  }
  auto is_init = pysym<int (*)()>(py, "Py_IsInitialized");
  if (!is_init()) {
    auto decode = pysym<wchar_t *(*) (const char *, size_t *)>(py, "Py_DecodeLocale");
    auto set_name = pysym<void (*)(const wchar_t *)>(py, "Py_SetProgramName");
    // the venv's python as program name makes sys.prefix the venv, so its packages import
    if (decode && set_name && std::strlen(LTAU_PYTHON)) set_name(decode(LTAU_PYTHON, nullptr));
    pysym<void (*)(int)>(py, "Py_InitializeEx")(0);
    pysym<void *(*) ()>(py, "PyEval_SaveThread")();    // later entries take the GIL as usual
  }
  std::string so = plugin_path();
  // <root>/ltau_lmp/lammps/ltauplugin.so -> <root> makes a non-installed checkout importable
  std::string root = so.substr(0, so.rfind('/'));
  root = root.substr(0, root.rfind('/'));
  root = root.substr(0, root.rfind('/'));
  std::string code = "import sys\nif r'''" + root + "''' not in sys.path: sys.path.append(r'''" +
      root + "''')\nimport ltau_lmp.lammps.runtime as _rt\n_rt.bootstrap(r'''" + so + "''')\n";
  auto ensure = pysym<int (*)()>(py, "PyGILState_Ensure");
  auto release = pysym<void (*)(int)>(py, "PyGILState_Release");
  auto run = pysym<int (*)(const char *)>(py, "PyRun_SimpleString");
  int gil = ensure();
  int rc = run(code.c_str());
  release(gil);
  if (refused_abi) return stale_message();
  if (rc != 0 || !callbacks_registered())
    return "could not import ltau_lmp.lammps.runtime in Python (traceback above)";
  return "";
}

bool python_alive()
{
  auto is_init = pysym<int (*)()>(RTLD_DEFAULT, "Py_IsInitialized");
  return is_init && is_init();
}

/* Collective: every rank calls it with its own status. If any rank has a status >= threshold,
   all ranks stop with the message of the lowest such rank. Returns the maximum status. */
int reduce_status(LAMMPS *lmp, MPI_Comm world, int status, const char *msg, const char *who,
                  int threshold)
{
  int maxstatus = 0;
  MPI_Allreduce(&status, &maxstatus, 1, MPI_INT, MPI_MAX, world);
  if (maxstatus < threshold) return maxstatus;
  int me, nprocs;
  MPI_Comm_rank(world, &me);
  MPI_Comm_size(world, &nprocs);
  int mine = status >= threshold ? me : nprocs, root = 0;
  MPI_Allreduce(&mine, &root, 1, MPI_INT, MPI_MIN, world);
  char buf[LTAU_MSGLEN];
  std::strncpy(buf, msg, LTAU_MSGLEN - 1);
  buf[LTAU_MSGLEN - 1] = '\0';
  MPI_Bcast(buf, LTAU_MSGLEN, MPI_CHAR, root, world);
  lmp->error->all(FLERR, "{}: {}", who, buf);
  return maxstatus;
}

}    // namespace

/* ---------------------------------------------------------------------------------------------
   pair_style ltau
--------------------------------------------------------------------------------------------- */

// Columns per LAMMPS communication round of an exchange (comm_forward/comm_reverse, which size
// LAMMPS's buffers at init): wider arrays go in several rounds.
static constexpr int EXCHANGE_COLUMNS = 128;

class PairLTAU : public Pair {
 public:
  explicit PairLTAU(LAMMPS *lmp) : Pair(lmp)
  {
    single_enable = 0;
    restartinfo = 0;
    one_coeff = 1;
    manybody_flag = 1;
    no_virial_fdotr_compute = 1;    // the runtime sums the virial over pairs (exact when folded)
    centroidstressflag = CENTROID_NOTAVAIL;
    std::string why = ensure_runtime();
    if (!why.empty()) error->all(FLERR, "Pair style ltau: {}", why);
  }

  ~PairLTAU() override
  {
    if (cbs.pair_destroy && python_alive()) cbs.pair_destroy(this);
    if (allocated) {
      memory->destroy(setflag);
      memory->destroy(cutsq);
    }
  }

  // The keywords are parsed by the runtime, with the model, at the next pair_coeff.
  void settings(int narg, char **arg) override { settings_words.assign(arg, arg + narg); }

  void coeff(int narg, char **arg) override
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
    args.narg = narg - 2;
    args.nsettings = (int32_t) words.size();
    args.arg = arg + 2;
    args.settings = words.data();
    char msg[LTAU_MSGLEN] = "";
    int status = cbs.pair_coeff(this, &args, msg);
    reduce_status(lmp, world, status, msg, "Pair style ltau", LTAU_HALT);
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

  void init_style() override
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

  double init_one(int, int) override { return cutoff; }

  // Exchange rounds: columns [xcol, xcol + xwidth) of the (nall, xcols) array xdata.
  int pack_forward_comm(int n, int *list, double *buf, int, int *) override
  {
    int m = 0;
    for (int i = 0; i < n; i++) {
      const double *row = xdata + (int64_t) list[i] * xcols + xcol;
      for (int k = 0; k < xwidth; k++) buf[m++] = row[k];
    }
    return m;
  }

  void unpack_forward_comm(int n, int first, double *buf) override
  {
    int m = 0;
    for (int i = first; i < first + n; i++) {
      double *row = xdata + (int64_t) i * xcols + xcol;
      for (int k = 0; k < xwidth; k++) row[k] = buf[m++];
    }
  }

  int pack_reverse_comm(int n, int first, double *buf) override
  {
    int m = 0;
    for (int i = first; i < first + n; i++) {
      const double *row = xdata + (int64_t) i * xcols + xcol;
      for (int k = 0; k < xwidth; k++) buf[m++] = row[k];
    }
    return m;
  }

  void unpack_reverse_comm(int n, int *list, double *buf) override
  {
    int m = 0;
    for (int i = 0; i < n; i++) {
      double *row = xdata + (int64_t) list[i] * xcols + xcol;
      for (int k = 0; k < xwidth; k++) row[k] += buf[m++];
    }
  }

  // ltau_exchange_fn (ltau_abi.h): collective over the ranks, in chunks of EXCHANGE_COLUMNS.
  int exchange(double *data, int ncols, int direction)
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

  static int32_t exchange_callback(void *self, double *data, int32_t ncols, int32_t direction)
  {
    return static_cast<PairLTAU *>(self)->exchange(data, ncols, direction);
  }

  void compute(int eflag, int vflag) override
  {
    ev_init(eflag, vflag);
    // Flatten the full list into int64 pairs, keeping only r < cutoff: the list carries the
    // neighbour skin too, and those pairs contribute exactly 0 but would cost the model time.
    int inum = list->inum + (shell ? list->gnum : 0);
    int *ilist = list->ilist, *numneigh = list->numneigh, **firstneigh = list->firstneigh;
    double **x = atom->x, cutsq_model = cutoff * cutoff;
    int64_t maxedges = 0;
    for (int ii = 0; ii < inum; ii++) maxedges += numneigh[ilist[ii]];
    centers.resize(maxedges > 0 ? maxedges : 1);
    neighbors.resize(maxedges > 0 ? maxedges : 1);
    if (fold) {
      shifts.resize(3 * (maxedges > 0 ? maxedges : 1));
      owner_of_tag();
    }
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
          int owner = j < nlocal ? j : local_of_tag[atom->tag[j]];
          for (int d = 0; d < 3; d++) shifts[3 * nedges + d] = x[j][d] - x[owner][d];
          j = owner;
        }
        neighbors[nedges++] = j;
      }
    }
    ltau_pair_compute_args args = {};
    args.step = update->ntimestep;
    args.nlocal = atom->nlocal;
    args.nghost = atom->nghost;
    args.x = atom->x[0];
    args.type = atom->type;
    args.tag = atom->tag;
    args.nedges = nedges;
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
    int status = cbs.pair_compute(this, &args, msg);
    // A rank that failed between two exchanges meets the others, waiting in their next exchange,
    // here: they learn of the failure and return. A rank that learnt of one already skips it.
    if (exchange_mode && !peer_failed) failure_check(status >= LTAU_ERROR);
    reduce_status(lmp, world, status, msg, "Pair style ltau", LTAU_HALT);
    if (eflag_global) eng_vdwl += args.energy;
    if (vflag_global)
      for (int k = 0; k < 6; k++) virial[k] += args.virial[k];
  }

 private:
  double cutoff = 0.0, receptive_field = 0.0;
  int message_passing = LTAU_MP_LOCAL;
  bool raised_cutghost = false, fold = false, shell = false, exchange_mode = false;
  bool announced = false, peer_failed = false;
  double *xdata = nullptr;    // the array of the exchange in progress
  int xcols = 0, xcol = 0, xwidth = 0;

  // One step of the exchange's failure protocol: true when any rank reports a failure.
  bool failure_check(int failed)
  {
    int any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, world);
    return any != 0;
  }
  std::vector<double> shifts;
  std::vector<int> local_of_tag;

  // On one rank every atom ID has its local atom: ghost -> owner by ID.
  void owner_of_tag()
  {
    tagint maxtag = 0;
    for (int i = 0; i < atom->nlocal; i++) maxtag = std::max(maxtag, atom->tag[i]);
    local_of_tag.assign(maxtag + 1, -1);
    for (int i = 0; i < atom->nlocal; i++) local_of_tag[atom->tag[i]] = i;
  }
  std::vector<std::string> settings_words;
  std::vector<int64_t> centers, neighbors;

  // Exact forces on a subdomain need ghost atoms out to the receptive field (+ skin, for the
  // steps between neighbour-list builds). A ghost cutoff the user did not set is raised here;
  // one the user set too short stops the run with the line that fixes it.
  void ensure_ghost_cutoff()
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
};

/* ---------------------------------------------------------------------------------------------
   fix ID group ltau ESTIMATOR_FILE keyword value ...

   Every keyword is parsed by the Python runtime (one parser); this shim keeps what LAMMPS
   itself needs: nevery, the output sizes, and fix halt's halt modes.
--------------------------------------------------------------------------------------------- */

class FixLTAU : public Fix {
 public:
  FixLTAU(LAMMPS *lmp, int narg, char **arg) : Fix(lmp, narg, arg)
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
    int status = cbs.fix_create(this, &args, msg);
    reduce_status(lmp, world, status, msg, "Fix ltau", LTAU_HALT);
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

  ~FixLTAU() override
  {
    if (created && cbs.fix_destroy && python_alive()) cbs.fix_destroy(this);
    memory->destroy(values);
  }

  int setmask() override
  {
    return FixConst::END_OF_STEP | FixConst::POST_RUN | FixConst::MIN_POST_FORCE;
  }

  // The pair style may have been redefined since the fix was created (a new model between
  // runs): the runtime rebinds to the current one or stops here, before any step runs.
  void init() override
  {
    ltau_fix_init_args args = {};
    args.pair = force->pair_match("ltau", 1, 0);
    args.step = update->ntimestep;
    args.natoms_group = group->count(igroup);
    char msg[LTAU_MSGLEN] = "";
    int status = cbs.fix_init(this, &args, msg);
    reduce_status(lmp, world, status, msg, "Fix ltau", LTAU_HALT);
    if (comm->me == 0) report(msg);
  }

  // Like fix halt, the halt condition is checked at end of step (and at minimizer force
  // calls), not in setup: the values of the first step are computed for output, and a run
  // after `error continue` goes ahead until the next check.
  void setup(int) override { evaluate(false); }
  void end_of_step() override { evaluate(true); }

  // Minimization: like fix halt, evaluate at the minimizer's force calls on steps that are
  // multiples of nevery (every force call of such a step, so the values always describe the
  // latest forces; the log keeps the first evaluation of each step).
  void min_setup(int) override { evaluate(false); }
  void min_post_force(int) override
  {
    if (update->ntimestep % nevery == 0) evaluate(true);
  }

  // error continue: later runs go ahead. Only a timeout this fix forced is reset, never one
  // that another fix (fix halt, a second fix ltau) or the timer command set.
  void post_run() override
  {
    if (halt_mode == LTAU_HALT_CONTINUE && forced_timeout) timer->reset_timeout();
    forced_timeout = false;
  }

  double compute_scalar() override { return global[0]; }
  double compute_vector(int i) override { return global[1 + i]; }
  double memory_usage() override { return (double) nmax * ncols * sizeof(double); }

 private:
  double **values = nullptr;
  std::vector<double> global;
  int nmax = 0, ncols = 0;
  int halt_mode = LTAU_HALT_NONE, halt_message = 1;
  bool created = false, forced_timeout = false;

  // Rank 0's report from fix_init: plain lines to screen and log, "WARNING: " lines as warnings.
  void report(const char *msg)
  {
    for (const auto &line : utils::split_lines(msg)) {
      if (line.rfind("WARNING: ", 0) == 0)
        error->warning(FLERR, line.substr(9));
      else if (!line.empty())
        utils::logmesg(lmp, "Fix ltau {}\n", line);
    }
  }

  void grow(int n)
  {
    nmax = n > 0 ? n : 1;
    memory->grow(values, nmax, ncols, "ltau:values");
    array_atom = values;
  }

  void evaluate(bool check_halt)
  {
    if (atom->nmax > nmax) grow(atom->nmax);
    ltau_fix_step_args args = {};
    args.step = update->ntimestep;
    args.nlocal = atom->nlocal;
    args.groupbit = groupbit;
    args.x = atom->x[0];
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
    int status = cbs.fix_step(this, &args, msg);
    if (reduce_status(lmp, world, status, msg, "Fix ltau", LTAU_ERROR) == LTAU_HALT) halt(msg);
  }

  // fix halt's semantics; the message is identical on all ranks (built from reduced values).
  void halt(const char *msg)
  {
    if (halt_mode == LTAU_HALT_HARD) error->all(FLERR, "Fix ltau {}", msg);
    if (comm->me == 0 && halt_message) utils::logmesg(lmp, "Fix ltau {}\n", msg);
    if (!timer->is_timeout()) {
      timer->force_timeout();
      forced_timeout = true;
    }
  }
};

/* ---------------------------------------------------------------------------------------------
   registration
--------------------------------------------------------------------------------------------- */

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
