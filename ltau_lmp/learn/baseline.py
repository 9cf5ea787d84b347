"""What a learning loop is measured against, from its own run folder.

* **The random baseline**: as many frames as the loop labelled, drawn uniformly at random from
  the loop's own exploration trajectories (every replica of every protocol and round, the
  ``trajectory`` dump of the template contract, each run's first frame left out: it is the state
  the run started from), labelled by the same reference: does LTAU's selection beat chance at the
  same label budget?
* **From scratch**: a model trained without warm start on the initial data plus a given set of
  labels, the same trainer, options and fixed validation structures as the loop (``epochs``
  replaced): the loop's final warm-started model against one trained from scratch on the same
  data (a warm start logs errors over its fine-tuning epochs only), and the random labels
  trained the same way as the loop's.

Everything goes to ``RUN/baselines/NAME/`` (``labels/``, ``train.xyz``, ``model/``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ltau_lmp.learn.config import LearnConfig
from ltau_lmp.learn.trainers import RoundModel, train_round


def trajectory_frames(run: Path, manifest: dict) -> list:
    """Every frame of every exploration trajectory of the loop, with its provenance."""
    from ase.io import read

    frames = []
    for rnd in manifest["rounds"]:
        for name, protocol in ((rnd["stages"].get("explore") or {}).get("protocols") or {}).items():
            for k, replica in enumerate(protocol.get("replicas") or []):
                if not replica.get("trajectory"):
                    continue
                path = run / replica["trajectory"]
                for i, atoms in enumerate(read(path, index=":", format="lammps-dump-text")[1:], start=1):
                    atoms.info.update({"round": rnd["round"], "protocol": name, "step": int(atoms.info["timestep"]),
                                       "source": f"{replica['trajectory']}:{i}", "replica": k})
                    frames.append(atoms)
    return frames


def random_labels(cfg: LearnConfig, run: Path, manifest: dict, n: int, seed: int = 0, executor=None,
                  progress: bool = True) -> list:
    """``n`` frames drawn uniformly from the loop's trajectories, labelled by its reference (resumable)."""
    from ltau_lmp.errors import LTAUError
    from ltau_lmp.learn.label import collect_labels, label_frames

    pool = trajectory_frames(run, manifest)
    if len(pool) < n:
        raise LTAUError(f"{run}: {len(pool)} trajectory frames, fewer than the {n} to draw (do the protocol "
                        f"templates dump ${{trajectory}}?)")
    chosen = np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))
    out = run / "baselines" / "random" / "labels"
    report = label_frames([pool[i] for i in chosen], {"calculator": cfg.reference.calculator,
                                                      "kwargs": cfg.reference.kwargs}, out, executor=executor,
                          retries=cfg.labelling.retries, progress=progress, max_workers=cfg.labelling.workers)
    return collect_labels(out, [key for key in report.keys if key not in {f.key for f in report.failed}])


def train_from_scratch(cfg: LearnConfig, base: Path, run: Path, name: str, labels: list,
                       epochs: int | None = None) -> RoundModel:
    """The loop's trainer, without warm start, on the initial training frames + ``labels``."""
    from ase.io import write

    from ltau_lmp.learn.loop import initial_split

    out = run / "baselines" / name
    out.mkdir(parents=True, exist_ok=True)
    initial, validation = initial_split(cfg, base, run)
    data = out / "train.xyz"
    write(data, initial + list(labels), format="extxyz")
    if epochs is not None:  # the built-in trainer's epochs, MACE's max_num_epochs
        cfg = replace(cfg, train=replace(cfg.train, epochs=epochs),
                      mace={**cfg.mace, "max_num_epochs": epochs} if cfg.mace else cfg.mace)
    return train_round(cfg, base, data, validation, None, out / "model")
