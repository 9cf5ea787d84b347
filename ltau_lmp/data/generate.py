"""Reference data with ground truth: LAMMPS MD with a classical potential, frames to extxyz.

Each data set is a list of seeded MD trajectories (supercell size x temperature); frames are
sampled every ``stride`` steps after equilibration and labelled with the same potential, so the
true energy, forces and stress of every frame are known.  ``kind`` selects the starting structure
and protocol: ``crystal`` (optionally strained/compressed), ``vacancy``, ``surface``, ``liquid``
(melted at ``temperatures``) and ``amorphous`` (melt at ``melt_temperature``, quench, anneal).
Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from ltau_lmp.data.config import from_dict, load_section, resolve
from ltau_lmp.data.reference import PotentialSpec, new_lammps, read_labels, setup_system
from ltau_lmp.errors import ConfigError
from ltau_lmp.geometry import lammps_box_to_cell

KINDS = ("crystal", "vacancy", "surface", "liquid", "amorphous")


@dataclass
class SetSpec:
    """One data set (written to ``<out_dir>/<name>.xyz``)."""

    kind: str = "crystal"  # crystal | vacancy | surface | liquid | amorphous
    n_frames: int = 20  # frames in the set, spread evenly over the trajectories
    supercells: list[int] = field(default_factory=lambda: [2])  # cubic-cell repeats (2 -> 64 Si)
    temperatures: list[float] = field(default_factory=lambda: [300.0])  # sampling temperatures, K
    n_trajectories: int = 0  # MD runs; 0 = one per (supercell, temperature) pair
    seed: int = 0  # seeds strains, vacancies and velocities of this set
    strain: float = 0.0  # random symmetric strain, components uniform in [-strain, strain]
    scale: float = 1.0  # isotropic linear scale of the cell (0.9 = compressed by 10 %)
    equil_steps: int = 1000  # MD steps before the first frame
    stride: int = 50  # MD steps between frames
    n_vacancies: int = 1  # kind=vacancy: atoms removed at random
    vacuum: float = 10.0  # kind=surface: vacuum thickness along z (Angstrom), (001) surfaces
    melt_temperature: float = 3500.0  # kind=amorphous: melt temperature (K)
    quench_steps: int = 10000  # kind=amorphous: steps of the linear quench to the temperature

    def validate(self, where: str) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"{where}.kind: {self.kind!r} is not one of {list(KINDS)}")
        if self.n_frames < 1 or self.stride < 1 or self.equil_steps < 0:
            raise ConfigError(f"{where}: n_frames and stride must be >= 1, equil_steps >= 0")
        if not self.supercells or min(self.supercells) < 1:
            raise ConfigError(f"{where}.supercells: need positive repeats")
        if not self.temperatures or min(self.temperatures) <= 0:
            raise ConfigError(f"{where}.temperatures: need positive temperatures")
        if self.scale <= 0 or not 0 <= self.strain < 0.5:
            raise ConfigError(f"{where}: scale must be > 0 and strain in [0, 0.5)")

    @property
    def trajectories(self) -> int:
        return self.n_trajectories or len(self.supercells) * len(self.temperatures)


@dataclass
class GenerateConfig:
    """Options of ``ltau-lmp generate`` (the ``generate:`` section of a config file)."""

    out_dir: str = "data"  # output folder, relative to the config file
    potential: str = "Si.sw"  # potential file: a path or a file shipped with the lammps wheel
    pair_style: str = "sw"  # LAMMPS pair_style of the potential
    elements: list[str] = field(default_factory=lambda: ["Si"])  # pair_coeff element order
    lattice: str = "diamond"  # ASE bulk lattice of elements[0] used for all starting cells
    lattice_constant: float = 5.431  # cubic lattice constant, Angstrom
    timestep: float = 0.001  # ps
    thermostat_damp: float = 0.1  # Nose-Hoover damping time, ps
    sets: dict[str, SetSpec] = field(default_factory=dict)  # set name -> SetSpec

    def validate(self, where: str) -> None:
        if not self.sets:
            raise ConfigError(f"{where}.sets: no data sets configured")


def silicon_config() -> GenerateConfig:
    """The default silicon data sets (Stillinger-Weber); generation takes about a minute."""
    crystal = dict(kind="crystal", supercells=[2, 3], temperatures=[300, 600, 900, 1200], strain=0.02)
    return GenerateConfig(
        sets={
            "train": SetSpec(**crystal, n_frames=120, n_trajectories=16, seed=1),
            "test": SetSpec(**crystal, n_frames=30, n_trajectories=8, seed=2),
            "liquid": SetSpec(kind="liquid", supercells=[2, 3], temperatures=[3000], n_frames=20,
                              equil_steps=3000, stride=100, seed=3),
            "amorphous": SetSpec(kind="amorphous", supercells=[2], temperatures=[300], n_frames=20,
                                 equil_steps=2000, quench_steps=10000, stride=100, seed=4),
            "vacancy": SetSpec(kind="vacancy", supercells=[2, 3], temperatures=[300, 900], n_frames=20,
                               seed=5),
            "surface": SetSpec(kind="surface", supercells=[2], temperatures=[300, 900], n_frames=20,
                               seed=6),
            "compressed": SetSpec(kind="crystal", supercells=[2, 3], temperatures=[300, 900], scale=0.90,
                                  n_frames=20, seed=7),
        }
    )


def load_generate_config(path: str | Path) -> tuple[GenerateConfig, Path]:
    """Config from the ``generate:`` section of ``path``; also returns the resolved ``out_dir``."""
    cfg = from_dict(GenerateConfig, load_section(path, "generate"), "generate")
    return cfg, resolve(cfg.out_dir, Path(path).resolve().parent)


def _start_structure(cfg: GenerateConfig, spec: SetSpec, repeat: int, rng: np.random.Generator) -> Atoms:
    atoms = bulk(cfg.elements[0], cfg.lattice, a=cfg.lattice_constant, cubic=True).repeat(repeat)
    deform = np.eye(3) * spec.scale
    if spec.strain > 0:
        eps = rng.uniform(-spec.strain, spec.strain, (3, 3))
        deform = deform @ (np.eye(3) + 0.5 * (eps + eps.T))
    atoms.set_cell(atoms.cell.array @ deform, scale_atoms=True)
    if spec.kind == "vacancy":
        del atoms[sorted(rng.choice(len(atoms), spec.n_vacancies, replace=False).tolist())]
    if spec.kind == "surface":
        atoms.center(vacuum=spec.vacuum / 2, axis=2)
    return atoms


def _snapshot(lmp, elements: list[str]) -> Atoms:
    """Current LAMMPS configuration (box frame) with its true labels."""
    n = lmp.get_natoms()
    boxlo, boxhi, xy, yz, xz, _, _ = lmp.extract_box()
    cell, origin = lammps_box_to_cell([*boxlo, *boxhi, xy, xz, yz])
    x = np.ctypeslib.as_array(lmp.gather_atoms("x", 1, 3)).reshape(n, 3) - origin
    types = np.ctypeslib.as_array(lmp.gather_atoms("type", 0, 1))
    energy, forces, stress = read_labels(lmp, np.eye(3))
    atoms = Atoms([elements[t - 1] for t in types], positions=x, cell=cell, pbc=True)
    atoms.wrap()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
    return atoms


def run_trajectory(cfg, spec, atoms, temperature, n_frames, seed, info, progress=None) -> list[Atoms]:
    """Seeded NVT MD of ``atoms``; returns ``n_frames`` labelled frames."""
    potential = PotentialSpec(cfg.potential, cfg.pair_style, tuple(cfg.elements))
    lmp = new_lammps()
    try:
        setup_system(lmp, atoms, potential)
        start_t = spec.melt_temperature if spec.kind == "amorphous" else temperature
        damp = cfg.thermostat_damp
        lmp.commands_list(
            [
                f"timestep {cfg.timestep}",
                "thermo 0",
                f"velocity all create {start_t} {seed} mom yes rot no dist gaussian",
                f"fix ltau_nvt all nvt temp {start_t} {start_t} {damp}",
                f"run {spec.equil_steps}",
            ]
        )
        if spec.kind == "amorphous":
            lmp.commands_list(
                [
                    "unfix ltau_nvt",
                    f"fix ltau_nvt all nvt temp {start_t} {temperature} {damp}",
                    f"run {spec.quench_steps}",
                    "unfix ltau_nvt",
                    f"fix ltau_nvt all nvt temp {temperature} {temperature} {damp}",
                    f"run {spec.equil_steps}",
                ]
            )
        frames = []
        for k in range(n_frames):
            lmp.command(f"run {spec.stride}")
            atoms_k = _snapshot(lmp, cfg.elements)
            atoms_k.info.update(info, frame=k, step=int(lmp.get_thermo("step")))
            frames.append(atoms_k)
            if progress is not None:
                progress.update(1)
    finally:
        lmp.close()
    return frames


def generate_set(cfg: GenerateConfig, name: str, spec: SetSpec, progress=None) -> list[Atoms]:
    """All frames of one data set, deterministic for ``spec.seed``."""
    n_traj = spec.trajectories
    counts = [spec.n_frames // n_traj + (t < spec.n_frames % n_traj) for t in range(n_traj)]
    seeds = np.random.SeedSequence(spec.seed).spawn(n_traj)
    frames = []
    for t, (count, ss) in enumerate(zip(counts, seeds)):
        if count == 0:
            continue
        repeat = spec.supercells[t % len(spec.supercells)]
        temperature = float(spec.temperatures[(t // len(spec.supercells)) % len(spec.temperatures)])
        rng = np.random.default_rng(ss)
        atoms = _start_structure(cfg, spec, repeat, rng)
        velocity_seed = int(rng.integers(1, 2**30))
        info = dict(set=name, kind=spec.kind, trajectory=t, temperature=temperature, seed=velocity_seed)
        frames += run_trajectory(cfg, spec, atoms, temperature, count, velocity_seed, info, progress)
    return frames


def generate(cfg: GenerateConfig, out_dir: str | Path, sets: list[str] | None = None,
             show_progress: bool = True, overwrite: bool = False) -> dict[str, Path]:
    """Generate the configured sets (or the named subset) into ``out_dir``; returns their paths.

    A new ``out_dir`` is written into a temporary sibling and renamed at the end. Into an earlier
    data folder of ``generate`` the sets are added one file at a time (each written to a temporary
    sibling and renamed); a set file already there is replaced only with ``overwrite``. Anything
    else at ``out_dir`` is refused, before any MD runs (``ltau_lmp.outputs``).
    """
    from ltau_lmp.outputs import is_earlier_output, output_dir, record_files

    names = list(cfg.sets) if sets is None else sets
    missing = [n for n in names if n not in cfg.sets]
    if missing:
        raise ConfigError(f"unknown data set(s) {missing}; configured: {list(cfg.sets)}")
    out_dir = Path(out_dir)
    if is_earlier_output(out_dir, "generate"):
        _check_set_files(out_dir, names, overwrite)
        _generate_into(cfg, names, out_dir, show_progress)
        record_files(out_dir, "generate", added=[f"{name}.xyz" for name in names] + ["generate.yaml"])
    else:
        with output_dir(out_dir, "generate", overwrite) as tmp:
            _generate_into(cfg, names, tmp, show_progress)
    return {name: out_dir / f"{name}.xyz" for name in names}


def _check_set_files(out_dir: Path, names: list[str], overwrite: bool) -> None:
    """Adding sets to an earlier data folder: a set file there is replaced only with ``overwrite``, and
    only if this package wrote it."""
    from ltau_lmp.outputs import OutputExistsError, written_files

    ours = written_files(out_dir, "generate")
    taken = [f"{name}.xyz" for name in names if (out_dir / f"{name}.xyz").exists()]
    foreign = [name for name in taken if name not in ours]
    if foreign:
        raise OutputExistsError(f"{out_dir}: {', '.join(foreign)} not written by ltau-lmp generate; move it away "
                                f"or choose another out_dir (nothing was changed)")
    if taken and not overwrite:
        raise OutputExistsError(f"{out_dir}: already holds {', '.join(taken)}; give --overwrite (Python: "
                                f"overwrite=True) to replace them, or choose another out_dir")


def _generate_into(cfg: GenerateConfig, names: list[str], directory: Path, show_progress: bool) -> None:
    """Each set as ``directory/<name>.xyz`` (temporary sibling, then rename), then generate.yaml."""
    from ase.io import write
    from tqdm import tqdm

    from ltau_lmp.outputs import replaced_file

    total = sum(cfg.sets[n].n_frames for n in names)
    start = time.perf_counter()
    with tqdm(total=total, desc="generate", unit="frame", disable=not show_progress) as bar:
        for name in names:
            bar.set_postfix_str(name)
            frames = generate_set(cfg, name, cfg.sets[name], bar)
            with replaced_file(directory / f"{name}.xyz") as tmp:
                write(tmp, frames, format="extxyz")
    with replaced_file(directory / "generate.yaml") as tmp:
        tmp.write_text(_dump_config(cfg, time.perf_counter() - start))


def _dump_config(cfg: GenerateConfig, seconds: float) -> str:
    """The exact configuration used, so a data folder documents how it was made."""
    import yaml

    return yaml.safe_dump({"generate": asdict(cfg), "seconds": round(seconds, 2)}, sort_keys=False)
