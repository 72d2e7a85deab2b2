"""A model file that predicts on its own: train -> save -> `ckpt predict` / `ckpt evaluate` /
ckpt.load_predictor, against the model in the training process; the format version."""
import csv
import json

import numpy as np
import pytest

import ckpt
from ckpt import cli, io
from ckpt.cli import main
from ckpt.predictor import _softmax


def _write_table(path, header, X, y):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row, target in zip(X, y):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{target}\n")


def _data(task, rows=240):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((rows, 3)) * [1, 5, 0.1] + [0, 10, -3]
    if task == "classification":
        y = np.array(["low", "mid", "high"])[np.digitize(X[:, 0] + 0.1 * X[:, 1], [-0.5, 1.5])]
    else:
        y = np.round(200 + 30 * X[:, 0] - 2 * X[:, 1], 4)
    return X, y


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _train(tmp_path, monkeypatch, task, dtype):
    """Train through the CLI, keeping the model and the data it was trained on."""
    X, y = _data(task)
    header = ["a", "b", "c", "target"]
    _write_table(tmp_path / "train.csv", header, X, y)
    seen = {}
    real = cli._test_metrics

    def keep(model, data, comm):
        seen.update(model=model, data=data)
        return real(model, data, comm)
    monkeypatch.setattr(cli, "_test_metrics", keep)
    assert main(["train", "--data", str(tmp_path / "train.csv"), "--target", "target",
                 "--epochs", "3", "--depth", "3", "--width", "16", "--dtype", dtype,
                 "--task", task, "--save", str(tmp_path / "m.npz")]) == 0
    held = seen["data"].test_rows
    # The held-out rows, raw, with the columns in another order and the target kept.
    with open(tmp_path / "held.csv", "w") as f:
        f.write("c,a,target,b\n")
        for i in held:
            a, b, c = (f"{v:.6f}" for v in X[i])
            f.write(f"{c},{a},{y[i]},{b}\n")
    as_written = np.array([[float(f"{v:.6f}") for v in X[i]] for i in held])
    return seen["model"], seen["data"], as_written, y[held]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_predict_on_held_out_rows_equals_the_model_in_the_training_process(
        tmp_path, monkeypatch, capsys, task, dtype):
    model, data, X_held, y_held = _train(tmp_path, monkeypatch, task, dtype)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "m.npz"), str(tmp_path / "held.csv"), "-o",
                 str(tmp_path / "out.csv")]) == 0
    header, rows = _read_csv(tmp_path / "out.csv")
    outputs = ckpt.predict(model, data.X_test)               # the training process's model
    assert len(rows) == len(X_held) == len(data.X_test)
    predictor = ckpt.load_predictor(tmp_path / "m.npz")
    assert predictor.dtype == np.dtype(dtype) and predictor.task == task
    if task == "classification":
        labels = data.classes[outputs.argmax(axis=1)]
        proba = _softmax(outputs)
        assert header == ["target", "p_high", "p_low", "p_mid"]
        assert [row[0] for row in rows] == labels.tolist()
        np.testing.assert_array_equal(np.array([row[1:] for row in rows], float), proba)
        np.testing.assert_array_equal(predictor.predict(X_held), labels)
        np.testing.assert_array_equal(predictor.predict_proba(X_held), proba)
        assert set(labels) <= {"low", "mid", "high"}
    else:
        values = data.target_scaler.inverse(outputs)[:, 0]
        assert header == ["target"]
        np.testing.assert_array_equal(np.array([row[0] for row in rows], float), values)
        np.testing.assert_array_equal(predictor.predict(X_held), values)
        assert abs(values.mean() - y_held.mean()) < 100        # in the target's units
    # ckpt evaluate scores the same predictions.
    assert main(["evaluate", str(tmp_path / "m.npz"), str(tmp_path / "held.csv"),
                 "--json"]) == 0
    scored = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert scored == {"task": task, "rows": len(X_held),
                      **predictor.score(X_held, y_held)}
    if task == "classification":
        assert scored["accuracy"] == np.mean(labels == y_held)
    else:
        assert scored["rmse"] == pytest.approx(np.sqrt(np.mean((values - y_held) ** 2)))


def test_load_model_still_returns_the_network(tmp_path, monkeypatch):
    _train(tmp_path, monkeypatch, "regression", "float64")
    model = ckpt.load_model(tmp_path / "m.npz")
    assert isinstance(model, ckpt.SegmentCheckpointer) and model.widths[0] == 3


def _one_line_exit(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out
    return err


def test_a_different_number_of_features_is_one_line_and_writes_nothing(tmp_path, monkeypatch,
                                                                       capsys):
    _train(tmp_path, monkeypatch, "classification", "float32")
    capsys.readouterr()
    out = tmp_path / "out.csv"
    (tmp_path / "two.csv").write_text("a,b\n1,2\n")
    err = _one_line_exit(capsys, ["predict", str(tmp_path / "m.npz"), str(tmp_path / "two.csv"),
                                  "-o", str(out)])
    assert "has 2 of the model's 3 feature columns (missing: c)" in err
    (tmp_path / "five.csv").write_text("1,2,3,4,5\n")
    err = _one_line_exit(capsys, ["predict", str(tmp_path / "m.npz"),
                                  str(tmp_path / "five.csv"), "-o", str(out)])
    assert "has 5 feature columns, but the model was trained on 3" in err
    np.savez(tmp_path / "x.npz", X=np.zeros((4, 2)))
    err = _one_line_exit(capsys, ["predict", str(tmp_path / "m.npz"), str(tmp_path / "x.npz"),
                                  "-o", str(out)])
    assert "has 2 feature columns, but the model was trained on 3" in err
    with pytest.raises(ValueError, match="X has 2 features, but the model was trained on 3"):
        ckpt.load_predictor(tmp_path / "m.npz").predict(np.zeros((1, 2)))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["five.csv", "held.csv", "m.npz",
                                                          "train.csv", "two.csv", "x.npz"]


def test_an_unwritable_output_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    _train(tmp_path, monkeypatch, "regression", "float32")
    capsys.readouterr()
    target = tmp_path / "no" / "out.csv"
    err = _one_line_exit(capsys, ["predict", str(tmp_path / "m.npz"), str(tmp_path / "held.csv"),
                                  "-o", str(target)])
    assert "No such file or directory" in err and str(target) in err


def test_positional_data_without_a_header(tmp_path, monkeypatch, capsys):
    _train(tmp_path, monkeypatch, "regression", "float64")
    X, y = _data("regression", rows=5)
    with open(tmp_path / "plain.csv", "w") as f:        # the training's layout, no header
        for row, target in zip(X, y):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{target}\n")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "m.npz"), str(tmp_path / "plain.csv")]) == 0
    lines = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert lines[0] == ["target"]
    as_written = [[float(f"{v:.6f}") for v in row] for row in X]
    values = ckpt.load_predictor(tmp_path / "m.npz").predict(as_written)
    np.testing.assert_array_equal([float(row[0]) for row in lines[1:]], values)


def test_a_newer_format_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    _train(tmp_path, monkeypatch, "classification", "float32")
    with np.load(tmp_path / "m.npz") as f:
        arrays = dict(f)
    meta = json.loads(str(arrays[io._META]))
    meta["format"] = io.FORMAT_VERSION + 1
    arrays[io._META] = np.array(json.dumps(meta))
    np.savez(tmp_path / "new.npz", **arrays)
    capsys.readouterr()
    err = _one_line_exit(capsys, ["predict", str(tmp_path / "new.npz"),
                                  str(tmp_path / "held.csv"), "-o", str(tmp_path / "o.csv")])
    assert f"written by a newer ckpt (model format {io.FORMAT_VERSION + 1}" in err
    assert not (tmp_path / "o.csv").exists()


def test_a_format_1_file_loads_without_preprocessing(tmp_path, capsys):
    layers = ckpt.build_mlp(3, 2, 4, 2, seed=0)
    model = ckpt.SegmentCheckpointer(layers)
    io.save(tmp_path / "v2.npz", model)
    with np.load(tmp_path / "v2.npz") as f:
        arrays = dict(f)
    meta = json.loads(str(arrays[io._META]))
    meta["format"] = 1
    arrays[io._META] = np.array(json.dumps(meta))
    np.savez(tmp_path / "v1.npz", **arrays)
    loaded = ckpt.load_model(tmp_path / "v1.npz")
    np.testing.assert_array_equal(loaded.params()[0], model.params()[0])
    (tmp_path / "d.csv").write_text("1,2,3\n")
    err = _one_line_exit(capsys, ["predict", str(tmp_path / "v1.npz"), str(tmp_path / "d.csv")])
    assert "holds no preprocessing" in err


@pytest.mark.parametrize("field, value, match", [
    ("task", "ranking", "the preprocessing's task is 'ranking'"),
    ("feature_names", ["a"], "names 1 features for a network of 3 inputs"),
    ("classes", [1, 2], r"holds \[1, 2\] as the classes of a network of 3 outputs"),
])
def test_a_bad_preprocessing_record_is_a_model_file_error(tmp_path, monkeypatch, field, value,
                                                         match):
    _train(tmp_path, monkeypatch, "classification", "float64")
    with np.load(tmp_path / "m.npz") as f:
        arrays = dict(f)
    meta = json.loads(str(arrays[io._META]))
    meta["preprocessing"][field] = value
    arrays[io._META] = np.array(json.dumps(meta))
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(io.ModelFileError, match=match):
        ckpt.load_predictor(tmp_path / "bad.npz")
