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


EPOCHS = 100  # epochs per synthetic error histogram


def synthetic_estimator_arrays(pool, n: int, seed: int = 1, chunk: int = 100_000):
    """(descriptors, pdfs, bin edges) of a synthetic estimator of ``n`` entries: rows of ``pool``
    (real latent features) drawn with replacement plus 2 % noise, and per-entry error PDFs on 100
    log-spaced bins shaped like real ones: each entry's median error log-normal around 0.05 eV/A,
    its errors of ``EPOCHS`` epochs log-normal around that median (sigma 0.5), histogrammed
    (integer counts / EPOCHS; ~24 of 100 bins non-zero, like the demo's 22.5)."""
    import numpy as np

    from ltau_lmp.estimator.errorlog import log_spaced_edges

    rng = np.random.default_rng(seed)
    noise = 0.02 * pool.std(axis=0, keepdims=True)
    desc = pool[rng.integers(0, len(pool), n)] + rng.normal(size=(n, pool.shape[1])).astype(np.float32) * noise
    edges = log_spaced_edges(1e-3, 10.0, 100)
    pdfs = np.empty((n, 100), np.float32)
    for s in range(0, n, chunk):
        median = np.exp(rng.normal(np.log(0.05), 0.7, (min(n, s + chunk) - s, 1)))
        pdfs[s:s + len(median)] = epoch_histograms(rng, median, edges)
    return desc, pdfs, edges


def epoch_histograms(rng, median, edges, sigma: float = 0.5):
    """Histograms (len(median), nbins) over ``edges`` of ``EPOCHS`` errors per row, log-normal
    around each row's ``median`` (column vector): probability masses (counts / EPOCHS), float32."""
    import numpy as np

    nbins = len(edges) - 1
    errors = median * np.exp(sigma * rng.standard_normal((len(median), EPOCHS)))
    bins = np.clip(np.searchsorted(edges, errors, side="right") - 1, 0, nbins - 1)
    bins += nbins * np.arange(len(median))[:, None]
    counts = np.bincount(bins.ravel(), minlength=len(median) * nbins).reshape(len(median), nbins)
    return (counts / EPOCHS).astype(np.float32)
