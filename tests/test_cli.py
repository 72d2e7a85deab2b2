"""The ckpt command line: small training runs, --json, data files, and usage errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import io
from ckpt.cli import main
from ckpt.train import build_mlp

SMALL = ["train", "--epochs", "1", "--depth", "3", "--width", "16", "--lr", "0.01"]
# Where the ckpt under test was imported from (the installed package in CI, src/ in a dev tree).
PACKAGE_ROOT = str(Path(ckpt.__file__).resolve().parent.parent)


def _run(capsys, argv):
    assert main(argv) == 0
    out, err = capsys.readouterr()
    return out


def _results(out):
    return json.loads(out.strip().splitlines()[-1])


def test_train_json_last_line(capsys):
    out = _run(capsys, SMALL + ["--json"])
    results = _results(out)
    for key in ("test_accuracy", "seconds", "peak_activation_bytes",
                "peak_activation_bytes_plain"):
        assert key in results
    assert 0.5 < results["test_accuracy"] <= 1
    assert results["checkpoint_every"] == 1        # floor(sqrt(3))
    assert results["peak_activation_bytes"] == results["peak_activation_bytes_plain"]
    assert "test accuracy" in out and "peak activations" in out


def test_checkpointing_lowers_the_peak(capsys):
    results = _results(_run(capsys, ["train", "--epochs", "1", "--depth", "9", "--width", "32",
                                     "--optimizer", "sgd", "--dtype", "float64", "--json"]))
    assert results["checkpoint_every"] == 3
    assert results["peak_activation_bytes"] < results["peak_activation_bytes_plain"]
    assert results["recomputed_layer_forwards_per_step"] == 9 - 3
    assert 0 < results["recompute_flops_fraction"] < 1 / 3


def test_threads_are_restored(capsys):
    threads = ckpt.get_num_threads()
    _run(capsys, SMALL + ["--threads", "2"])
    assert ckpt.get_num_threads() == threads


def test_save_writes_a_loadable_model(capsys, tmp_path):
    path = tmp_path / "digits.npz"
    _run(capsys, SMALL + ["--save", str(path), "--seed", "3"])
    layers = build_mlp(64, 3, 16, 10, "relu", np.float32, seed=0)
    io.load(path, layers)


def _toy(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([3, 7], n // 2)
    X = rng.standard_normal((n, 4)) + 100 * (y[:, None] == 7)   # large offset: standardised
    return X, y


def test_npz_data(capsys, tmp_path):
    X, y = _toy()
    np.savez(tmp_path / "toy.npz", X=X, y=y)
    results = _results(_run(capsys, ["train", "--data", str(tmp_path / "toy.npz"), "--epochs",
                                     "30", "--batch-size", "8", "--lr", "0.01", "--depth", "2",
                                     "--width", "8", "--json", "--task", "classification"]))
    assert results["test_accuracy"] == 1.0


def test_csv_data_with_header(capsys, tmp_path):
    X, y = _toy()
    path = tmp_path / "toy.csv"
    with open(path, "w") as f:
        f.write("a,b,c,d,label\n")
        for row, label in zip(X, y):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{label}\n")
    out = _run(capsys, ["train", "--data", str(path), "--epochs", "30", "--batch-size", "8",
                        "--lr", "0.01", "--depth", "2", "--width", "8", "--json", "--task",
                        "classification"])
    assert "48 train / 12 test rows, 4 features, 2 classes" in out
    assert _results(out)["test_accuracy"] == 1.0


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize("argv, match", [
    (["train", "--epochs", "-1"], "argument --epochs: expected a positive integer, got -1"),
    (["train", "--epochs", "many"], "expected a positive integer, got 'many'"),
    (["train", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["train", "--activation", "swish"], "invalid choice: 'swish'"),
    (["train", "--dtype", "float16"], "invalid choice: 'float16'"),
    (["train", "--lr", "0"], "expected a positive number"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: COMMAND"),
    (["train", "--data", "/nonexistent/data.npz"], "No such file or directory"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1
    assert match in err
    assert "Traceback" not in err + out


@pytest.mark.parametrize("name, content, match", [
    ("bad.csv", "1,2,0\n3,x,1\n", "line 2: feature column '1' holds 'x', not a number"),
    ("ragged.csv", "1,2,0\n3,1\n", "line 2: 2 fields, but the table has 3 columns"),
    ("empty.csv", "a,b,label\n", "holds no data rows (only a header)"),
    ("rows.npz", {"X": np.zeros((5, 2)), "y": np.arange(4)}, "5 rows of features but 4 targets"),
    ("noy.npz", {"X": np.zeros((5, 2))}, "has no array 'y'"),
    ("one.npz", {"X": np.zeros((5, 2)), "y": np.zeros(5, int)}, "need at least 2 classes"),
    ("frac.npz", {"X": np.zeros((4, 2)), "y": np.array([0, 0.5, 1, 1])}, "whole numbers"),
    ("nan.npz", {"X": np.full((4, 2), np.nan), "y": np.array([0, 0, 1, 1])},
     "row 0, column '0' holds nan"),
    ("data.txt", "1,2,0\n", "expected a .csv, .npz, .npy or .parquet file"),
    ("broken.npz", "not a zip", "not a readable .npz file"),
])
def test_bad_data_exit_2_with_one_line(capsys, tmp_path, name, content, match):
    path = _write(tmp_path, name, content)
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", path, "--epochs", "1", "--depth", "2", "--width", "4",
              "--task", "classification"])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1
    assert match in err
    assert "Traceback" not in err


def test_python_m_ckpt(tmp_path):
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "ckpt", "train", "--epochs", "1", "--depth",
                           "2", "--width", "8", "--lr", "0.01", "--json"], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout                  # no progress bar when stdout is a pipe
    assert json.loads(done.stdout.splitlines()[-1])["test_accuracy"] > 0.5
    bad = subprocess.run([sys.executable, "-m", "ckpt", "train", "--epochs", "-3"],
                         capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


# ---------------------------------------------------------------- hardening: the one-line promise

def _one_line_exit(capsys, argv, code=2):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == code
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err + out
    return out, err


def test_a_truncated_npz_is_one_line_exit_2(capsys, tmp_path):
    X, y = _toy()
    np.savez(tmp_path / "full.npz", X=X, y=y)
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    _, err = _one_line_exit(capsys, SMALL + ["--data", str(tmp_path / "cut.npz")])
    assert "is not a readable .npz file" in err


def test_a_width_that_cannot_fit_in_memory_is_one_line_exit_2(capsys):
    _, err = _one_line_exit(capsys, ["train", "--width", "1000000000", "--epochs", "1"])
    assert "needs" in err and "GiB" in err and "of memory is available" in err


def test_a_huge_csv_label_is_refused(capsys, tmp_path):
    path = _write(tmp_path, "huge.csv", "1,2,0\n3,4,1e300\n5,6,0\n7,8,1\n")
    _, err = _one_line_exit(capsys, SMALL + ["--data", path, "--task", "classification"])
    assert "label 1e+300 in row 1 is too large for a class value" in err


def test_too_many_threads_is_one_line_exit_2(capsys):
    before = ckpt.get_num_threads()
    _, err = _one_line_exit(capsys, SMALL + ["--threads", "100000"])
    assert "the number of threads must be at most" in err
    assert ckpt.get_num_threads() == before


def test_an_unwritable_save_path_fails_before_training(capsys, tmp_path, monkeypatch):
    from ckpt import cli

    def no_training(*args, **kwargs):
        raise AssertionError("fit ran before the --save path was checked")
    monkeypatch.setattr(cli, "fit", no_training)
    target = tmp_path / "no" / "such" / "folder" / "m.npz"
    _, err = _one_line_exit(capsys, SMALL + ["--save", str(target)])
    assert "No such file or directory" in err and str(target) in err
    (tmp_path / "adir").mkdir()
    _, err = _one_line_exit(capsys, SMALL + ["--save", str(tmp_path / "adir")])
    assert "Is a directory" in err


def test_ctrl_c_during_training_is_one_line_exit_130(capsys, tmp_path, monkeypatch):
    from ckpt import cli
    real_fit = cli.fit

    def interrupted_fit(*args, callback, **kwargs):
        def on_epoch(metrics):
            callback(metrics)
            if metrics["epoch"] == 2:
                raise KeyboardInterrupt
        return real_fit(*args, callback=on_epoch, **kwargs)
    monkeypatch.setattr(cli, "fit", interrupted_fit)
    target = tmp_path / "m.npz"
    _, err = _one_line_exit(capsys, ["train", "--epochs", "5", "--depth", "3", "--width", "16",
                                     "--save", str(target)], code=130)
    assert err == "ckpt train: interrupted after epoch 2; nothing saved\n"
    assert os.listdir(tmp_path) == []


def test_sigint_to_ckpt_train_exits_130_with_one_line(tmp_path):
    import signal
    import time
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "ckpt", "train", "--epochs", "100000",
                             "--depth", "4", "--width", "32", "--save", str(tmp_path / "m.npz")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    try:
        for line in proc.stdout:
            if line.startswith("model:"):       # printed just before training starts
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("ckpt train: interrupted ") and err.endswith("; nothing saved\n")
    assert not (tmp_path / "m.npz").exists()
    assert [f for f in os.listdir(tmp_path) if "ckpt-save" in f] == []
