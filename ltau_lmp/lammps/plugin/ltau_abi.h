/* The C ABI between the ltau LAMMPS plugin (pair_ltau.cpp, fix_ltau.cpp) and its Python runtime.

   Copyright (C) the ltau_lmp authors. GPL-2.0-only.

   This header is the whole contract. The Python side mirrors it once, field for field, in
   ltau_lmp/lammps/abi.py (ctypes); tests/lammps/test_lammps_abi.py compiles this header and checks
   every size and offset against that mirror. Any change to a struct, a callback signature or
   the meaning of a field bumps LTAU_ABI_VERSION on both sides: the plugin and the runtime each
   check the other's number, and a mismatch stops with "rebuild the plugin (`pip install -e .`)"
   instead of reading arguments at the wrong offsets.

   Conventions: every callback receives the C++ object pointer (`self`, the key of the Python
   object), one argument struct and a message buffer of LTAU_MSGLEN bytes. It returns an
   ltau_status and, for anything but LTAU_OK, writes a NUL-terminated message. Arrays are
   LAMMPS's own storage (zero-copy), row-major, local atoms first, then ghost atoms. Positions
   are in LAMMPS `metal` units (Angstrom), energies in eV, forces in eV/Angstrom. */

#ifndef LTAU_ABI_H
#define LTAU_ABI_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LTAU_ABI_VERSION 9
#define LTAU_MSGLEN 2048

/* Return value of every callback. The plugin reduces it over all ranks (MPI_MAX). */
enum ltau_status {
  LTAU_OK = 0,
  LTAU_HALT = 1,  /* fix only: the halt condition is met; the message is the halt message */
  LTAU_ERROR = 2  /* the message is shown on every rank by error->all(); the run stops */
};

/* Halt modes of fix ltau: those of LAMMPS's fix halt (`error hard|soft|continue`). */
enum ltau_halt_mode {
  LTAU_HALT_NONE = 0,     /* no halt keyword */
  LTAU_HALT_HARD = 1,     /* error->all(): LAMMPS stops */
  LTAU_HALT_SOFT = 2,     /* the run ends cleanly; later `run` commands are skipped */
  LTAU_HALT_CONTINUE = 3  /* the run ends cleanly; later `run` commands go ahead */
};

/* How a model's graph is distributed over MPI ranks (on one rank, message-passing graphs are
   always folded onto the local atoms, see ltau_pair_compute_args.shifts). */
enum ltau_message_passing {
  LTAU_MP_LOCAL = 0,     /* strictly local model: one cutoff of ghosts, pairs centred on local atoms */
  LTAU_MP_SHELL = 1,     /* thick ghost shell: ghosts out to the receptive field, pairs centred on
                            local and ghost atoms */
  LTAU_MP_EXCHANGE = 2   /* one cutoff of ghosts, pairs centred on local atoms, ghost node features
                            refreshed from their owners after each layer (ltau_exchange_fn) */
};

/* Direction of one ltau_exchange_fn call. */
enum ltau_exchange_direction {
  LTAU_EXCHANGE_FORWARD = 0,  /* every ghost row := its owner's row (LAMMPS forward comm) */
  LTAU_EXCHANGE_REVERSE = 1   /* every ghost row is added to its owner's row, then set to 0
                                 (LAMMPS reverse comm): the transpose of the forward exchange */
};

/* Exchange of per-atom rows between ranks, called by the runtime during pair_compute (message
   passing mode LTAU_MP_EXCHANGE only). self is the pair_compute callback's self; data is a
   (nlocal+nghost, ncols) row-major float64 array, any ncols >= 0, changed in place. Collective:
   every rank makes the same calls in the same order with the same ncols. Each call first
   learns whether another rank failed in this force call: then it returns LTAU_ERROR without
   communicating, and the runtime must return from pair_compute (that rank's message is shown). */
typedef int32_t (*ltau_exchange_fn)(void *self, double *data, int32_t ncols, int32_t direction);

/* pair_coeff * * MODEL_FILE El1 ... ElN (with the keywords of the last pair_style command) */
typedef struct ltau_pair_coeff_args {
  int32_t ntypes;             /* in: number of LAMMPS atom types */
  int32_t narg;               /* in: number of words in arg (1 + ntypes) */
  int32_t nsettings;          /* in: number of words in settings */
  int32_t fcomm;              /* in: MPI_Comm_c2f() of the LAMMPS world communicator */
  const char *const *arg;     /* in: MODEL_FILE El1 ... ElN (the words after `* *`) */
  const char *const *settings;/* in: the words after `pair_style ltau` (keyword value ...) */
  double cutoff;              /* out: model cutoff (A) of one layer; LAMMPS's force cutoff */
  double receptive_field;     /* out: how far (A) an atom's energy reaches: cutoff x layers */
  int32_t message_passing;    /* out: an ltau_message_passing (keyword message_passing, model card) */
  int32_t pad_;               /* (alignment; unused) */
} ltau_pair_coeff_args;

/* One force evaluation of pair_style ltau on this rank. */
typedef struct ltau_pair_compute_args {
  int64_t step;               /* in: update->ntimestep */
  int32_t nlocal;             /* in: atoms owned by this rank */
  int32_t nghost;             /* in: ghost atoms (periodic images and other ranks' atoms) */
  const double *x;            /* in: (nlocal+nghost, 3) positions */
  const int32_t *type;        /* in: (nlocal+nghost) LAMMPS atom types 1..ntypes */
  const int32_t *tag;         /* in: (nlocal+nghost) atom IDs */
  int64_t nedges;             /* in: number of directed pairs i -> j below */
  const int64_t *centers;     /* in: (nedges) i of each pair with r_ij < cutoff: a local atom, or
                                 also a ghost atom in message passing mode LTAU_MP_SHELL */
  const int64_t *neighbors;   /* in: (nedges) j, a local or ghost atom (full list: both i->j and j->i) */
  const double *shifts;       /* in: NULL, or (nedges, 3) when the graph is folded onto the local
                                 atoms: every j is then a local atom (the owner of the periodic
                                 image LAMMPS listed) and r_ij = x_j - x_i + shift_ij. The plugin
                                 folds message-passing models on one rank, where every ghost is an
                                 image of a local atom, so no node is computed twice. */
  ltau_exchange_fn exchange;  /* in: NULL, or the ghost-row exchange in mode LTAU_MP_EXCHANGE on
                                 several ranks: the runtime must then call the model on every rank,
                                 even one without local atoms (the calls are collective) */
  double cutghost;            /* in: how far (A) LAMMPS communicates ghost atoms */
  int32_t eflag_atom;         /* in: 1 = add per-atom energies to eatom */
  int32_t vflag_atom;         /* in: 1 = add per-atom virials to vatom */
  double *f;                  /* in/out: (nlocal+nghost, 3) forces, accumulated; ghost forces
                                 are summed onto their owners by LAMMPS (newton pair on) */
  double *eatom;              /* in/out: (nlocal+nghost) per-atom energy, NULL unless eflag_atom */
  double *vatom;              /* in/out: (nlocal+nghost, 6) per-atom virial xx yy zz xy xz yz,
                                 NULL unless vflag_atom */
  int32_t vflag_global;       /* in: 1 = fill virial */
  int32_t pad_;               /* (alignment; unused) */
  double energy;              /* out: sum of the local atoms' energies (eV) */
  double virial[6];           /* out: global virial xx yy zz xy xz yz (eV) = -sum over pairs of
                                 r_ij (x) dE/dr_ij, when vflag_global */
} ltau_pair_compute_args;

/* fix ID group ltau ESTIMATOR keyword value ... : all keywords are parsed in Python. */
typedef struct ltau_fix_create_args {
  void *pair;                 /* in: the pair_style ltau object (key of its Python runtime) */
  int32_t fcomm;              /* in: MPI_Comm_c2f() of the LAMMPS world communicator */
  int32_t narg;               /* in: number of words in arg */
  const char *fix_id;         /* in: the fix ID */
  const char *const *arg;     /* in: the words after `ltau`: ESTIMATOR keyword value ... */
  int32_t nevery;             /* out: evaluate every nevery steps (keyword every) */
  int32_t halt_mode;          /* out: an ltau_halt_mode (keywords halt ... error) */
  int32_t halt_message;       /* out: 1 = print the halt message for soft/continue (message yes) */
  int32_t size_peratom_cols;  /* out: columns of the per-atom array f_ID[i] */
  int32_t size_vector;        /* out: length of the global vector f_ID[i] */
  int32_t pad_;               /* (alignment; unused) */
} ltau_fix_create_args;

/* Fix::init() before every run or minimization: the pair style may have been redefined, the
   timestep reset, the group changed. With LTAU_OK, a non-empty message is rank 0's report on
   the fix for the user: the plugin prints it to screen and log file, its lines that start with
   "WARNING: " as LAMMPS warnings. */
typedef struct ltau_fix_init_args {
  void *pair;                 /* in: the current pair_style ltau object, NULL if the pair style
                                 is not ltau (then the callback reports the error) */
  int64_t step;               /* in: update->ntimestep, the first step of the coming run */
  int64_t natoms_group;       /* in: atoms in the fix group over all ranks (group->count) */
} ltau_fix_init_args;

/* One evaluation of fix ltau (setup, end of every nevery-th step, minimizer force calls).
   Returns LTAU_HALT only when check_halt is set and the halt condition is met. */
typedef struct ltau_fix_step_args {
  int64_t step;               /* in: update->ntimestep */
  int32_t nlocal;             /* in: atoms owned by this rank */
  int32_t groupbit;           /* in: the fix group's bit in mask */
  const double *x;            /* in: (nlocal, 3) positions */
  const double *f;            /* in: (nlocal, 3) forces: complete at end of step (ghost forces
                                 summed onto their owners, other fixes included) */
  const int32_t *type;        /* in: (nlocal) LAMMPS atom types 1..ntypes */
  const int32_t *tag;         /* in: (nlocal) atom IDs */
  const int32_t *mask;        /* in: (nlocal) group masks */
  double *peratom;            /* out: (nlocal, size_peratom_cols) per-atom values */
  double *global;             /* out: (1 + size_vector) the scalar, then the vector */
  double box[9];              /* in: xlo ylo zlo xhi yhi zhi xy xz yz */
  int32_t periodic[3];        /* in: 1 = periodic in x, y, z */
  int32_t check_halt;         /* in: 1 = check the halt condition (end of step, minimizer force
                                 calls); 0 in setup, whose values are for output only */
} ltau_fix_step_args;

typedef int (*ltau_pair_coeff_fn)(void *self, ltau_pair_coeff_args *args, char *msg);
typedef int (*ltau_pair_compute_fn)(void *self, ltau_pair_compute_args *args, char *msg);
typedef int (*ltau_fix_create_fn)(void *self, ltau_fix_create_args *args, char *msg);
typedef int (*ltau_fix_init_fn)(void *self, ltau_fix_init_args *args, char *msg);
typedef int (*ltau_fix_step_fn)(void *self, ltau_fix_step_args *args, char *msg);
typedef void (*ltau_destroy_fn)(void *self);

/* The table the runtime registers. abi_version must equal LTAU_ABI_VERSION. */
typedef struct ltau_callbacks {
  int32_t abi_version;
  int32_t pad_;               /* (alignment; unused) */
  ltau_pair_coeff_fn pair_coeff;
  ltau_pair_compute_fn pair_compute;
  ltau_destroy_fn pair_destroy;
  ltau_fix_create_fn fix_create;
  ltau_fix_init_fn fix_init;
  ltau_fix_step_fn fix_step;
  ltau_destroy_fn fix_destroy;
} ltau_callbacks;

/* Exported by the plugin. */
int32_t ltau_abi_version(void);  /* LTAU_ABI_VERSION the plugin was compiled with */
/* Copies the table; returns 0, or the plugin's LTAU_ABI_VERSION when table->abi_version
   differs: the table is refused, any earlier one dropped, and the styles report "rebuild
   the plugin". */
int32_t ltau_set_callbacks(const ltau_callbacks *table);

#ifdef __cplusplus
}
#endif

#endif
