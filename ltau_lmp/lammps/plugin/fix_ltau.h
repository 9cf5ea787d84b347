/* fix ID group ltau ESTIMATOR_FILE keyword value ...: a thin shim over the per-rank Python
   runtime (ltau_lmp/lammps/fix.py).

   Copyright (C) the ltau_lmp authors. GPL-2.0-only (it links against LAMMPS).

   Every keyword is parsed by the Python runtime (one parser); this shim keeps what LAMMPS
   itself needs: nevery, the output sizes, and fix halt's halt modes. */

#ifndef LTAU_FIX_LTAU_H
#define LTAU_FIX_LTAU_H

#include "fix.h"

#include <vector>

namespace LAMMPS_NS {

class FixLTAU : public Fix {
 public:
  FixLTAU(LAMMPS *lmp, int narg, char **arg);
  ~FixLTAU() override;

  int setmask() override;
  void init() override;
  void setup(int) override;
  void end_of_step() override;
  void min_setup(int) override;
  void min_post_force(int) override;
  void post_run() override;
  double compute_scalar() override;
  double compute_vector(int i) override;
  double memory_usage() override;

 private:
  double **values = nullptr;
  std::vector<double> global;
  int nmax = 0, ncols = 0;
  int halt_mode = 0, halt_message = 1;    // an ltau_halt_mode; message yes|no
  bool created = false, forced_timeout = false;

  void report(const char *msg);
  void grow(int n);
  void evaluate(bool check_halt);
  void halt(const char *msg);
};

}    // namespace LAMMPS_NS

#endif
