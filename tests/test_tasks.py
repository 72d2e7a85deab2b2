"""--task: the auto rule (integer-like targets, at most 2% of the rows and 1,000 distinct values
are classes) and regression (squared error, RMSE and R^2, standardised targets)."""
import json

import numpy as np
import pytest

from ckpt.cli import main
from ckpt.datasets import DataError, choose_task
from ckpt.inference import regression_metrics


@pytest.mark.parametrize("y, task, reason", [
    (np.tile([0.0, 1.0, 2.0], 3334)[:10_000], "classification",
     "3 distinct integer-like targets in 10,000 rows, at most 200"),
    (np.tile([0.5, 1.5, 2.5], 3334)[:10_000], "regression", "not all integer-like"),
    (np.arange(10_000) % 200, "classification", "200 distinct"),
    (np.arange(10_000) % 201, "regression", "201 distinct values in 10,000 rows, more than 200"),
    (np.arange(100_000) % 1001, "regression", "more than 1000"),
    (np.array(["a", "b"] * 5), "classification", "text labels"),
])
def test_the_auto_rule(y, task, reason):
    chosen, why = choose_task(y)
    assert chosen == task
    assert why.startswith(f"{task} (auto: ") and reason in why


def test_an_explicit_task_is_kept_and_text_cannot_regress():
    assert choose_task(np.arange(5.0), "classification") == ("classification",
                                                             "classification (as asked)")
    with pytest.raises(DataError, match="regression needs numeric targets"):
        choose_task(np.array(["a", "b"]), "regression")


def test_auto_says_which_task_it_chose(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((10_000, 3))
    y = (X[:, 0] > 0).astype(np.float64) + (X[:, 1] > 1)          # 0.0, 1.0, 2.0
    np.savez(tmp_path / "three.npz", X=X, y=y)
    assert main(["train", "--data", str(tmp_path / "three.npz"), "--epochs", "1", "--depth",
                 "2", "--width", "8", "--batch-size", "256", "--json"]) == 0
    out = capsys.readouterr().out
    assert "task: classification (auto: 3 distinct integer-like targets in 10,000 rows, " \
           "at most 200)" in out
    assert "3 classes" in out and json.loads(out.splitlines()[-1])["task"] == "classification"


def _regression_csv(tmp_path, rows=400, offset=1000.0, scale=50.0):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((rows, 3))
    y = offset + scale * (X[:, 0] - 0.5 * X[:, 1]) + rng.standard_normal(rows) * 0.01 * scale
    path = tmp_path / "reg.csv"
    with open(path, "w") as f:
        f.write("a,b,c,price\n")
        for row, value in zip(X, y):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{value:.6f}\n")
    return path


@pytest.mark.parametrize("extra", [[], ["--no-scale-target", "--lr", "0.05"]])
def test_regression_reports_rmse_and_r2_in_the_targets_units(tmp_path, capsys, extra):
    path = _regression_csv(tmp_path, offset=0.0 if extra else 1000.0,
                           scale=1.0 if extra else 50.0)
    assert main(["train", "--data", str(path), "--epochs", "60", "--depth", "2", "--width",
                 "16", "--batch-size", "16", "--json"] + extra) == 0
    out = capsys.readouterr().out
    results = json.loads(out.splitlines()[-1])
    assert "regression (auto: the targets are not all integer-like)" in out
    assert ("target as it is" if extra else "target standardised") in out
    assert results["task"] == "regression" and "test_accuracy" not in results
    assert results["test_r2"] > 0.95
    # The RMSE is in the target's units: about 50x larger with the scaled-up target.
    assert 0 < results["test_rmse"] < (0.25 * 50 if not extra else 0.25)
    assert "test RMSE" in out and "R^2" in out


def test_regression_metrics_by_hand():
    m = regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    assert m["mse"] == pytest.approx(4 / 3) and m["rmse"] == pytest.approx((4 / 3) ** 0.5)
    assert m["r2"] == pytest.approx(1 - 4 / 2)          # total sum of squares 2
    assert regression_metrics([2.0, 2.0], [2.0, 2.0])["r2"] == 1.0


def test_the_diabetes_example_is_a_regression(capsys):
    pytest.importorskip("sklearn")
    assert main(["train", "--example", "diabetes", "--epochs", "20", "--depth", "3",
                 "--width", "64", "--json"]) == 0
    out = capsys.readouterr().out
    results = json.loads(out.splitlines()[-1])
    assert "diabetes (scikit-learn's bundled copy, 442 patients): 354 train / 88 test rows, " \
           "10 features, target standardised" in out
    assert results["task"] == "regression" and results["test_r2"] > 0.2


def test_the_diabetes_example_without_scikit_learn_names_the_extra(capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit) as info:
        main(["train", "--example", "diabetes", "--epochs", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'ckpt-cpu[sklearn]'" in err


def test_example_and_data_exclude_each_other(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", X=np.zeros((4, 2)), y=np.arange(4))
    with pytest.raises(SystemExit) as info:
        main(["train", "--example", "digits", "--data", str(tmp_path / "d.npz")])
    assert info.value.code == 2
    assert "--example trains on a bundled data set: leave out --data" in capsys.readouterr().err
