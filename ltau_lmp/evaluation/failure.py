"""Failure prediction in MD: did LTAU's predicted max error cross the threshold before the true one?

Input: the frames ``fix ltau`` dumped during a run (dump threshold 0 so that every evaluated
step is kept). For each frame the model's forces are recomputed and compared with the reference
potential's (the ground truth we have for silicon), giving the true max per-atom force error
next to the predicted max. The alarm threshold applies to the prediction (the ``fix ltau halt``
value), the failure threshold to the true error (what "the model failed" means; by default the
same value). The lead time is the number of MD steps between the first step where the
prediction crosses its threshold and the first step where the truth crosses the failure one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ltau_lmp.evaluation.metrics import first_crossing


@dataclass
class FailureTimeline:
    steps: list[int]
    predicted_max: list[float]
    true_max: list[float]
    alarm_threshold: float
    failure_threshold: float
    predicted_cross: int | None
    true_cross: int | None

    @property
    def lead_steps(self) -> int | None:
        """Steps of warning the prediction gave (negative: it was late); None if either never crossed."""
        if self.predicted_cross is None or self.true_cross is None:
            return None
        return self.true_cross - self.predicted_cross


def failure_timeline(dump_path, model, alarm_threshold: float, failure_threshold: float | None = None,
                     metric: str = "ltau_expected", potential: str = "Si.sw", pair_style: str = "sw",
                     elements=("Si",)) -> FailureTimeline:
    """Predicted vs true max per-atom force error for every dumped frame.

    ``model``: a loaded model or a model file, as ``LTAUCalculator`` takes it (load a MACE file first).
    """
    from ase.io import read
    from tqdm.auto import tqdm

    from ltau_lmp.calculator import LTAUCalculator
    from ltau_lmp.data.reference import reference_calculation

    frames = sorted(read(dump_path, ":"), key=lambda a: a.info["timestep"])
    calc = LTAUCalculator(model)
    truth = reference_calculation([a.copy() for a in frames], potential, pair_style, list(elements))
    steps, predicted, true = [], [], []
    for atoms, (_, ref_forces, _) in tqdm(list(zip(frames, truth)), desc="true errors", unit="frame"):
        calc.calculate(atoms, ["forces"])
        steps.append(int(atoms.info["timestep"]))
        predicted.append(float(atoms.arrays[metric].max()))
        true.append(float(np.linalg.norm(calc.results["forces"] - ref_forces, axis=1).max()))
    failure_threshold = alarm_threshold if failure_threshold is None else failure_threshold
    return FailureTimeline(steps, predicted, true, float(alarm_threshold), float(failure_threshold),
                           first_crossing(steps, predicted, alarm_threshold),
                           first_crossing(steps, true, failure_threshold))


def write_failure_report(timeline: FailureTimeline, out_dir, halt_step: int | None = None,
                         overwrite: bool = False) -> dict:
    """failure.json + failure_timeline.png; returns the json content. Written as a temporary sibling
    folder renamed at the end; an existing ``out_dir`` is replaced only when it is an earlier failure
    report and ``overwrite`` is given (``ltau_lmp.outputs``)."""
    from ltau_lmp.evaluation.plots import plot_failure_timeline
    from ltau_lmp.outputs import output_dir

    out_dir = Path(out_dir)
    report = {**asdict(timeline), "lead_steps": timeline.lead_steps, "halt_step": halt_step}
    with output_dir(out_dir, "failure", overwrite) as tmp:
        figure = plot_failure_timeline(timeline.steps, timeline.predicted_max, timeline.true_max,
                                       timeline.alarm_threshold, tmp / "failure_timeline.png",
                                       halt_step=halt_step,
                                       failure_threshold=timeline.failure_threshold)
        report["figure"] = str(out_dir / Path(figure).name)  # where it ends up
        (tmp / "failure.json").write_text(json.dumps(report, indent=2))
    return report
