"""save/load: exact round trips, atomic replacement, and refusal of mismatched files."""
import json
import os
import zipfile

import numpy as np
import pytest

import ckpt
from ckpt import io
from ckpt.io import ModelFileError
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


# ---------------------------------------------------------------- malformed files

def _crafted(path, meta=None, **arrays):
    """An .npz with the given arrays and metadata (a JSON-able object or a raw string)."""
    if meta is not None:
        arrays[io._META] = np.array(meta if isinstance(meta, str) else json.dumps(meta))
    np.savez(path, **arrays)
    return path


def _refused(path, model, optimizer=None, match=""):
    """load raises ModelFileError naming the file, and changes nothing."""
    before = _snapshot(model)
    state = optimizer.state_dict() if optimizer is not None else None
    with pytest.raises(ModelFileError, match=match) as info:
        io.load(path, model, optimizer)
    assert str(path) in str(info.value)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.params()))
    if optimizer is not None:
        assert optimizer.state_dict()["step"] == state["step"]
    return info.value


def test_model_file_error_is_the_documented_value_error():
    assert ckpt.ModelFileError is ModelFileError
    assert issubclass(ModelFileError, ValueError)
    assert "ModelFileError" in ckpt.__all__


@pytest.mark.parametrize("cut", [0.5, 0.95, 30])
def test_a_truncated_file_is_a_model_file_error(tmp_path, cut):
    model, opt = _trained()
    io.save(tmp_path / "m.npz", model, opt)
    data = (tmp_path / "m.npz").read_bytes()
    size = int(len(data) * cut) if cut < 1 else cut
    (tmp_path / "t.npz").write_bytes(data[:size])
    other, other_opt = _trained(seed=1)
    _refused(tmp_path / "t.npz", other, other_opt, "corrupt or truncated")


def test_a_corrupted_array_is_a_model_file_error(tmp_path):
    model, _ = _trained()
    io.save(tmp_path / "m.npz", model)
    data = bytearray((tmp_path / "m.npz").read_bytes())
    # Inside the first array's values: past its name in the zip entry and its .npy header.
    offset = data.index(b"param_0.npy") + len("param_0.npy") + 128 + 16
    data[offset:offset + 8] = b"\xff" * 8
    (tmp_path / "m.npz").write_bytes(bytes(data))
    _refused(tmp_path / "m.npz", _trained(seed=1)[0], match="corrupt or truncated.*CRC")


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, bytes(range(256)) * 40,
                                     b"\x80\x04\x95 pickle-like"])
def test_random_bytes_say_so_without_mentioning_pickles(tmp_path, content):
    (tmp_path / "r.npz").write_bytes(content)
    error = _refused(tmp_path / "r.npz", _trained()[0], match="not a ckpt model file")
    assert "pickle" not in str(error)


def test_a_plain_npy_file_is_not_a_model_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3))
    _refused(tmp_path / "x.npy", _trained()[0], match="not an .npz archive")


@pytest.mark.parametrize("meta, match", [
    ("[1, 2]", "metadata must be a JSON object, got list"),
    ("42", "metadata must be a JSON object, got int"),
    ("{not json", "corrupt metadata"),
    ("[" * 100000 + "]" * 100000, "corrupt metadata"),
    ({"format": 99, "params": 6}, r"written by a newer ckpt \(model format 99; this ckpt .* reads "
                                  r"formats up to 2\): upgrade ckpt"),
    ({"format": 0, "params": 6}, "unsupported format 0"),
    ({"format": 1, "params": 10**15}, "holds 1000000000000000 parameter arrays"),
    ({"format": 1, "params": "6"}, "holds '6' parameter arrays"),
])
def test_bad_metadata_is_a_model_file_error(tmp_path, meta, match):
    model, _ = _trained()
    arrays = {f"param_{i}": p for i, p in enumerate(model.params())}
    _refused(_crafted(tmp_path / "m.npz", meta, **arrays), _trained(seed=1)[0], match=match)


def test_huge_counts_and_shapes_are_refused_before_allocating(tmp_path):
    model, opt = _trained()
    params = {f"param_{i}": p for i, p in enumerate(model.params())}
    meta = {"format": 1, "params": 6,
            "optimizer": {"type": "Adam", "hyperparameters": opt.hyperparameters, "step": 1,
                          "buffers": {"exp_avg": 10**12, "exp_avg_sq": 10**12}}}
    _refused(_crafted(tmp_path / "a.npz", meta, **params), model, opt,
             match="optimizer buffer exp_avg has 1000000000000 arrays for 6 parameters")
    # A member whose header claims 2**40 values (4 TiB) while holding 32.
    io.save(tmp_path / "b.npz", model)
    _rewrite_header(tmp_path / "b.npz", b"'shape': (4, 8), }", b"'shape': (1099511627776,), }")
    _refused(tmp_path / "b.npz", model, match=r"parameter 0 has shape \(4, 8\) in the model but "
                                              r"\(1099511627776,\) in the file")
    # A header that agrees with the model over a member holding half the values.
    params["param_0"] = np.zeros((2, 8), np.float32)
    path = _crafted(tmp_path / "c.npz", {"format": 1, "params": 6}, **params)
    _rewrite_header(path, b"'shape': (2, 8), }", b"'shape': (4, 8), }")
    _refused(path, model, match=r"array param_0 should take 256 bytes for shape \(4, 8\) "
                                r"float32, but takes 192")


def _rewrite_header(path, old, new):
    """Replace text in the .npy headers inside an .npz, as a crafted file would (valid CRCs)."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            end = data.index(b"\n")          # the end of the header, padded with spaces
            data = data[:end].replace(old, new).ljust(end) + data[end:]
            archive.writestr(name, data)


def test_shapes_are_checked_against_the_model_from_the_headers(tmp_path):
    model, _ = _trained()
    params = {f"param_{i}": p for i, p in enumerate(model.params())}
    params["param_0"] = np.zeros((4, 8), np.float32)
    path = _crafted(tmp_path / "m.npz", {"format": 1, "params": 6}, **params)
    _rewrite_header(path, b"'shape': (4, 8), }", b"'shape': (4, 9), }")
    _refused(path, _trained(seed=1)[0], match=r"parameter 0 has shape \(4, 8\) in the model but "
                                              r"\(4, 9\) in the file")


@pytest.mark.parametrize("value, match", [
    (1e300, "parameter 0 holds values too large for float32"),
    (np.nan, "parameter 0 holds NaN or infinite values"),
    (-np.inf, "parameter 0 holds NaN or infinite values"),
])
def test_values_overflowing_the_dtype_or_not_finite_are_refused(tmp_path, value, match):
    model, _ = _trained(dtype=np.float64)
    model.params()[0][1, 2] = value
    io.save(tmp_path / "m.npz", model)
    _refused(tmp_path / "m.npz", _trained(seed=1, dtype=np.float32)[0], match=match)


def test_a_step_count_beyond_64_bits_is_refused(tmp_path):
    model, opt = _trained()
    params = {f"param_{i}": p for i, p in enumerate(model.params())}
    state = opt.state_dict()
    arrays = {f"optimizer_{name}_{i}": b for name, bufs in state["buffers"].items()
              for i, b in enumerate(bufs)}
    meta = {"format": 1, "params": 6,
            "optimizer": {"type": "Adam", "hyperparameters": opt.hyperparameters, "step": 10**30,
                          "buffers": {"exp_avg": 6, "exp_avg_sq": 6}}}
    _refused(_crafted(tmp_path / "m.npz", meta, **params, **arrays), model, opt,
             match=r"step count must be an integer in \[0, 2\*\*63\)")


def test_non_finite_optimizer_state_is_refused(tmp_path):
    model, opt = _trained()
    opt._buffers["exp_avg_sq"][2][0] = np.inf
    io.save(tmp_path / "m.npz", model, opt)
    other, other_opt = _trained(seed=1)
    _refused(tmp_path / "m.npz", other, other_opt, match="exp_avg_sq buffer 2 holds NaN")


# ---------------------------------------------------------------- temporary files, paths, fsync

def _a_pid_no_process_has():
    """A pid above the kernel's pid_max: no process can have it (no subprocess needed)."""
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read()) + 1
    except OSError:
        return 2**22 + 1        # Linux's largest pid_max: above any pid


def test_stale_temporaries_of_dead_saves_are_removed_and_live_ones_kept(tmp_path):
    dead_pid = _a_pid_no_process_has()
    stale = tmp_path / f".m.npz.ckpt-save-{dead_pid}-abc123.tmp"
    live = tmp_path / f".m.npz.ckpt-save-{os.getppid()}-def456.tmp"
    other = tmp_path / f".other.npz.ckpt-save-{dead_pid}-abc123.tmp"
    for f in (stale, live, other):
        f.write_bytes(b"half a save")
    model, _ = _trained()
    io.save(tmp_path / "m.npz", model)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.npz", live.name, other.name])


def test_the_temporary_file_is_named_after_the_destination(tmp_path, monkeypatch):
    seen = []

    def spy(file, **arrays):
        seen.extend(os.listdir(tmp_path))
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", spy)
    with pytest.raises(KeyboardInterrupt):
        io.save(tmp_path / "m.npz", _trained()[0])
    assert seen[0].startswith(f".m.npz.ckpt-save-{os.getpid()}-") and seen[0].endswith(".tmp")


def test_save_errors_name_the_requested_path(tmp_path):
    model, _ = _trained()
    target = tmp_path / "missing" / "m.npz"
    with pytest.raises(FileNotFoundError) as info:
        io.save(target, model)
    assert info.value.filename == str(target)
    with pytest.raises(IsADirectoryError) as info:
        io.save(tmp_path, model)
    assert info.value.filename == str(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        io.check_save_path(target)
    assert info.value.filename == str(target)
    io.check_save_path(tmp_path / "ok.npz")
    assert os.listdir(tmp_path) == []


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    import stat
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"),
                                                     real_replace(a, b))[1])
    io.save(tmp_path / "m.npz", _trained()[0])
    assert events == ["file", "replace", "dir"]
