"""LAMMPS created from Python by the user (issue 21, item 7): ``lammps_module`` for ASE's LAMMPSlib and
``from lammps import lammps``, ``new_lammps`` for an instance with the ltau styles loaded.

In a fresh interpreter: the point is the import order (mpi4py before lammps), which a pytest process
that already imported mpi4py would hide.
"""

import subprocess
import sys

SCRIPT = """
from ltau_lmp.model import LocalForceField, save_model
from ltau_lmp.lammps import lammps_module, new_lammps, plugin_path

save_model(LocalForceField(["Si"], hidden=[8], latent_dim=4, seed=1), "model.pt")
lammps = lammps_module()
from ase.build import bulk
from ase.calculators.lammpslib import LAMMPSlib

atoms = bulk("Si", "diamond", a=5.43, cubic=True)
atoms.calc = LAMMPSlib(lmpcmds=[f"plugin load {plugin_path()}", "pair_style ltau", "pair_coeff * * model.pt Si"],
                       log_file="none", keep_alive=True)
plain = lammps.lammps(cmdargs=["-screen", "none", "-log", "none"])
plain.command("units metal")
lmp = new_lammps(log="none", screen=False)
assert lmp.has_style("pair", "ltau") and lmp.has_style("fix", "ltau")
lmp.commands_string('''units metal
lattice diamond 5.43
region b block 0 1 0 1 0 1
create_box 1 b
create_atoms 1 box
mass 1 28.0855
pair_style ltau
pair_coeff * * model.pt Si
run 0''')
print(atoms.get_potential_energy(), lmp.get_thermo("pe"))
"""


def test_lammps_from_python(tmp_path):
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ase_energy, lammps_energy = map(float, run.stdout.split()[-2:])
    assert ase_energy == lammps_energy != 0.0
