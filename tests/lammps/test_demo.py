"""The README's main command, end to end (slow: ~4 min on 2 cores; `make test-slow`)."""

import json
import subprocess
import sys

import pytest

from helpers.paths import ROOT


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(1800)   # ~4 min on a quiet 2-core machine, 9 min measured under heavy load
def test_demo_runs_end_to_end_and_the_alarm_comes_first(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "examples" / "si" / "demo.py"), "--out", str(tmp_path)],
                   check=True, timeout=1500)
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["sets"]
    assert metrics["test"]["force_rmse_component"] < 0.10
    assert metrics["test"]["miscalibration_area"] < 0.05
    assert metrics["liquid"]["auroc_distance"] > 0.9
    failure = json.loads((tmp_path / "failure" / "failure.json").read_text())
    assert failure["predicted_cross"] is not None and failure["true_cross"] is not None
    assert failure["lead_steps"] > 0
    frames = (tmp_path / "md" / "heat_frames.xyz").read_text()
    assert frames.count("timestep=") == len(failure["steps"])
