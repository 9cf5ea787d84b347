"""Fresh validation runs of a learning loop's protocols, with the reference as the truth.

``validate_round(cfg, base, r, out)`` (``validate_model`` for any trained model) reruns every
protocol from its data file with a round's model and estimator, never halting (``NEVER``) and
dumping a frame every ``stride`` steps whatever its uncertainty (``OUT/PROTOCOL/md``), labels the
frames with the reference calculator (``OUT/PROTOCOL/labels``, resumable) and returns each
frame's true max force error and LTAU's largest expected error: how good the model of each round
really is along the trajectories the loop explores.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path


from ltau_lmp.learn.config import LearnConfig
from ltau_lmp.learn.trainers import RoundModel

NEVER = "0 over 1000000000"  # p = 0 in a billion evaluations in a row: the run never halts


def validate_round(cfg: LearnConfig, base: Path, r: int, out: Path, stride: int = 100, executor=None) -> dict:
    """``validate_model`` for the model the loop trained in round r."""
    from ltau_lmp.data.config import resolve
    from ltau_lmp.learn.loop import MANIFEST

    run_dir = resolve(cfg.out_dir, base)
    trained = json.loads((run_dir / MANIFEST).read_text())["rounds"][r]["stages"]["train"]
    return validate_model(cfg, base, RoundModel.from_json(trained, run_dir), out, stride, executor)


def validate_model(cfg: LearnConfig, base: Path, trained: RoundModel, out: Path, stride: int = 100,
                   executor=None) -> dict:
    """{protocol: {"steps": [...], "true_max": [...], "expected_max": [...], "status": ...}}: every
    protocol of ``cfg`` run afresh with ``trained``, a frame every ``stride`` steps labelled by the reference."""
    from ltau_lmp.evaluation.select import SCORE_ARRAY, read_dumps
    from ltau_lmp.learn.explore import run_protocol
    from ltau_lmp.learn.label import collect_labels, label_frames
    from ltau_lmp.learn.loop import frame_true_max

    model = trained.load()
    results = {}
    for protocol in cfg.protocols:
        variables = {**protocol.variables, "halt": NEVER, "dump": f"1.0 interval {stride}"}
        run = run_protocol(replace(protocol, variables=variables), trained.model, trained.estimator,
                           out / protocol.name / "md", launcher=cfg.launcher, root=base, overwrite=True)
        frames = read_dumps(run.dumps) if run.dumps else []
        expected = [float(atoms.arrays[SCORE_ARRAY].max()) for atoms in frames]
        for atoms in frames:
            atoms.info.update({"round": -1, "protocol": protocol.name, "step": int(atoms.info.get("timestep", -1)),
                               "source": atoms.info["source"]})
        report = label_frames(frames, {"calculator": cfg.reference.calculator, "kwargs": cfg.reference.kwargs},
                              out / protocol.name / "labels", executor=executor, retries=cfg.labelling.retries,
                              progress=False, max_workers=cfg.labelling.workers)
        labelled = collect_labels(out / protocol.name / "labels", report.keys)
        results[protocol.name] = {
            "status": run.status, "steps": [a.info["step"] for a in labelled],
            "true_max": frame_true_max(model, labelled),
            "expected_max": [expected[report.keys.index(a.info["label_key"])] for a in labelled]}
    return results
