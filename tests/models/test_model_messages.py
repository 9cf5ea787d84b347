"""Messages for a model or estimator path that is the wrong kind of thing: each names the path and the
real cause (issue 21, item 6), never torch's advice to load with weights_only=False."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from ltau_lmp.cli import main
from ltau_lmp.errors import FileFormatError
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.model import LocalForceField, load_model, save_model


class Foreign:
    """An object of a class that no model file names: a weights_only load refuses it."""


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "model.pt"
    save_model(LocalForceField(["Si"], hidden=[8], latent_dim=4, seed=1), path)
    return path


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def test_directory_as_model(tmp_path, capsys):
    plain, estimator = tmp_path / "plain", tmp_path / "est"
    plain.mkdir()
    estimator.mkdir()
    (estimator / "meta.json").write_text("{}")
    for family in (None, "ltau_local", "mace"):
        with pytest.raises(FileFormatError, match=f"model file {plain} is a directory, not a model file"):
            load_model(plain, family=family)
        with pytest.raises(FileFormatError, match=f"model file {estimator} is a directory: this is an "
                                                  f"estimator directory, not a model"):
            load_model(estimator, family=family)
    err = one_line_error(capsys, ["select", str(tmp_path / "dump.xyz"), "--model", str(estimator),
                                  "-o", str(tmp_path / "out.xyz")])
    assert "this is an estimator directory, not a model" in err


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the random bytes
def test_builtin_family_on_foreign_files(tmp_path, model_file):
    good = model_file.read_bytes()
    files = {"random.bin": np.random.default_rng(0).bytes(1000),
             "random_pickle.bin": b"\x80" + np.random.default_rng(1).bytes(1000),
             "truncated.pt": good[: len(good) // 2]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save([Foreign()], tmp_path / "objects.pt")
    for name in [*files, "objects.pt"]:
        path = tmp_path / name
        for family in (None, "ltau_local"):
            with pytest.raises(FileFormatError) as caught:
                load_model(path, family=family)
            message = str(caught.value)
            assert message.startswith(f"model file {path}: not a")
            assert "an ltau_lmp model file" in message or "a torch model file" in message
            assert "weights" not in message.lower() and "trust" not in message
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(FileFormatError, match=r"dict.pt: not an ltau_lmp model file \(missing key"):
        load_model(tmp_path / "dict.pt", family="ltau_local")


def test_mace_family_on_builtin_model(model_file, capsys):
    for allow_pickle in (False, True):
        with pytest.raises(FileFormatError, match=rf"model file {model_file} is an ltau_lmp built-in model "
                                                  rf"\(detected family ltau_local\), not a MACE model"):
            load_model(model_file, family="mace", allow_pickle=allow_pickle)
    err = one_line_error(capsys, ["info", str(model_file), "--family", "mace"])
    assert "is an ltau_lmp built-in model (detected family ltau_local), not a MACE model" in err
    assert load_model(model_file, family="ltau_local").card.family == "ltau_local"


def test_model_file_as_estimator(tmp_path, model_file, capsys):
    hint = "this is a model file; the estimator is a directory written by build-estimator/train"
    with pytest.raises(FileFormatError, match=f"{model_file} is a file, not an estimator directory: {hint}"):
        LTAUEstimator.load(model_file)
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    with pytest.raises(FileFormatError, match=rf"{text} is a file, not an estimator directory$"):
        LTAUEstimator.load(text)
    with pytest.raises(FileFormatError, match="estimator directory not found"):
        LTAUEstimator.load(tmp_path / "nothing")
    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    err = one_line_error(capsys, ["predict", str(model_file), "--descriptors", str(tmp_path / "x.npy"),
                                  "-o", str(tmp_path / "uq.npz")])
    assert hint in err


@pytest.fixture()
def mace_file(tmp_path):
    pytest.importorskip("mace")
    from helpers.mace_models import tiny_mace

    path = tmp_path / "tiny.model"
    torch.save(tiny_mace(), path)
    return path


def test_builtin_family_on_mace_model(mace_file):
    with pytest.raises(FileFormatError, match=rf"model file {mace_file} is a MACE model \(detected family mace\), "
                                              rf"not an ltau_lmp built-in model"):
        load_model(mace_file, family="ltau_local")


def test_mace_load_without_e3nn_warning(mace_file):
    # mace's import sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD and e3nn's import-time torch.load warns about
    # it: a fresh interpreter (e3nn not yet imported), every warning shown
    code = ("from ltau_lmp.model import load_model; import sys; "
            "print(load_model(sys.argv[1], allow_pickle=True).card.family)")
    run = subprocess.run([sys.executable, "-W", "always", "-c", code, str(mace_file)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "mace"
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in run.stderr
    assert "DeprecationWarning" in run.stderr  # the filter is that one warning, not all of them
