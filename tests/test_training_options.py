"""Training as people expect it: validation split, early stopping, learning-rate schedules,
weight decay, the history in --json and --plot."""
import json
import sys

import numpy as np
import pytest

from ckpt import SGD, Adam, build_mlp, cli, fit
from ckpt.checkpoint import SegmentCheckpointer
from ckpt.cli import main
from ckpt.datasets import digits_scaler, digits_table, prepare_training_data
from ckpt.optim.schedules import Constant, Cosine

SMALL = ["train", "--epochs", "4", "--depth", "2", "--width", "16"]


def _problem(seed=0, rows=120):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, 4))
    y = (X[:, 0] - X[:, 1] > 0).astype(np.int64)
    return X, y


def _model(seed=1):
    return SegmentCheckpointer(build_mlp(4, 3, 8, 2, "tanh", np.float64, seed=seed))


# ------------------------------------------------------------------------------------ fit

def test_the_schedule_sets_the_rate_of_every_step():
    X, y = _problem()
    model = _model()
    optimizer = SGD(model, 0.1)
    calls = []

    def schedule(step, total):
        calls.append((step, total))
        return 0.1 / (1 + step)
    fit(model, X, y, optimizer=optimizer, epochs=3, batch_size=32, lr_schedule=schedule)
    assert calls == [(step, 12) for step in range(12)]          # 3 epochs x ceil(120 / 32)
    assert optimizer.lr == 0.1 / 12


def test_a_constant_schedule_changes_no_bit():
    X, y = _problem()
    runs = []
    for schedule in (None, Constant(0.01)):
        model = _model()
        fit(model, X, y, optimizer=Adam(model, 0.01), epochs=2, lr_schedule=schedule)
        runs.append([p.copy() for p in model.params()])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_cosine_ends_lower_than_it_starts():
    X, y = _problem()
    model = _model()
    optimizer = Adam(model, 0.01)
    fit(model, X, y, optimizer=optimizer, epochs=2, lr_schedule=Cosine(0.01, warmup=0.25))
    assert 0 < optimizer.lr < 0.01 * 0.1


def test_early_stopping_restores_the_best_epoch():
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((64, 4)), rng.integers(0, 2, 64)        # noise: it overfits
    X_val, y_val = rng.standard_normal((64, 4)), rng.integers(0, 2, 64)
    model = _model()
    snapshots = []
    history = fit(model, X, y, optimizer=Adam(model, 0.05), epochs=60, batch_size=16,
                  validation_data=(X_val, y_val), early_stopping=3,
                  callback=lambda m: snapshots.append([p.copy() for p in model.params()]))
    val = history["val_loss"]
    best = int(np.argmin(val))
    assert len(val) == best + 1 + 3 < 60          # stopped 3 epochs after the best one
    assert all(v >= val[best] for v in val[best + 1:])
    for kept, saved in zip(model.params(), snapshots[best]):
        np.testing.assert_array_equal(kept, saved)
    assert not np.array_equal(snapshots[-1][0], snapshots[best][0])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"early_stopping": 2}, ValueError, "early_stopping needs validation_data"),
    ({"early_stopping": 0, "validation_data": _problem(3)}, ValueError, "must be positive"),
    ({"lr_schedule": 0.1}, TypeError, "lr_schedule must be callable"),
    ({"lr_schedule": lambda step, total: -1.0}, ValueError, r"lr_schedule\(0, 4\) gave -1.0"),
])
def test_bad_options_are_refused(kwargs, error, match):
    X, y = _problem()
    model = _model()
    before = [p.copy() for p in model.params()]
    with pytest.raises(error, match=match):
        fit(model, X, y, epochs=1, **kwargs)
    if error is TypeError or "early" in match:
        for a, b in zip(model.params(), before):       # refused before any step
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------ data

def test_the_validation_split_is_stratified_and_apart():
    data = prepare_training_data(digits_table(), np.random.default_rng(0), test_fraction=0.2,
                                 val_fraction=0.25, scaler=digits_scaler())
    classes, train_counts = np.unique(data.y_train, return_counts=True)
    _, val_counts = np.unique(data.y_val, return_counts=True)
    kept = train_counts + val_counts
    np.testing.assert_array_equal(val_counts, np.round(0.25 * kept).astype(int))
    assert len(data.X_train) + len(data.X_val) + len(data.X_test) == 1797
    assert not np.shares_memory(data.X_val, data.X_train)


# ------------------------------------------------------------------------------------ the CLI

def _results(out):
    return json.loads(out.strip().splitlines()[-1])


def test_cli_history_validation_and_early_stopping(capsys):
    assert main(SMALL + ["--epochs", "30", "--val-fraction", "0.2", "--early-stopping", "2",
                         "--lr", "0.05", "--lr-schedule", "onecycle", "--json"]) == 0
    out = capsys.readouterr().out
    results = _results(out)
    history = results["history"]
    assert set(history) >= {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"}
    assert history["epoch"] == list(range(1, results["epochs"] + 1))
    assert results["best_epoch"] == 1 + int(np.argmin(history["val_loss"]))
    assert results["val_loss"] == min(history["val_loss"])
    assert "1151 train / 287 validation / 359 test rows" in out     # per-class rounding
    assert "(onecycle schedule)" in out and "early stopping" in out


def test_cli_weight_decay_reaches_the_optimizer(capsys, monkeypatch):
    seen = {}
    real = cli.fit

    def keep(*args, optimizer, **kwargs):
        seen["optimizer"] = optimizer
        return real(*args, optimizer=optimizer, **kwargs)
    monkeypatch.setattr(cli, "fit", keep)
    assert main(SMALL + ["--optimizer", "sgd", "--weight-decay", "0.001"]) == 0
    assert seen["optimizer"].weight_decay == 0.001
    assert "weight decay 0.001" in capsys.readouterr().out


def test_cli_plot_writes_a_png(tmp_path, capsys):
    assert main(SMALL + ["--val-fraction", "0.1", "--plot", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, match", [
    (["--early-stopping", "3"], "--early-stopping watches the validation loss: give "
                                "--val-fraction"),
    (["--warmup", "0.1"], "--warmup needs --lr-schedule cosine or onecycle"),
    (["--val-fraction", "1"], "expected a fraction in (0, 1), got 1"),
    (["--weight-decay", "-1"], "expected a non-negative number"),
    (["--lr-schedule", "step"], "invalid choice: 'step'"),
])
def test_cli_bad_options_are_one_line_exit_2(capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        main(SMALL + argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err


def test_plot_without_matplotlib_names_the_extra_and_writes_nothing(tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(cli, "fit", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(SystemExit) as info:
        main(SMALL + ["--plot", str(tmp_path / "h.png"), "--save", str(tmp_path / "m.npz")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ckpt-cpu[bench]" in err and "matplotlib" in err
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_plot_path_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "fit", lambda *a, **k: pytest.fail("trained before the check"))
    target = tmp_path / "no" / "such" / "h.png"
    with pytest.raises(SystemExit) as info:
        main(SMALL + ["--plot", str(target)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No such file or directory" in err and str(target) in err
