"""Resume after a crash: a run killed (SIGKILL) in the middle of an epoch, between epochs and
in the middle of a state write, resumed each time, ends with the parameters of a run that was
never stopped, bit for bit; a corrupt newest state falls back to the one before."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt.cli import main
from ckpt.resume import HALT_VARIABLE, StateFolder

PACKAGE_ROOT = str(Path(ckpt.__file__).resolve().parent.parent)
WORKER = str(Path(__file__).with_name("resume_worker.py"))
# The digits, 1,438 training rows at batch 32: 45 steps an epoch.
BASE = ["train", "--epochs", "3", "--depth", "3", "--width", "16", "--dtype", "float64",
        "--threads", "1"]
CONFIGS = {
    "sgd": ["--optimizer", "sgd", "--lr", "0.02"],
    "adam": ["--optimizer", "adam", "--lr-schedule", "cosine", "--warmup", "0.1"],
    "dropout": ["--optimizer", "adam", "--dropout", "0.2", "--val-fraction", "0.1",
                "--early-stopping", "5"],
}


def _run(when, argv, env=None):
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env or {}))
    return subprocess.run([sys.executable, WORKER, when, "--"] + argv, capture_output=True,
                          text=True, env=env, timeout=120)


def _newest(states):
    """The step count of the newest state file."""
    return max(int(name.split("-")[2].split(".")[0]) for name in os.listdir(states)
               if name.endswith(".npz"))


def _resumed_at(out):
    match = re.search(r"resumed +from .*: epoch (\d+) done, (\d+) steps into the next", out)
    assert match, out
    return int(match.group(1)), int(match.group(2))


def _arrays(path):
    with np.load(path) as f:
        return {key: f[key] for key in f.files if key != "ckpt_meta"}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_killed_three_times_and_resumed_equals_the_uninterrupted_run(tmp_path, config):
    argv = BASE + CONFIGS[config]
    states = str(tmp_path / "states")
    reference = _run("none", argv + ["--save", str(tmp_path / "ref.npz")])
    assert reference.returncode == 0, reference.stderr

    # 1. Mid-epoch: killed at step 60 (in epoch 2); states every 7 steps and at epoch ends.
    first = _run("step:60", argv + ["--checkpoint-dir", states, "--checkpoint-steps", "7"])
    assert first.returncode == -9, first.stderr
    per_epoch = -(-int(re.search(r"(\d+) train /", first.stdout).group(1)) // 32)
    assert per_epoch < 60 < 2 * per_epoch
    assert _newest(states) == 56
    resume = argv + ["--resume", states, "--checkpoint-steps", "7"]
    # 2. Between epochs: killed right after the state at the end of epoch 2 is written.
    second = _run("epoch:2", resume)
    assert second.returncode == -9, second.stderr
    assert _resumed_at(second.stdout) == divmod(56, per_epoch)
    assert _newest(states) == 2 * per_epoch
    # 3. In the middle of a state write: the resumed run's second.
    third = _run("none", resume, env={HALT_VARIABLE: "2"})
    assert third.returncode == -9, third.stderr
    assert _resumed_at(third.stdout) == (2, 0)
    written = _newest(states)
    assert written > 2 * per_epoch                                  # the first write made it
    assert any(name.endswith(".tmp") for name in os.listdir(states))     # the second: half
    # 4. To the end, from the last whole state.
    last = _run("none", resume + ["--save", str(tmp_path / "final.npz")])
    assert last.returncode == 0, last.stderr
    assert _resumed_at(last.stdout) == divmod(written, per_epoch)
    ref, final = _arrays(tmp_path / "ref.npz"), _arrays(tmp_path / "final.npz")
    assert ref.keys() == final.keys() and len(ref) > 6
    for key in ref:
        np.testing.assert_array_equal(final[key], ref[key], err_msg=key)
    names = sorted(os.listdir(states))
    assert len(names) == 2 and not any(name.endswith(".tmp") for name in names)


def test_a_corrupt_newest_state_falls_back_to_the_one_before(tmp_path, capsys):
    argv = BASE + ["--epochs", "2"]
    states = tmp_path / "states"
    assert main(argv + ["--epochs", "1", "--checkpoint-dir", str(states)]) == 0
    assert main(argv + ["--resume", str(states), "--save", str(tmp_path / "a.npz")]) == 0
    newest = StateFolder(states, resume=True).files()[-1]
    data = Path(newest).read_bytes()
    Path(newest).write_bytes(data[:len(data) // 2])                   # truncated
    capsys.readouterr()
    assert main(argv + ["--resume", str(states), "--save", str(tmp_path / "b.npz")]) == 0
    out = capsys.readouterr().out
    assert "epoch 1 done" in out and "skipped" in out and "unreadable" in out
    a, b = _arrays(tmp_path / "a.npz"), _arrays(tmp_path / "b.npz")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert os.path.exists(newest + ".unreadable")                     # set aside, not deleted


def test_a_flipped_byte_fails_the_checksum(tmp_path):
    assert main(BASE + ["--epochs", "1", "--checkpoint-dir", str(tmp_path)]) == 0
    path = StateFolder(tmp_path, resume=True).files()[-1]
    state = StateFolder(tmp_path, resume=True).resume_from
    arrays = state.arrays()
    arrays["param_0"] = arrays["param_0"].copy()
    arrays["param_0"].flat[0] += 1.0                                 # same size, other bits
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="fails its checksum"):
        StateFolder(tmp_path, resume=True)


def _one_line_exit(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_resuming_another_run_is_refused_with_the_differences(tmp_path, capsys):
    states = str(tmp_path / "states")
    assert main(BASE + ["--epochs", "1", "--checkpoint-dir", states]) == 0
    before = sorted(os.listdir(states))
    capsys.readouterr()
    err = _one_line_exit(capsys, BASE + ["--width", "32", "--lr", "0.01", "--resume", states])
    assert "the state is of another run: --lr 0.01 (the state's: None); --width 32 " \
           "(the state's: 16)" in err
    err = _one_line_exit(capsys, BASE + ["--resume", states, "--threads", "2"])
    assert "the state was trained with --threads 1" in err
    err = _one_line_exit(capsys, BASE + ["--checkpoint-dir", states])
    assert "already holds the states of a run" in err
    err = _one_line_exit(capsys, BASE + ["--resume", str(tmp_path / "none")])
    assert "holds no training state" in err
    err = _one_line_exit(capsys, BASE + ["--checkpoint-steps", "5"])
    assert "--checkpoint-steps needs --checkpoint-dir or --resume" in err
    assert sorted(os.listdir(states)) == before
    assert not (tmp_path / "none").exists()


def _fit_batchnorm(folder=None, stop_at=None, resume=False):
    """fit a Dense -> BatchNorm -> ReLU chain (dropout, validation, early stopping bookkeeping)
    with states every 3 steps, stopped by an exception after ``stop_at`` steps."""
    rng = np.random.default_rng(0)
    X, X_val = rng.standard_normal((100, 4)), rng.standard_normal((40, 4))
    y, y_val = (X[:, 0] > 0).astype(int), (X_val[:, 0] > 0).astype(int)
    model = ckpt.SegmentCheckpointer(ckpt.build_mlp(4, 3, 8, 2, "relu", np.float64, seed=1,
                                                    norm="batch", dropout=0.1), seed=5)
    state = StateFolder(folder, resume=resume, every_steps=3) if folder else None
    steps = [0]

    def step(info):
        steps[0] += 1
        if steps[0] == stop_at:
            raise KeyboardInterrupt
    ckpt.fit(model, X, y, optimizer=ckpt.Adam(model, 0.01), epochs=4, batch_size=16,
             seed=np.random.default_rng(2), run_state=state, step_callback=step,
             validation_data=(X_val, y_val), early_stopping=10)
    norms = [layer for layer in model.layers if hasattr(layer, "running_mean")]
    assert len(norms) == 2
    return ([p.copy() for p in model.params()]
            + [np.array(v) for layer in norms for v in layer.buffers().values()])


def test_batchnorm_buffers_are_part_of_the_state(tmp_path):
    reference = _fit_batchnorm()
    with pytest.raises(KeyboardInterrupt):
        _fit_batchnorm(tmp_path, stop_at=10)                  # epoch 2, after step 9's state
    resumed = _fit_batchnorm(tmp_path, resume=True)
    assert len(resumed) == len(reference)
    for a, b in zip(resumed, reference):
        np.testing.assert_array_equal(a, b)
    assert int(reference[-1]) > 0                             # num_batches_tracked counted
