"""The inputs of a tiny learning loop, shared by the loop tests of every trainer: 8 SW frames at
300 K (64 atoms), a 64-atom diamond cell as LAMMPS data, and an NVT template."""

from pathlib import Path

from ase.build import bulk
from ase.io import write

from ltau_lmp.data.generate import GenerateConfig, SetSpec, generate
from ltau_lmp.learn.explore import SI_NVT_TEMPLATE

SW = {"calculator": "ltau_lmp.data.reference:LAMMPSCalculator",
      "kwargs": {"potential": "Si.sw", "pair_style": "sw", "elements": ["Si"]}}


def tiny_loop_inputs(root: Path, template: str = SI_NVT_TEMPLATE) -> Path:
    """Write data/train.xyz, si.data and nvt.in (``template``) under ``root``; returns the frames' file."""
    sets = generate(GenerateConfig(sets={"train": SetSpec(supercells=[2], temperatures=[300], n_frames=8,
                                                          equil_steps=20, stride=10, seed=1)}),
                    root / "data", show_progress=False)
    write(root / "si.data", bulk("Si", "diamond", a=5.431, cubic=True) * (2, 2, 2), format="lammps-data",
          atom_style="atomic", masses=True)
    (root / "nvt.in").write_text(template)
    return sets["train"]


class FailsOnFirstStep:
    """A stand-in reference (SW) that always raises on the frames of the first step it is asked
    about (recorded in ``log``): a calculation that fails for good, inside a running loop."""

    def __new__(cls, log, **kwargs):
        from ltau_lmp.data.reference import LAMMPSCalculator

        class _Failing(LAMMPSCalculator):
            def calculate(self, atoms=None, properties=("energy",), system_changes=()):
                path, step = Path(log), atoms.info.get("step")
                if not path.exists():
                    path.write_text(str(step))
                if str(step) == path.read_text():
                    raise RuntimeError(f"SCF did not converge at step {step}")
                super().calculate(atoms, properties, system_changes)

        return _Failing(**kwargs)
