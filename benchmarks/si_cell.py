"""The silicon cell every LAMMPS benchmark runs, and LAMMPS's own loop timer.

Imported by the benchmark scripts of this folder (run as scripts: this folder is on sys.path).
"""

from __future__ import annotations

SCRIPT = """\
units metal
atom_style atomic
boundary p p p
lattice diamond 5.431
region box block 0 {cells} 0 {cells} 0 {cells}
create_box 1 box
create_atoms 1 box
mass 1 28.0855
displace_atoms all random 0.05 0.05 0.05 1234
{pair}
velocity all create {temperature} 4928459 loop geom
timestep 0.001
fix md all nve
thermo_style custom step pe cpu
thermo 0
"""


def si_script(cells: int, pair: str, temperature: float = 600) -> str:
    """Rattled diamond Si, cells^3 cubic cells (8 atoms each), NVE; ``pair`` = the pair lines."""
    return SCRIPT.format(cells=cells, pair=pair, temperature=temperature)


def ltau_pair(model: str, options: str = "") -> str:
    return f"pair_style ltau {options}\npair_coeff * * {model} Si"


def loop_time(lmp, steps: int) -> float:
    """Seconds per step of the MD loop (thermo `cpu` = LAMMPS's loop timer, setup excluded)."""
    lmp.command(f"run {steps} post no")
    return lmp.last_thermo()["CPU"] / steps
