"""The built-in trainer (ltau_lmp.training) as the loop's train stage; warm start = ``train.init_model``."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from ltau_lmp.learn.trainers import RoundModel


def train_builtin(cfg, base: Path, train_file: Path, validation: Path | None, previous: RoundModel | None,
                  out: Path) -> RoundModel:
    from ltau_lmp.training.trainer import train

    if out.exists():  # a training killed after writing its folder but before the manifest recorded it
        shutil.rmtree(out)
    train_cfg = replace(cfg.train, out_dir=str(out), init_model=str(previous.model) if previous else "",
                        data=replace(cfg.train.data, train=str(train_file), val=str(validation) if validation else "",
                                     test={}))
    result = train(train_cfg, base, show_progress=False)
    return RoundModel(out / "model.pt", out / "estimator", len(result.metrics),
                      result.summary.get("alarm_thresholds"))
