"""Data-parallel training (ckpt.distributed): sharding, launcher detection, memory maps, and
2-rank runs under ``mpiexec -n 2`` (MPICH from pip in CI) against one process at twice the batch.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import Adam, build_mlp, distributed, fit
from ckpt.checkpoint import SegmentCheckpointer
from ckpt.distributed import World, detect_world, open_rows, shard_batches

WORKER = str(Path(__file__).with_name("mpi_worker.py"))
TIMEOUT = 60


# ------------------------------------------------------------------------------------ sharding

@pytest.mark.parametrize("n, batch_size, size", [(97, 8, 2), (100, 5, 4), (3, 4, 2), (16, 8, 2),
                                                 (1, 1, 3), (50, 7, 3)])
def test_shards_cover_every_row_once_and_make_up_the_single_process_batches(n, batch_size, size):
    order = np.random.default_rng(n).permutation(n)
    shards = [shard_batches(order, batch_size, size, rank) for rank in range(size)]
    single = shard_batches(order, size * batch_size)
    assert all(len(s) == len(single) for s in shards)
    for step, (rows, offset, global_rows) in enumerate(single):
        assert offset == 0 and global_rows == len(rows)
        parts = [shards[rank][step] for rank in range(size)]
        # The ranks' slices, in rank order, are exactly the single-process batch.
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), rows)
        assert [p[1] for p in parts] == list(np.cumsum([0] + [len(p[0]) for p in parts[:-1]]))
        assert all(p[2] == global_rows for p in parts)
        assert all(len(p[0]) <= batch_size for p in parts)
    every = np.concatenate([rows for s in shards for rows, _, _ in s])
    np.testing.assert_array_equal(np.sort(every), np.arange(n))


def test_a_short_last_batch_leaves_a_rank_without_rows():
    last = [shard_batches(np.arange(17), 8, 2, rank)[-1] for rank in (0, 1)]
    assert [len(rows) for rows, _, _ in last] == [0, 1]
    assert last[1][1] == 0 and last[1][2] == 1


@pytest.mark.parametrize("rank", [-1, 2, 1.0, True])
def test_shard_rejects_a_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be"):
        shard_batches(np.arange(10), 2, 2, rank)


# ------------------------------------------------------------------------------------ launcher

@pytest.mark.parametrize("env, world", [
    ({}, None),
    ({"PMI_SIZE": "4", "PMI_RANK": "3", "MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "1"},
     World(4, 3, 2, 1)),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, World(2, 0, 2, 0)),
    ({"PMI_SIZE": "2", "PMI_RANK": "0"}, World(2, 0, None, None)),
    ({"PMI_SIZE": "2", "PMI_RANK": "5"}, None),
    ({"PMI_SIZE": "two", "PMI_RANK": "0"}, None),
])
def test_detect_world_reads_the_launcher_environment(env, world):
    assert detect_world(env) == world


def test_default_threads_divide_the_cores_among_the_local_ranks():
    assert distributed.default_threads(World(4, 0, 2, 0), cores=8) == 4
    assert distributed.default_threads(World(4, 0, None, None), cores=8) == 2
    assert distributed.default_threads(World(4, 0, 4, 0), cores=2) == 1


# ------------------------------------------------------------------------------------ data

def test_open_rows_maps_an_uncompressed_npz_and_an_npy(tmp_path):
    X = np.arange(60, dtype=np.float32).reshape(20, 3)
    y = np.arange(20) % 3
    np.savez(tmp_path / "d.npz", X=X, y=y)
    np.save(tmp_path / "x.npy", np.asfortranarray(X))
    arrays = open_rows(tmp_path / "d.npz")
    assert isinstance(arrays["X"], np.memmap) and not arrays["X"].flags.writeable
    np.testing.assert_array_equal(arrays["X"], X)
    np.testing.assert_array_equal(arrays["y"], y)
    np.testing.assert_array_equal(open_rows(tmp_path / "x.npy")["X"], X)


def test_open_rows_refuses_a_compressed_npz(tmp_path):
    np.savez_compressed(tmp_path / "c.npz", X=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="'X' is compressed"):
        open_rows(tmp_path / "c.npz")
    with pytest.raises(ValueError, match="expected an .npy or .npz"):
        open_rows(tmp_path / "data.csv")


def test_fit_keeps_a_memory_map_of_the_model_dtype_unread(tmp_path):
    # fit must not copy the whole memmap up front: it would read data larger than memory.
    from ckpt.inference import check_inputs
    np.savez(tmp_path / "d.npz", X=np.ones((10, 3)), y=np.zeros(10, np.int64))
    arrays = open_rows(tmp_path / "d.npz")
    X, _ = check_inputs(arrays["X"], arrays["y"], np.dtype(np.float64), "cross_entropy")
    assert np.shares_memory(X, arrays["X"])


def test_without_mpi4py_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r"pip install 'ckpt-cpu\[mpi\]'"):
        distributed.import_mpi()


def test_cli_under_a_launcher_without_mpi4py_is_a_usage_error(monkeypatch, capsys):
    from ckpt.cli import main
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--epochs", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "rank 0 of 2" in err and "ckpt-cpu[mpi]" in err


# ------------------------------------------------------------------------------------ one rank

def _mpi():
    pytest.importorskip("mpi4py")
    return distributed.import_mpi()


def test_fit_on_one_rank_equals_plain_fit():
    MPI = _mpi()
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((50, 4)), rng.integers(0, 2, 50)

    def run(comm):
        model = SegmentCheckpointer(build_mlp(4, 3, 8, 2, dtype=np.float64, seed=0))
        history = fit(model, X, y, optimizer=Adam(model), epochs=2, batch_size=7, comm=comm,
                      validation_data=(X[:9], y[:9]))
        return model.params(), history

    (plain, h1), (one, h2) = run(None), run(MPI.COMM_SELF)
    for a, b in zip(plain, one):
        np.testing.assert_array_equal(a, b)
    assert h1["val_loss"] == pytest.approx(h2["val_loss"], rel=1e-12)


def test_check_replicas_passes_and_abort_on_error_reraises_on_one_rank():
    MPI = _mpi()
    model = SegmentCheckpointer(build_mlp(3, 2, 4, 2, dtype=np.float32, seed=0))
    replicas = distributed.DataParallel(MPI.COMM_SELF, model, check_every=1)
    replicas.check_replicas()
    assert isinstance(replicas.checksum(), int)
    with pytest.raises(KeyError):
        with distributed.abort_on_error(MPI.COMM_SELF):
            raise KeyError("x")
    with pytest.raises(TypeError, match="mpi4py communicator"):
        distributed.DataParallel(object(), model)


# ------------------------------------------------------------------------------------ 2 ranks

def _mpiexec():
    _mpi()
    found = Path(sys.executable).with_name("mpiexec")
    path = str(found) if found.exists() else shutil.which("mpiexec")
    if path is None:
        pytest.fail("mpi4py is installed but no mpiexec was found next to Python or on PATH")
    return path


def _env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_LOCAL", "MV2_"))}
    env["OPENBLAS_NUM_THREADS"] = "1"
    return env


def _run(args, ranks=None, timeout=TIMEOUT):
    """Run (under mpiexec -n ranks); on timeout kill the launcher's whole process group."""
    command = ([_mpiexec(), "-n", str(ranks)] if ranks else []) + [sys.executable] + args
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(command)} did not end within {timeout} s")
    done = subprocess.CompletedProcess(command, proc.returncode, out, err)
    return done, time.monotonic() - start


def test_sync_batchnorm_two_ranks_train_as_one_process_at_twice_the_batch(tmp_path):
    """With sync_batchnorm BatchNorm's statistics are the global batch's: 2 ranks x 8 rows are
    1 process x 16, parameters and running statistics alike (96 rows: every rank has 8 rows
    in every step)."""
    common = ["--optimizer", "sgd", "--rows", "96", "--norm", "batch"]
    one, _ = _run([WORKER, "train", str(tmp_path / "one.npz"), "--batch-size", "16"] + common)
    assert one.returncode == 0, one.stderr
    two, _ = _run([WORKER, "train", str(tmp_path / "two.npz"), "--batch-size", "8",
                   "--sync-batchnorm"] + common, ranks=2)
    assert two.returncode == 0, two.stderr
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    keys = [key for key in a.files if key.startswith(("arr_", "norm"))]
    assert any(key.endswith("running_var") for key in keys) and len(keys) > 6
    for key in keys:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-10, atol=1e-12, err_msg=key)
    # Unsynchronised, each rank normalises with its own rows' statistics: another run, but
    # rank 0's running statistics reach every rank after each step.
    three, _ = _run([WORKER, "train", str(tmp_path / "own.npz"), "--batch-size", "8"] + common,
                    ranks=2)
    assert three.returncode == 0, three.stderr
    r0, r1 = np.load(tmp_path / "own.npz.rank0.npz"), np.load(tmp_path / "own.npz.rank1.npz")
    for key in r0.files:
        np.testing.assert_array_equal(r0[key], r1[key], err_msg=key)
    mean = [key for key in r0.files if key.endswith("running_mean")][0]
    assert not np.allclose(r0[mean], a[mean], rtol=1e-6)


def test_sync_batchnorm_needs_mpi():
    model = SegmentCheckpointer(ckpt.build_mlp(4, 2, 6, 2, norm="batch", seed=0))
    X, y = np.ones((8, 4), np.float32), np.zeros(8, int)
    with pytest.raises(ValueError, match="sync_batchnorm needs data-parallel training over MPI"):
        ckpt.fit(model, X, y, sync_batchnorm=True)


@pytest.mark.parametrize("optimizer, accumulation", [("sgd", 2), ("adam", 1)])
def test_two_ranks_train_as_one_process_at_twice_the_batch(tmp_path, optimizer, accumulation):
    """With SGD each rank also splits its rows in two micro-batches: the same step again.
    Dropout is on (mpi_worker.make_model): the masks are those of the single process."""
    from mpi_worker import ROWS, make_data, make_model
    X, y = make_data()
    np.savez(tmp_path / "data.npz", X=X, y=y)   # the 2-rank run memory-maps it
    one, _ = _run([WORKER, "train", str(tmp_path / "one.npz"), "--optimizer", optimizer,
                   "--batch-size", "16"])
    assert one.returncode == 0, one.stderr
    two, _ = _run([WORKER, "train", str(tmp_path / "two.npz"), "--optimizer", optimizer,
                   "--batch-size", "8", "--data", str(tmp_path / "data.npz"),
                   "--accumulation-steps", str(accumulation)], ranks=2)
    assert two.returncode == 0, two.stderr
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    # 97 rows: 7 steps an epoch, the last one of a single row (rank 0 has none); 3 epochs.
    assert 3 * -(-ROWS // 16) >= 20 and ROWS % 16 == 1
    params = [key for key in a.files if key.startswith("arr_")]
    assert len(params) == 6
    for key in params:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-10, atol=1e-12)
    initial = make_model(optimizer)[0].params()[0]
    assert np.abs(a["arr_0"] - initial).max() > 1e-3   # training did move the weights
    for key in ("history_loss", "history_accuracy", "history_val_loss", "history_val_accuracy"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-10)


def test_cli_under_mpiexec_prints_and_saves_on_rank_0_only(tmp_path):
    args = ["-m", "ckpt", "train", "--epochs", "1", "--depth", "2", "--width", "8",
            "--batch-size", "16", "--json", "--save", str(tmp_path / "m.npz")]
    two, _ = _run(args, ranks=2)
    assert two.returncode == 0, two.stderr
    lines = two.stdout.strip().splitlines()
    assert sum(line.startswith("test accuracy") for line in lines) == 1
    assert sum(line.startswith("data:") for line in lines) == 1
    results = json.loads(lines[-1])
    assert results["ranks"] == 2 and results["global_batch_size"] == 32
    assert "data-parallel: 2 ranks x batch 16 = global batch 32" in two.stdout
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"BLAS threads per rank: {threads}" in two.stdout
    assert (tmp_path / "m.npz").exists()
    one, _ = _run(args[:-2] + ["--batch-size", "32"])
    single = json.loads(one.stdout.strip().splitlines()[-1])
    assert single["ranks"] == 1 and single["steps"] == results["steps"]
    assert results["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=0.01)


def test_an_exception_on_one_rank_aborts_the_job_naming_the_rank():
    done, seconds = _run([WORKER, "fail", "raise", "--rank", "1", "--step", "3"], ranks=2)
    assert done.returncode != 0
    assert "error on rank 1 of 2: bad data shard at step 3; aborting all ranks" in done.stderr
    assert done.stderr.count("error on rank") == 1
    assert seconds < 30


def test_a_killed_rank_ends_the_job_within_30_seconds():
    done, seconds = _run([WORKER, "fail", "kill", "--rank", "1", "--step", "3"], ranks=2,
                         timeout=30)
    assert done.returncode != 0
    assert seconds <= 30


def test_diverged_replicas_are_caught_by_the_checksum():
    done, _ = _run([WORKER, "fail", "diverge", "--rank", "1", "--step", "3"], ranks=2)
    assert done.returncode != 0
    assert "the replicas diverged by step 100" in done.stderr


def test_ranks_given_different_data_sets_stop_before_training():
    done, _ = _run([WORKER, "fail", "rows", "--rank", "1"], ranks=2)
    assert done.returncode == 2
    assert "the ranks disagree on the number of rows: rank 0: 97, rank 1: 96" in done.stderr


def test_cli_error_on_every_rank_exits_with_status_2(tmp_path):
    done, seconds = _run(["-m", "ckpt", "train", "--data", str(tmp_path / "missing.npz")],
                         ranks=2)
    assert done.returncode == 2
    assert "ckpt train: error on rank" in done.stderr and "missing.npz" in done.stderr
    assert seconds < 30


def test_scaling_bench_runs(tmp_path):
    _mpiexec()
    out = tmp_path / "scaling.json"
    done, _ = _run([str(Path(__file__).resolve().parent.parent / "bench" / "mpi_scaling.py"),
                    "--quick", "--workloads", "small", "--ranks", "1,2", "--seconds", "0.05",
                    "--json", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## Model at K machines on a 10 Gb/s network" in done.stdout
    results = json.loads(out.read_text())
    assert [(r["workload"], r["ranks"]) for r in results["runs"]] == [("small", 1), ("small", 2)]
    assert [p["bytes"] for p in results["allreduce"]] == [1024, 4096, 16384, 65536]
    assert results["fit"]["bandwidth_Bps"] > 0
    for row in results["model"]:
        assert row["best_k"] >= 1 and row["gradient_bytes"] > 0


def test_two_ranks_killed_and_resumed_equal_the_uninterrupted_run(tmp_path):
    """mpiexec -n 2 ckpt train --checkpoint-dir, SIGKILLed mid-epoch on both ranks and resumed
    under mpiexec -n 2: rank 0 wrote the states, both read them, and the end is bit-equal."""
    worker = str(Path(__file__).with_name("resume_worker.py"))
    train = ["train", "--epochs", "2", "--depth", "3", "--width", "16", "--dtype", "float64",
             "--threads", "1", "--dropout", "0.1", "--batch-size", "16"]
    whole, _ = _run([worker, "none", "--"] + train + ["--save", str(tmp_path / "ref.npz")],
                    ranks=2)
    assert whole.returncode == 0, whole.stderr
    states = str(tmp_path / "states")
    killed, _ = _run([worker, "step:30", "--"] + train + ["--checkpoint-dir", states,
                                                         "--checkpoint-steps", "8"], ranks=2)
    assert killed.returncode != 0
    assert sorted(os.listdir(states))[-1] == "state-000000-000000024.npz"
    resumed, _ = _run([worker, "none", "--"] + train + ["--resume", states,
                                                       "--save", str(tmp_path / "end.npz")],
                      ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 0 done, 24 steps into the next" in resumed.stdout
    with np.load(tmp_path / "ref.npz") as ref, np.load(tmp_path / "end.npz") as end:
        keys = [key for key in ref.files if key != "ckpt_meta"]
        assert len(keys) > 6
        for key in keys:
            np.testing.assert_array_equal(end[key], ref[key], err_msg=key)
