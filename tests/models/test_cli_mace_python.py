"""`ltau-lmp info / build-estimator / evaluate / select` with a MACE .model file: the explicit
--allow-pickle opt-in, the model card in the estimator, evaluation through the batched MACE path."""

import json

import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from ltau_lmp.cli import main
from ltau_lmp.estimator import ErrorLog, LTAUEstimator
from ltau_lmp.model import load_model

pytest.importorskip("mace")
from helpers.adapter_checks import si_c_cell  # noqa: E402
from helpers.mace_models import tiny_mace  # noqa: E402


def _labelled(adapter, seeds, rattle):
    """Cells labelled with the model's own forces plus a per-atom offset of known norm 0.05 x (1 + i % 4),
    so the true force error of atom i is exactly that norm."""
    from ltau_lmp.calculator import LTAUCalculator

    calc = LTAUCalculator(adapter)
    frames = []
    for seed in seeds:
        atoms = si_c_cell(seed=seed, rattle=rattle)
        forces = calc.get_forces(atoms)
        direction = np.random.default_rng(seed).normal(size=forces.shape)
        norms = 0.05 * (1 + np.arange(len(atoms)) % 4)
        offset = direction / np.linalg.norm(direction, axis=1, keepdims=True) * norms[:, None]
        atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=forces + offset)
        atoms.info["true_error"] = norms
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mace_cli")
    torch.save(tiny_mace(), tmp / "tiny.model")
    adapter = load_model(tmp / "tiny.model", allow_pickle=True)
    train = _labelled(adapter, range(4), 0.1)
    from ltau_lmp.evaluation.evaluate import predict_frames

    _, _, latent = predict_frames(adapter, train)
    np.save(tmp / "descriptors.npy", latent)
    log = ErrorLog.log_spaced(len(latent), 1e-3, 10.0, 30)
    rng = np.random.default_rng(0)
    for _ in range(3):
        log.update(np.arange(len(latent)), rng.lognormal(-2.5, 0.5, len(latent)))
        log.end_epoch()
    log.save(tmp / "errors.npz")
    write(tmp / "test.xyz", _labelled(adapter, range(10, 13), 0.1))
    write(tmp / "hot.xyz", _labelled(adapter, range(20, 23), 0.4))
    return tmp, adapter


def test_info_of_a_mace_file_needs_the_opt_in(files, capsys):
    tmp, adapter = files
    assert main(["info", str(tmp / "tiny.model")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a MACE model" in err and "--allow-pickle" in err
    assert main(["info", str(tmp / "tiny.model"), "--allow-pickle"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card == {"type": "model", "file": "a MACE model (a pickled Python module)", **adapter.card.to_dict()}
    assert (card["family"], card["num_layers"], card["receptive_field"], card["latent_dim"]) == ("mace", 2, 8.0, 16)


def test_build_evaluate_select_with_a_mace_file(files, capsys):
    tmp, adapter = files
    build = ["build-estimator", "--error-log", str(tmp / "errors.npz"), "--descriptors",
             str(tmp / "descriptors.npy"), "-o", str(tmp / "est"), "-k", "4", "--model", str(tmp / "tiny.model")]
    assert main(build) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main([*build, "--allow-pickle", "--family", "mace"]) == 0
    assert LTAUEstimator.load(tmp / "est").metadata["model_card"] == adapter.card.to_dict()
    capsys.readouterr()
    assert main(["info", str(tmp / "est")]) == 0
    assert json.loads(capsys.readouterr().out)["model_card"]["family"] == "mace"

    evaluate = ["evaluate", "--model", str(tmp / "tiny.model"), "--estimator", str(tmp / "est"),
                "--set", f"test={tmp / 'test.xyz'}", "--set", f"hot={tmp / 'hot.xyz'}", "-o", str(tmp / "out")]
    assert main(evaluate) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main([*evaluate, "--allow-pickle"]) == 0
    report = json.loads((tmp / "out" / "metrics.json").read_text())
    for name in ("test", "hot"):  # the true errors are the planted offsets: MACE's forces were used
        true_error = np.concatenate([a.info["true_error"] for a in read(tmp / f"{name}.xyz", ":")])
        row = report["sets"][name]
        assert row["n_atoms"] == len(true_error)
        assert row["mean_true_error"] == pytest.approx(true_error.mean(), rel=1e-6)  # extxyz: ~8 digits

    dump = tmp / "dump.xyz"
    frames = read(tmp / "hot.xyz", ":")
    for k, atoms in enumerate(frames):
        atoms.calc = None
        atoms.arrays["ltau_expected"] = np.full(len(atoms), 0.1 * (k + 1))
        atoms.info["timestep"] = 10 * k
    write(dump, frames, format="extxyz")
    select = ["select", str(dump), "--model", str(tmp / "tiny.model"), "-n", "2", "-o", str(tmp / "picked.xyz")]
    assert main(select) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main([*select, "--allow-pickle"]) == 0
    assert [a.info["timestep"] for a in read(tmp / "picked.xyz", ":")][0] == 20


def test_evaluate_refuses_an_estimator_of_another_model(files, capsys):
    tmp, _ = files
    torch.save(tiny_mace(seed=1), tmp / "other.model")
    assert main(["evaluate", "--model", str(tmp / "other.model"), "--allow-pickle", "--estimator", str(tmp / "est"),
                 "--set", f"test={tmp / 'test.xyz'}", "-o", str(tmp / "o")]) == 2
    assert "not for the evaluated model (mace model" in capsys.readouterr().err
