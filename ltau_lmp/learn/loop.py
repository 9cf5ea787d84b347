"""``ltau-lmp learn``: explore with ``fix ltau``, label what it flags, retrain, resume — round after round.

A round ``r`` (folder ``rounds/NNN/`` of the run folder):

1. **train**: the model family's trainer (``ltau_lmp.learn.trainers``) on the initial data plus
   every label so far (``train.xyz``, each structure with its provenance), warm-started from the
   previous round's model unless
   ``warm_start: false``; its own error log gives the new estimator and its calibrated ``auto``
   thresholds (nothing to tune per round). The validation structures are drawn once from the
   initial data (``validation.xyz``, ``train.data.val_fraction``, seeded) and kept every round:
   they validate and calibrate the ``ood`` p-value, and every label trains. (Labels of excursions
   in the validation set made its reference tail so heavy that nothing far out alarmed: the
   demo's loop stopped with a model whose errors were 17 eV/Å, doc/validation.md.)
2. **explore**: every protocol runs with that model and estimator (``ltau_lmp.learn.explore``),
   ``replicas`` times: replica 0 continues the trajectory, the others start from the same state
   with fresh velocities (more candidates where a resumed run halts again within a few steps).
   A protocol that halted in an earlier round resumes from the restart file written before the
   furthest alarm of its replicas; one that completed starts again from its data file.
3. **stop?** every protocol completed without a halt for ``stop.quiet_rounds`` consecutive rounds,
   or ``stop.max_rounds`` / ``stop.max_labels`` reached; a budget stop trains once more on every
   label (a round with only a train stage), so the loop's result has seen them all.
4. **select**: from the frames the halted protocols dumped, the most unusual and mutually diverse
   ones (``ltau_lmp.evaluation.select``), at most ``per_protocol`` each and ``per_round`` in all.
5. **label**: the reference calculator on each selected frame (``ltau_lmp.learn.label``; any
   ``concurrent.futures`` executor, failures recorded and retried, never lost).

State: ``manifest.json`` records each stage of each round when it has finished (written to a
temporary file and renamed: a kill leaves the previous manifest). Every stage writes its outputs
before the manifest records it, and every stage can be redone from its inputs, so running
``ltau-lmp learn CONFIG`` again after a kill at any moment goes on from the first unfinished
stage: training and exploration are rerun into fresh folders, labelling continues frame by frame
without repeating one. Every label keeps its provenance (round, protocol, step, source file).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ltau_lmp.data.config import resolve
from ltau_lmp.errors import ConfigError, LTAUError
from ltau_lmp.learn.config import LearnConfig
from ltau_lmp.learn.trainers import RoundModel, train_round
from ltau_lmp.outputs import replaced_file
from ltau_lmp.training.trainer import split_structures

MANIFEST = "manifest.json"
FORMAT, VERSION = "ltau-learn", 1
STAGES = ("train", "explore", "select", "label")


class Manifest:
    """``manifest.json``: the config it ran with, every finished stage of every round, the end."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data
        self.on_record = lambda: None  # e.g. redraw the live summary

    @classmethod
    def open(cls, run: Path, cfg: LearnConfig) -> "Manifest":
        path = run / MANIFEST
        config = json.loads(json.dumps(asdict(cfg), default=str))
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ConfigError(f"{path}: not an ltau-lmp learn manifest")
            if data["config"] != config:
                changed = sorted(k for k in config if config[k] != data["config"].get(k))
                raise ConfigError(f"{run} was started with another configuration (changed: {', '.join(changed)}); "
                                  f"use another out_dir, or restore the configuration to continue it")
            return cls(path, data)
        if run.exists() and any(run.iterdir()):
            raise ConfigError(f"{run} exists and holds no {MANIFEST}: not a learn run folder; choose another out_dir")
        run.mkdir(parents=True, exist_ok=True)
        manifest = cls(path, {"format": FORMAT, "version": VERSION, "config": config, "rounds": [], "stopped": None})
        manifest.save()
        return manifest

    def save(self) -> None:
        with replaced_file(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=1))

    def stage(self, r: int, name: str) -> dict | None:
        """What stage ``name`` of round ``r`` recorded, or None if it has not finished."""
        if r < len(self.data["rounds"]):
            return self.data["rounds"][r]["stages"].get(name)
        return None

    def record(self, r: int, name: str, seconds: float, **outputs) -> dict:
        while len(self.data["rounds"]) <= r:
            self.data["rounds"].append({"round": len(self.data["rounds"]), "stages": {}})
        entry = {"seconds": round(seconds, 3), **outputs}
        self.data["rounds"][r]["stages"][name] = entry
        self.save()
        self.on_record()
        return entry

    @property
    def labels(self) -> int:
        return sum((rnd["stages"].get("label") or {}).get("labelled", 0) for rnd in self.data["rounds"])


def run_learn(cfg: LearnConfig, base_dir: str | Path = ".", progress: bool = True, executor=None) -> Manifest:
    """Run (or continue) the loop of ``cfg`` (module docstring); returns the manifest.

    ``executor``: a ``concurrent.futures.Executor`` for the labels (default: from
    ``cfg.labelling``; the caller keeps ownership of one it passes). ``progress``: the live
    per-round table (``ltau_lmp.learn.summary``) and a line per finished step."""
    from ltau_lmp.learn.summary import live_summary

    base = Path(base_dir)
    run = resolve(cfg.out_dir, base)
    manifest = Manifest.open(run, cfg)
    with live_summary(manifest.data, progress) as summary:
        manifest.on_record = summary.update
        if manifest.data["stopped"]:
            summary.say(f"{run}: the loop already ended ({manifest.data['stopped']})")
            return manifest
        return _rounds(cfg, base, run, manifest, executor, summary)


def _rounds(cfg: LearnConfig, base: Path, run: Path, manifest: Manifest, executor, summary) -> Manifest:
    quiet = 0
    for r in range(cfg.stop.max_rounds):
        folder = run / "rounds" / f"{r:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        model = _train(cfg, base, run, manifest, r, folder, summary)
        results = _explore(cfg, base, run, manifest, r, folder, model, summary)
        quiet = quiet + 1 if all(res["status"] == "completed" for res in results.values()) else 0
        if quiet >= cfg.stop.quiet_rounds:
            return _stop(manifest, f"every protocol completed without an alarm in {quiet} consecutive round(s) "
                                   f"(round {r})", summary)
        failed = [name for name, res in results.items() if res["status"] == "failed"]
        if failed and len(failed) == len(results):
            raise LTAUError(f"round {r}: every protocol failed ({', '.join(failed)}); see "
                            f"{folder / 'explore'}/*/*/log.lammps")
        selected = _select(cfg, manifest, r, folder, model, results, summary)
        _label(cfg, manifest, r, folder, model, selected, executor, summary)
        if manifest.labels >= cfg.stop.max_labels:
            return _final(cfg, base, run, manifest, r + 1,
                          f"label budget reached: {manifest.labels} >= {cfg.stop.max_labels}", summary)
    return _final(cfg, base, run, manifest, cfg.stop.max_rounds, f"max_rounds {cfg.stop.max_rounds} reached", summary)


def _final(cfg: LearnConfig, base: Path, run: Path, manifest: Manifest, r: int, reason: str, summary) -> Manifest:
    """A budget ended the loop: round r only trains, on every label (none is left unused), and its
    model and estimator are the loop's result."""
    folder = run / "rounds" / f"{r:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    _train(cfg, base, run, manifest, r, folder, summary)
    return _stop(manifest, reason + f"; round {r} trained on every label", summary)


def _stop(manifest: Manifest, reason: str, summary) -> Manifest:
    from ltau_lmp.learn.report import learn_figures

    manifest.data["stopped"] = reason
    manifest.data["final_round"] = max(rnd["round"] for rnd in manifest.data["rounds"] if "train" in rnd["stages"])
    manifest.data["figures"] = {k: str(Path(v).name) for k, v in learn_figures(manifest.data, manifest.path.parent).items()}
    manifest.save()
    summary.say(f"stopped: {reason}; the model of round {manifest.data['final_round']} is the result; "
                f"figures in {manifest.path.parent}")
    return manifest


def frame_true_max(model, frames) -> list[float]:
    """The largest ‖F_model − F_ref‖ over each labelled frame's atoms (eV/Å)."""
    from ltau_lmp.prediction import predict_frames

    if not frames:
        return []
    errors = predict_frames(model, frames, [atoms.get_forces() for atoms in frames], forces=False).errors
    ends = np.cumsum([len(atoms) for atoms in frames])
    return [float(errors[end - len(atoms):end].max()) for atoms, end in zip(frames, ends)]


def _errors(folder: Path, model: RoundModel, keys) -> list[tuple[float, float]]:
    """(LTAU's largest expected error of the frame when it was flagged, the true max force error of
    the round's model on it) for each labelled frame."""
    from ltau_lmp.learn.label import collect_labels

    frames = collect_labels(folder / "labels", keys)
    if not frames:
        return []
    true_max = frame_true_max(model.load(), frames)
    return [(float(atoms.info.get("ltau_max", np.nan)), error) for atoms, error in zip(frames, true_max)]


# --- the stages -----------------------------------------------------------------------------------

def _train(cfg: LearnConfig, base: Path, run: Path, manifest: Manifest, r: int, folder: Path,
           summary) -> RoundModel:
    """Round r's model and estimator, trained on the initial data and every label so far."""
    from ase.io import write

    done = manifest.stage(r, "train")
    if done:
        return RoundModel.from_json(done, run)
    start = time.perf_counter()
    initial, validation = initial_split(cfg, base, run)
    labels = labels_before(run, r)
    data = folder / "train.xyz"
    write(data, initial + labels, format="extxyz")
    previous = RoundModel.from_json(manifest.stage(r - 1, "train"), run) if cfg.warm_start and r > 0 else None
    trainer_start = time.perf_counter()
    trained = train_round(cfg, base, data, validation, previous, folder / "model")
    trainer_seconds = time.perf_counter() - trainer_start
    entry = manifest.record(r, "train", time.perf_counter() - start, trainer_seconds=round(trainer_seconds, 3),
                            structures=len(initial) + len(labels), labels=len(labels),
                            warm_start=previous is not None, **trained.to_json(run))
    summary.say(f"round {r}: trained on {entry['structures']} structures ({len(labels)} labels) in "
                   f"{entry['seconds']:.0f} s")
    return trained


def labels_before(run: Path, r: int) -> list:
    """Every label of rounds 0 .. r-1, with its provenance: what round r trains on."""
    from ltau_lmp.learn.label import collect_labels

    folders = [run / "rounds" / f"{q:03d}" / "labels" for q in range(r)]
    return [atoms for folder in folders if folder.is_dir() for atoms in collect_labels(folder)]


def initial_split(cfg: LearnConfig, base: Path, run: Path) -> tuple[list, Path | None]:
    """The initial frames that train (with their provenance) and the fixed validation file, drawn
    once with the trainer's seed and val_fraction (``run/validation.xyz``; None without validation)."""
    from ase.io import read, write

    initial = read(resolve(cfg.initial_data, base), index=":")
    for k, atoms in enumerate(initial):
        atoms.info.update({"round": -1, "protocol": "initial", "step": -1, "source": f"{cfg.initial_data}:{k}"})
    train_idx, val_idx = split_structures(len(initial), cfg.train.data.val_fraction,
                                          np.random.default_rng(cfg.train.seed))
    if not len(val_idx):
        return initial, None
    path = run / "validation.xyz"
    if not path.is_file():
        with replaced_file(path) as tmp:
            write(tmp, [initial[k] for k in val_idx], format="extxyz")
    return [initial[k] for k in train_idx], path


def _explore(cfg: LearnConfig, base: Path, run: Path, manifest: Manifest, r: int, folder: Path, model: RoundModel,
             summary) -> dict:
    """Every protocol's exploration (each of its replicas) with round r's model; {name: its manifest entry}."""
    from ltau_lmp.learn.explore import run_protocol

    done = manifest.stage(r, "explore")
    if done:
        return done["protocols"]
    start, results, md_seconds = time.perf_counter(), {}, 0.0
    for protocol in cfg.protocols:
        resume = _resume_point(manifest, r, protocol.name, run)
        runs = []
        for k in range(protocol.replicas):
            workdir = folder / "explore" / protocol.name / str(k)
            if workdir.exists():  # an exploration killed before the manifest recorded it: run it again
                shutil.rmtree(workdir)
            runs.append(run_protocol(protocol, model.model, model.estimator, workdir, resume_from=resume,
                                     launcher=cfg.launcher, root=base, overwrite=True, replica=k))
            summary.say(f"round {r}: {runs[-1].describe()}" + (f" (replica {k})" if protocol.replicas > 1 else ""))
        md_seconds += sum(res.seconds for res in runs)
        results[protocol.name] = _protocol_entry(runs, resume, run)
    manifest.record(r, "explore", time.perf_counter() - start, md_seconds=round(md_seconds, 3), protocols=results)
    return results


def _protocol_entry(runs, resume: Path | None, run: Path) -> dict:
    """A protocol's round in the manifest: ``completed`` when every replica completed, ``halted`` when
    any halted (resumed next round from the restart of the replica that got furthest before its
    alarm), ``failed`` otherwise; each replica's own record under ``replicas``."""
    def rel(path):
        return None if path is None else str(path.relative_to(run)) if path.is_relative_to(run) else str(path)

    replicas = [{"status": res.status, "start_step": res.start_step, "final_step": res.final_step,
                 "steps_run": res.steps_run, "halt_step": res.halt_step, "frames": len(res.frames),
                 "restart": rel(res.restart), "trajectory": rel(res.trajectory), "error": res.error,
                 "seconds": round(res.seconds, 3)} for res in runs]
    statuses = {res.status for res in runs}
    status = "completed" if statuses == {"completed"} else "halted" if "halted" in statuses else "failed"
    halted = [rep for rep in replicas if rep["status"] == "halted"]
    lead = max(halted, key=lambda rep: rep["halt_step"]) if halted else replicas[0]
    errors = [f"replica {k}: {rep['error']}" for k, rep in enumerate(replicas) if rep["error"]]
    return {"status": status, "start_step": replicas[0]["start_step"],
            "final_step": max((rep["final_step"] or 0) for rep in replicas), "steps_run": sum(rep["steps_run"] for rep in replicas),
            "halt_step": lead["halt_step"], "frames": sum(rep["frames"] for rep in replicas), "restart": lead["restart"],
            "resumed_from": str(resume) if resume else None, "error": "\n".join(errors) or None,
            "seconds": round(sum(rep["seconds"] for rep in replicas), 3), "replicas": replicas}


def _resume_point(manifest: Manifest, r: int, name: str, run: Path) -> Path | None:
    """Where protocol ``name`` starts in round r: the restart before its last alarm, if it halted in
    the round before; from its data file otherwise."""
    if r == 0:
        return None
    last = manifest.stage(r - 1, "explore")["protocols"].get(name)
    if last is None or last["status"] != "halted" or not last["restart"]:
        return None
    return resolve(last["restart"], run)


def _select(cfg: LearnConfig, manifest: Manifest, r: int, folder: Path, model: RoundModel, results: dict,
            summary) -> Path:
    """The frames to label from the halted protocols' dumps, with their provenance."""
    from ase import Atoms
    from ase.io import write

    from ltau_lmp.evaluation.select import SCORE_ARRAY, frame_fingerprints, read_dumps, select_frames
    out = folder / "selected.xyz"
    if manifest.stage(r, "select"):
        return out
    start = time.perf_counter()
    network = model.load()
    picked, per_protocol = [], {}
    for name, res in results.items():
        if res["status"] == "completed":
            continue
        # the step each replica started at: its first frame is the state it started from (the data
        # file, or the restart the last round's run already evaluated), the same in every replica
        starts = {folder / "explore" / name / str(k) / "frames.xyz": rep["start_step"]
                  for k, rep in enumerate(res["replicas"])}
        frames = [atoms for atoms in read_dumps([d for d in starts if d.is_file() and d.stat().st_size])
                  if int(atoms.info.get("timestep", -1)) != starts[Path(atoms.info["source"].rsplit(":", 1)[0])]]
        if not frames:
            continue
        scores = np.array([atoms.arrays[SCORE_ARRAY].max() for atoms in frames])
        n = min(cfg.selection.per_protocol, len(frames))
        chosen = select_frames(scores, lambda pool: frame_fingerprints(network, [frames[i] for i in pool]), n,
                               cfg.selection.pool)
        for i in chosen:
            src = frames[i]
            atoms = Atoms(symbols=src.get_chemical_symbols(), positions=src.positions, cell=src.cell, pbc=src.pbc)
            dump_file, index = src.info["source"].rsplit(":", 1)
            atoms.info.update({"round": r, "protocol": name, "step": int(src.info.get("timestep", -1)),
                               "source": f"{Path(dump_file).relative_to(folder)}:{index}",
                               "ltau_max": float(scores[i])})
            picked.append(atoms)
        per_protocol[name] = len(chosen)
    if len(picked) > cfg.selection.per_round:  # the most uncertain across protocols
        picked = sorted(picked, key=lambda a: -a.info["ltau_max"])[:cfg.selection.per_round]
    with replaced_file(out) as tmp:
        write(tmp, picked, format="extxyz")
    manifest.record(r, "select", time.perf_counter() - start, selected=len(picked), per_protocol=per_protocol)
    summary.say(f"round {r}: selected {len(picked)} frames ({per_protocol})")
    return out


def _label(cfg: LearnConfig, manifest: Manifest, r: int, folder: Path, model: RoundModel, selected: Path, executor,
           summary) -> None:
    """Reference labels of the selected frames (resumable frame by frame)."""
    from ase.io import read

    from ltau_lmp.learn.label import dask_executor, label_frames

    if manifest.stage(r, "label"):
        return
    start = time.perf_counter()
    frames = read(selected, index=":") if selected.stat().st_size else []
    own = None
    if executor is None and cfg.labelling.executor == "dask":
        own = executor = dask_executor(cfg.labelling.address or None, n_workers=cfg.labelling.workers)
    try:
        report = label_frames(frames, {"calculator": cfg.reference.calculator, "kwargs": cfg.reference.kwargs},
                              folder / "labels", executor=executor, retries=cfg.labelling.retries,
                              progress=summary.enabled and summary.live is None,
                              max_workers=cfg.labelling.workers)
    finally:
        if own is not None:
            own.shutdown()
    failed = [{"key": f.key, "provenance": f.provenance, "error": f.error} for f in report.failed]
    keys = list(dict.fromkeys(report.keys))  # a frame selected twice is one label
    manifest.record(r, "label", time.perf_counter() - start, labelled=len(keys) - len(report.failed),
                    failed=failed, errors=_errors(folder, model, keys))
    summary.say(f"round {r}: labelled {len(keys) - len(report.failed)} frames"
                   + (f", {len(failed)} failed (recorded in {folder / 'labels'})" if failed else ""))
