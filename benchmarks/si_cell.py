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


def synthetic_estimator_arrays(pool, n: int, seed: int = 1, chunk: int = 100_000):
    """(descriptors, pdfs, bin edges) of a synthetic estimator of ``n`` entries: rows of ``pool``
    (real latent features) drawn with replacement plus 2 % noise, and per-entry log-normal error
    PDFs around 0.05 eV/A on 100 log-spaced bins (built in chunks: 1M x 100 floats at a time)."""
    import numpy as np

    from ltau_lmp.estimator.errorlog import log_spaced_edges

    rng = np.random.default_rng(seed)
    noise = 0.02 * pool.std(axis=0, keepdims=True)
    desc = pool[rng.integers(0, len(pool), n)] + rng.normal(size=(n, pool.shape[1])).astype(np.float32) * noise
    edges = log_spaced_edges(1e-3, 10.0, 100)
    logmid = 0.5 * (np.log(edges[1:]) + np.log(edges[:-1]))
    pdfs = np.empty((n, 100), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        mu = rng.normal(np.log(0.05), 0.7, (e - s, 1))
        p = np.exp(-0.5 * ((logmid[None, :] - mu) / 0.5) ** 2)
        pdfs[s:e] = p / p.sum(axis=1, keepdims=True)
    return desc, pdfs, edges
