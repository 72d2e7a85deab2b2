"""save/load: exact round trips, atomic replacement, and refusal of mismatched files."""
import os

import numpy as np
import pytest

from ckpt import io
from ckpt.checkpoint import SegmentCheckpointer
from ckpt.optim import SGD, Adam
from ckpt.train import build_mlp


def _trained(seed=0, depth=3, width=8, dtype=np.float32):
    model = SegmentCheckpointer(build_mlp(4, depth, width, 3, "relu", dtype, seed=seed))
    opt = Adam(model, lr=0.01)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        for g in model.gradients():
            g[...] = rng.standard_normal(g.shape)
        opt.step()
    return model, opt


def _snapshot(model):
    return [p.copy() for p in model.params()]


def test_round_trip_is_exact(tmp_path):
    model, opt = _trained(seed=0)
    path = tmp_path / "model.npz"
    io.save(path, model, opt)
    other, other_opt = _trained(seed=1)
    io.load(path, other, other_opt)
    for a, b in zip(model.params(), other.params()):
        np.testing.assert_array_equal(a, b)
    state, loaded = opt.state_dict(), other_opt.state_dict()
    assert loaded["step"] == state["step"] == 3
    assert loaded["hyperparameters"] == state["hyperparameters"]
    for name in state["buffers"]:
        for a, b in zip(state["buffers"][name], loaded["buffers"][name]):
            np.testing.assert_array_equal(a, b)
    assert [f for f in os.listdir(tmp_path)] == ["model.npz"]


def test_parameters_only(tmp_path):
    model, _ = _trained(seed=0)
    io.save(tmp_path / "p.npz", model)
    other, other_opt = _trained(seed=1)
    io.load(tmp_path / "p.npz", other)
    np.testing.assert_array_equal(other.params()[0], model.params()[0])
    before = _snapshot(other)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        io.load(tmp_path / "p.npz", other, other_opt)
    assert all(np.array_equal(a, b) for a, b in zip(before, other.params()))


def test_an_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    model, opt = _trained(seed=0)
    path = tmp_path / "model.npz"
    io.save(path, model, opt)
    old = path.read_bytes()

    def failing_savez(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    changed, changed_opt = _trained(seed=5)
    with pytest.raises(OSError, match="disk full"):
        io.save(path, changed, changed_opt)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["model.npz"]
    monkeypatch.undo()
    fresh, _ = _trained(seed=7)
    io.load(path, fresh)
    np.testing.assert_array_equal(fresh.params()[0], model.params()[0])


def test_keyboard_interrupt_during_save_leaves_no_temp_file(tmp_path, monkeypatch):
    model, _ = _trained()

    def interrupted(file, **arrays):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save(tmp_path / "m.npz", model)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("other_kwargs, match", [
    (dict(depth=4), "holds 6 parameter arrays, but the model has 8"),
    (dict(width=9), r"parameter 0 has shape \(4, 9\) in the model but \(4, 8\) in the file"),
])
def test_mismatched_file_raises_and_leaves_the_model_unchanged(tmp_path, other_kwargs, match):
    model, opt = _trained()
    io.save(tmp_path / "m.npz", model, opt)
    other, other_opt = _trained(seed=3, **other_kwargs)
    before, state = _snapshot(other), other_opt.state_dict()
    with pytest.raises(ValueError, match=match):
        io.load(tmp_path / "m.npz", other, other_opt)
    assert all(np.array_equal(a, b) for a, b in zip(before, other.params()))
    assert other_opt.state_dict()["step"] == state["step"]


def test_wrong_optimizer_type_changes_nothing(tmp_path):
    model, opt = _trained()
    io.save(tmp_path / "m.npz", model, opt)
    other, _ = _trained(seed=2)
    sgd = SGD(other, lr=0.1, momentum=0.9)
    before = _snapshot(other)
    with pytest.raises(ValueError, match="state is of a Adam optimizer, not SGD"):
        io.load(tmp_path / "m.npz", other, sgd)
    assert all(np.array_equal(a, b) for a, b in zip(before, other.params()))


def test_float64_file_loads_into_a_float32_model(tmp_path):
    model, _ = _trained(dtype=np.float64)
    io.save(tmp_path / "m.npz", model)
    other, _ = _trained(seed=2, dtype=np.float32)
    io.load(tmp_path / "m.npz", other)
    np.testing.assert_array_equal(other.params()[0], model.params()[0].astype(np.float32))


def test_not_a_ckpt_file(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    model, _ = _trained()
    with pytest.raises(ValueError, match="not a ckpt model file"):
        io.load(tmp_path / "x.npz", model)
    with pytest.raises(FileNotFoundError):
        io.load(tmp_path / "missing.npz", model)
