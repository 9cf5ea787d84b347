/* pair_style ltau: a thin shim over the per-rank Python runtime (ltau_lmp/lammps/pair.py).

   Copyright (C) the ltau_lmp authors. GPL-2.0-only (it links against LAMMPS).

   The shim flattens LAMMPS's full neighbour list into int64 pairs (r < model cutoff), hands
   the runtime zero-copy pointers through ltau_pair_compute_args (ltau_abi.h) and adds the
   energy and virial it returns. For message-passing models it folds the graph onto the local
   atoms on one rank, keeps a thick ghost shell (`message_passing shell`) or exchanges ghost
   node features after each layer through LAMMPS's forward/reverse communication
   (`message_passing exchange`). */

#ifndef LTAU_PAIR_LTAU_H
#define LTAU_PAIR_LTAU_H

#include "pair.h"

#include <cstdint>
#include <string>
#include <vector>

namespace LAMMPS_NS {

class PairLTAU : public Pair {
 public:
  explicit PairLTAU(LAMMPS *lmp);
  ~PairLTAU() override;

  void settings(int narg, char **arg) override;
  void coeff(int narg, char **arg) override;
  void init_style() override;
  double init_one(int, int) override;
  void compute(int eflag, int vflag) override;

  int pack_forward_comm(int n, int *list, double *buf, int, int *) override;
  void unpack_forward_comm(int n, int first, double *buf) override;
  int pack_reverse_comm(int n, int first, double *buf) override;
  void unpack_reverse_comm(int n, int *list, double *buf) override;

 private:
  double cutoff = 0.0, receptive_field = 0.0;
  int message_passing = 0;    // an ltau_message_passing
  bool raised_cutghost = false, fold = false, shell = false, exchange_mode = false;
  bool announced = false, peer_failed = false;
  std::vector<std::string> settings_words;
  std::vector<int64_t> centers, neighbors;
  std::vector<double> shifts;
  double *xdata = nullptr;    // the array of the exchange in progress
  int xcols = 0, xcol = 0, xwidth = 0;

  int exchange(double *data, int ncols, int direction);
  static int32_t exchange_callback(void *self, double *data, int32_t ncols, int32_t direction);
  bool failure_check(int failed);
  int64_t build_edges();
  void ensure_ghost_cutoff();
};

}    // namespace LAMMPS_NS

#endif
