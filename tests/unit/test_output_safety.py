"""No writer replaces or deletes what a user has (issue 21, items 1 and 4; parts of 6).

Every output goes to a temporary sibling renamed at the end; an existing path is replaced only when
it holds an earlier output of the same kind and --overwrite (overwrite=True) is given; anything
else is refused with one line naming the path, before the long work starts.
"""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from ltau_lmp.cli import main
from ltau_lmp.estimator import LTAUEstimator
from ltau_lmp.model import LocalForceField, save_model
from ltau_lmp.outputs import MARKER, OutputExistsError, check_dir, output_dir


@pytest.fixture()
def inputs(tmp_path, error_log_and_descriptors):
    error_log_and_descriptors(epochs=3)
    save_model(LocalForceField(["Si"], hidden=[8], latent_dim=8, seed=0), tmp_path / "model.pt")
    return tmp_path


def build(tmp, out, *extra):
    return main(["build-estimator", "--error-log", str(tmp / "errors.npz"), "--descriptors", str(tmp / "train.npy"),
                 "-o", str(out), "--model", str(tmp / "model.pt"), *extra])


def listing(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != MARKER)


def one_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_build_estimator_refuses_a_folder_of_user_files(inputs, capsys):
    mine = inputs / "results"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    before = listing(inputs)
    for extra in ([], ["--overwrite"]):
        assert build(inputs, mine, *extra) == 2
        err = one_line(capsys)
        assert f"{mine}: the folder exists and was not written by ltau_lmp" in err and "choose another path" in err
        assert listing(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
        assert listing(inputs) == before


def test_build_estimator_refuses_a_user_file_and_renames_nothing(inputs, capsys):
    mine = inputs / "est"
    mine.write_text("my file")
    (inputs / "est.old").write_text("an older file of mine")
    before = listing(inputs)
    for extra in ([], ["--overwrite"]):
        assert build(inputs, mine, *extra) == 2
        assert f"{mine}: is a file, not an earlier LTAU estimator" in one_line(capsys)
        assert mine.read_text() == "my file" and (inputs / "est.old").read_text() == "an older file of mine"
        assert listing(inputs) == before


def test_an_earlier_estimator_is_replaced_only_with_overwrite(inputs, capsys):
    out = inputs / "est"
    old_sibling = inputs / "est.old"
    old_sibling.mkdir()
    (old_sibling / "mine.txt").write_text("mine")
    assert build(inputs, out, "-k", "3") == 0
    assert build(inputs, out, "-k", "4") == 2
    assert f"{out}: holds an earlier LTAU estimator; give --overwrite" in one_line(capsys)
    assert LTAUEstimator.load(out).k == 3
    assert build(inputs, out, "-k", "4", "--overwrite") == 0
    assert LTAUEstimator.load(out).k == 4
    assert (old_sibling / "mine.txt").read_text() == "mine"
    assert listing(inputs) == ["errors.npz", "est", "est.old", "model.pt", "train.npy"]


def test_an_estimator_written_before_markers_is_recognised(inputs, capsys):
    out = inputs / "est"
    assert build(inputs, out, "-k", "3") == 0
    (out / MARKER).unlink()                      # as written by earlier versions: meta.json only
    assert build(inputs, out, "-k", "5") == 2
    assert "holds an earlier LTAU estimator" in one_line(capsys)
    assert build(inputs, out, "-k", "5", "--overwrite") == 0
    assert LTAUEstimator.load(out).k == 5


def test_files_added_to_an_earlier_output_are_never_deleted(inputs, capsys):
    out = inputs / "est"
    assert build(inputs, out) == 0
    (out / "my_notes.txt").write_text("mine")
    assert build(inputs, out, "--overwrite") == 2
    assert "files ltau_lmp did not write (my_notes.txt)" in one_line(capsys)
    assert (out / "my_notes.txt").read_text() == "mine"


def test_the_python_api_follows_the_same_rule(inputs):
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    est = LTAUEstimator.build(x, np.full((50, 2), 0.5, np.float32), [1.0, 2.0, 3.0], index="flat")
    est.save(inputs / "e")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        est.save(inputs / "e")
    est.save(inputs / "e", overwrite=True)
    (inputs / "f").write_text("mine")
    with pytest.raises(OutputExistsError, match="is a file"):
        est.save(inputs / "f", overwrite=True)
    assert (inputs / "f").read_text() == "mine"


def test_a_crash_while_writing_leaves_no_trace(inputs, monkeypatch):
    from ltau_lmp.estimator.index import require_faiss

    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    est = LTAUEstimator.build(x, np.full((50, 2), 0.5, np.float32), [1.0, 2.0, 3.0], index="flat")
    est.save(inputs / "earlier")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(require_faiss(), "write_index", broken)  # faiss as the estimator file writer imports it
    before = listing(inputs)
    with pytest.raises(OSError, match="disk full"):
        est.save(inputs / "new")
    with pytest.raises(OSError, match="disk full"):
        est.save(inputs / "earlier", overwrite=True)
    assert listing(inputs) == before           # no partial "new", no temporary sibling
    monkeypatch.undo()
    assert LTAUEstimator.load(inputs / "earlier").n_entries == 50


def test_outputs_get_ordinary_permissions(tmp_path):
    with output_dir(tmp_path / "out", "evaluate") as tmp:
        (tmp / "a.txt").write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask
    assert json.loads((tmp_path / "out" / MARKER).read_text())["files"] == ["a.txt"]


def test_an_output_of_another_kind_is_not_replaced(tmp_path):
    with output_dir(tmp_path / "out", "evaluate") as tmp:
        (tmp / "metrics.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="holds a `ltau-lmp evaluate` output, not a LTAU estimator"):
        check_dir(tmp_path / "out", "estimator", overwrite=True)
    with pytest.raises(OutputExistsError, match="metrics.json is a file"):
        check_dir(tmp_path / "out" / "metrics.json" / "sub", "estimator")


def test_the_output_needs_a_name_of_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (".", ".."):
        with pytest.raises(OutputExistsError, match="a name of its own"):
            check_dir(path, "estimator")


def test_an_estimator_rebuilt_inside_a_training_output_counts_as_written(tmp_path):
    """train writes estimator/; build-estimator --overwrite may replace it with other files; train
    --overwrite still recognises them all (the estimator's own marker lists them), not a user's file."""
    with output_dir(tmp_path / "run", "train") as tmp:
        (tmp / "summary.json").write_text("{}")
        with output_dir(tmp / "estimator", "estimator") as est:
            (est / "meta.json").write_text("{}")
    with output_dir(tmp_path / "run" / "estimator", "estimator", overwrite=True) as est:
        (est / "meta.json").write_text("{}")
        (est / "reference_distances.npy").write_text("new file")
    check_dir(tmp_path / "run", "train", overwrite=True)
    (tmp_path / "run" / "estimator" / "extra.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="estimator/extra.txt"):
        check_dir(tmp_path / "run", "train", overwrite=True)
    (tmp_path / "run" / "estimator" / "extra.txt").unlink()
    with output_dir(tmp_path / "run" / "evaluation", "evaluate") as tmp:
        (tmp / "table.md").write_text("|")
    (tmp_path / "run" / MARKER).unlink()        # a training output written before markers: by file names
    check_dir(tmp_path / "run", "train", overwrite=True)


def test_train_refuses_before_training(tmp_path, capsys):
    mine = tmp_path / "run"
    mine.mkdir()
    (mine / "model.pt").write_text("my model")
    config = {"out_dir": str(mine), "epochs": 1, "data": {"train": str(tmp_path / "does_not_exist.xyz")}}
    (tmp_path / "c.yaml").write_text(json.dumps({"train": config}))
    assert main(["train", str(tmp_path / "c.yaml"), "--no-progress", "--overwrite"]) == 2
    assert f"{mine}: the folder exists and was not written by ltau_lmp" in one_line(capsys)  # not "no data"
    assert (mine / "model.pt").read_text() == "my model"


def test_a_failed_training_leaves_no_output(tmp_path, monkeypatch):
    import ltau_lmp.training.trainer as trainer
    from ltau_lmp.training.config import config_from_dict

    monkeypatch.setattr(trainer, "load_data", lambda *args: None)
    monkeypatch.setattr(trainer, "setup_model", lambda *args: (None, None, None))

    def fit(cfg, model, train_set, val_set, rng, metrics_path, show_progress):
        metrics_path.write_text("epoch\n0\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "fit", fit)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config_from_dict({"out_dir": str(tmp_path / "run")}), show_progress=False)
    assert listing(tmp_path) == []


def test_generate_refuses_before_running_md(tmp_path):
    from ltau_lmp.data.generate import GenerateConfig, SetSpec, generate

    mine = tmp_path / "data"
    mine.mkdir()
    (mine / "train.xyz").write_text("my data")
    cfg = GenerateConfig(sets={"train": SetSpec(n_frames=1, supercells=[1], equil_steps=2, stride=1)})
    with pytest.raises(OutputExistsError, match="train.xyz not written by ltau-lmp generate|not written by ltau_lmp"):
        generate(cfg, mine, show_progress=False, overwrite=True)
    assert listing(mine) == ["train.xyz"] and (mine / "train.xyz").read_text() == "my data"


def test_generate_adds_sets_and_replaces_them_only_with_overwrite(tmp_path):
    from ase.io import read

    from ltau_lmp.data.generate import GenerateConfig, SetSpec, generate

    tiny = dict(n_frames=1, supercells=[1], equil_steps=2, stride=1)
    cfg = GenerateConfig(sets={"a": SetSpec(**tiny, seed=1), "b": SetSpec(**tiny, seed=2)})
    out = tmp_path / "data"
    generate(cfg, out, sets=["a"], show_progress=False)
    (out / "notes.txt").write_text("mine")
    generate(cfg, out, sets=["b"], show_progress=False)          # a new set: nothing replaced
    assert listing(out) == ["a.xyz", "b.xyz", "generate.yaml", "notes.txt"]
    with pytest.raises(OutputExistsError, match="already holds a.xyz; give --overwrite"):
        generate(cfg, out, sets=["a"], show_progress=False)
    first = (out / "a.xyz").read_text()
    cfg.sets["a"].seed = 7
    generate(cfg, out, sets=["a"], show_progress=False, overwrite=True)
    assert (out / "a.xyz").read_text() != first and len(read(out / "a.xyz", ":")) == 1
    assert (out / "notes.txt").read_text() == "mine" and listing(tmp_path) == ["data"]
    assert "notes.txt" not in json.loads((out / MARKER).read_text())["files"]


def test_replay_refuses_before_loading_anything(tmp_path, capsys):
    mine = tmp_path / "out"
    mine.mkdir()
    (mine / "summary.txt").write_text("mine")
    assert main(["replay", str(tmp_path / "model.pt"), str(tmp_path), "--train-file", str(tmp_path / "t.xyz"),
                 "-o", str(mine), "--overwrite"]) == 2
    assert f"{mine}: the folder exists and was not written by ltau_lmp" in one_line(capsys)


def test_mace_train_refuses_before_training(tmp_path):
    pytest.importorskip("mace")
    from ltau_lmp.integrations.mace import train_with_ltau

    mine = tmp_path / "ltau"
    mine.mkdir()
    (mine / "x").write_text("mine")
    with pytest.raises(OutputExistsError, match="not written by ltau_lmp"):
        train_with_ltau(["--name", "si", "--train_file", str(tmp_path / "missing.xyz")], out_dir=mine)


def test_failure_report_follows_the_rule(tmp_path):
    from ltau_lmp.evaluation.failure import FailureTimeline, write_failure_report

    timeline = FailureTimeline([0, 10, 20], [0.1, 0.3, 0.5], [0.1, 0.2, 1.2], 0.2, 1.0, 10, 20)
    report = write_failure_report(timeline, tmp_path / "failure")
    assert report["figure"] == str(tmp_path / "failure" / "failure_timeline.png")
    with pytest.raises(OutputExistsError, match="earlier failure report"):
        write_failure_report(timeline, tmp_path / "failure")
    assert write_failure_report(timeline, tmp_path / "failure", overwrite=True)["lead_steps"] == 10
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "plot.png").write_text("mine")
    with pytest.raises(OutputExistsError, match="not written by ltau_lmp"):
        write_failure_report(timeline, tmp_path / "mine", overwrite=True)
    assert listing(tmp_path) == ["failure", "mine"]


def test_predict_output_follows_the_rule(inputs, capsys):
    assert build(inputs, inputs / "est") == 0
    predict = ["predict", str(inputs / "est"), "--descriptors", str(inputs / "train.npy")]
    for name in ("uq.npz", "uq.csv"):
        out = inputs / name
        out.write_text("mine")
        assert main([*predict, "-o", str(out), "--overwrite"]) == 2
        assert f"{out}: the file exists and is not an earlier `ltau-lmp predict` output" in one_line(capsys)
        assert out.read_text() == "mine"
        out.unlink()
        assert main([*predict, "-o", str(out)]) == 0
        assert main([*predict, "-o", str(out)]) == 2
        assert "give --overwrite" in one_line(capsys)
        assert main([*predict, "-o", str(out), "--overwrite", "--tol", "0.2"]) == 0
    assert listing(inputs) == ["errors.npz", "est", "model.pt", "train.npy", "uq.csv", "uq.npz"]


# ---- item 4: an estimator's model binding is explicit

def test_build_estimator_needs_a_model_or_an_explicit_opt_out(inputs, capsys):
    base = ["build-estimator", "--error-log", str(inputs / "errors.npz"), "--descriptors", str(inputs / "train.npy")]
    assert main([*base, "-o", str(inputs / "e")]) == 2
    err = one_line(capsys)
    assert "give --model FILE" in err and "--unchecked-model" in err
    assert not (inputs / "e").exists()

    assert main([*base, "-o", str(inputs / "e"), "--unchecked-model"]) == 0
    assert "model binding unchecked" in capsys.readouterr().out
    est = LTAUEstimator.load(inputs / "e")
    assert est.model_binding == "unchecked" and est.metadata["model_binding"] == "unchecked"
    assert main(["info", str(inputs / "e")]) == 0
    out = capsys.readouterr().out
    assert '"model_binding": "unchecked"' in out and "WARNING: model binding unchecked" in out

    assert build(inputs, inputs / "checked") == 0
    est = LTAUEstimator.load(inputs / "checked")
    assert est.model_binding == "checked" and est.metadata["model_binding"] == "checked"
    assert main(["info", str(inputs / "checked")]) == 0
    out = capsys.readouterr().out
    assert '"model_binding": "checked"' in out and "WARNING" not in out


def test_python_builds_record_the_binding():
    from ltau_lmp.errors import ConfigError

    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    pdfs, edges = np.full((20, 2), 0.5, np.float32), [1.0, 2.0, 3.0]
    assert LTAUEstimator.build(x, pdfs, edges).metadata["model_binding"] == "unchecked"
    assert LTAUEstimator.build(x, pdfs, edges, metadata={"model_hash": "ab" * 32}).model_binding == "checked"
    with pytest.raises(ConfigError, match="model_binding 'checked' contradicts"):
        LTAUEstimator.build(x, pdfs, edges, metadata={"model_binding": "checked"})


# ---- item 6: info fits a screen; a closed pipe is not an error

def test_info_summarises_long_lists(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    est = LTAUEstimator.build(x, np.full((20, 2), 0.5, np.float32), [1.0, 2.0, 3.0],
                              metadata={"train_structures": list(range(189)), "short": [1, 2]})
    est.save(tmp_path / "e")
    assert main(["info", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[:out.rindex("}") + 1])
    assert info["metadata"]["train_structures"] == "189 values: [0, 1, 2, ..., 187, 188] (--full lists them)"
    assert info["metadata"]["short"] == [1, 2] and len(out.splitlines()) < 60
    assert main(["info", str(tmp_path / "e"), "--full"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[:out.rindex("}") + 1])["metadata"]["train_structures"] == list(range(189))


def test_a_closed_pipe_ends_quietly(tmp_path):
    save_model(LocalForceField(["Si"], hidden=[8], latent_dim=8, seed=0), tmp_path / "model.pt")
    proc = subprocess.Popen([sys.executable, "-m", "ltau_lmp.cli", "info", str(tmp_path / "model.pt")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()            # like `| head` that has already exited
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and err == ""
