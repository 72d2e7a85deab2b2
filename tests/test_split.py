"""Batch-split execution (ckpt.threads): gradients against unsplit steps, run-to-run
determinism, the modes and their rule, exact tracker figures with threads, the budget, fork
safety of the pool, and the cores ckpt may use."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import ckpt
from ckpt import Dense, Dropout, LayerNorm, Residual, SegmentCheckpointer, _core
from ckpt.threads import DEFAULT_MODE, cgroup_cpu_limit, choose_slices, default_num_threads
from ckpt.train import build_mlp

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}


def dense_chain(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [Dense(12, 24, "relu", dtype=dtype, rng=rng),
            Dense(24, 24, "tanh", dtype=dtype, rng=rng), Dense(24, 5, dtype=dtype, rng=rng)]


def layernorm_chain(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [Dense(12, 16, "gelu", dtype=dtype, rng=rng), LayerNorm(16, dtype=dtype),
            Dense(16, 5, dtype=dtype, rng=rng)]


def dropout_chain(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [Dense(12, 16, "relu", dtype=dtype, rng=rng), Dropout(0.4),
            Dense(16, 16, "sigmoid", dtype=dtype, rng=rng), Dropout(0.2),
            Dense(16, 5, dtype=dtype, rng=rng)]


def residual_chain(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [Dense(12, 16, dtype=dtype, rng=rng),
            Residual(LayerNorm(16, dtype=dtype), Dense(16, 20, "gelu", dtype=dtype, rng=rng),
                     Dropout(0.3), Dense(20, 16, dtype=dtype, rng=rng)),
            Residual(Dense(16, 16, "leaky_relu", dtype=dtype, rng=rng),
                     Residual(LayerNorm(16, dtype=dtype), Dropout(0.25))),
            Dense(16, 5, dtype=dtype, rng=rng)]


CHAINS = {"dense": dense_chain, "layernorm": layernorm_chain, "dropout": dropout_chain,
          "residual": residual_chain}


def run_step(make, dtype, mode, *, batch=37, every=2, threads=None, seed=3, tracker=None):
    """One training step from fresh layers; returns output, input gradient, gradients."""
    model = SegmentCheckpointer(make(dtype), every, seed=seed, threads_mode=mode,
                                tracker=tracker)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((batch, 12)).astype(dtype)
    g = rng.standard_normal((batch, 5)).astype(dtype)
    y = model.forward(x).copy()
    gx = model.backward(g)
    return y, gx, [a.copy() for a in model.gradients()], model


@pytest.fixture
def threads(restore_num_threads):
    """Set T (ckpt's thread count) for a test; restored after."""
    def set_threads(n):
        ckpt.set_num_threads(n)
        return n
    return set_threads


@pytest.mark.parametrize("name", sorted(CHAINS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("t", [2, 3])
@pytest.mark.parametrize("every", [1, 2, 0])
def test_split_gradients_equal_unsplit_within_summation_tolerance(name, dtype, t, every,
                                                                  threads):
    threads(t)
    y0, gx0, grads0, _ = run_step(CHAINS[name], dtype, "blas", every=every)
    y1, gx1, grads1, model = run_step(CHAINS[name], dtype, "split", every=every)
    assert model.slices(37) == t
    # Dropout masks are keyed by the global row: the split draws the same masks.
    np.testing.assert_allclose(y1, y0, **TOL[dtype])
    np.testing.assert_allclose(gx1, gx0, **TOL[dtype])
    assert len(grads1) == len(grads0)
    for a, b in zip(grads1, grads0):
        np.testing.assert_allclose(a, b, **TOL[dtype])


def test_split_reduction_order_is_slice_0_then_1_then_2(threads):
    """The gradients of a 3-way split are exactly ((g + slice 0) + slice 1) + slice 2, each
    slice's contribution computed by an unsplit step on its rows (with its row offset)."""
    threads(3)
    dtype, batch = np.float32, 31
    rng = np.random.default_rng(5)
    x = rng.standard_normal((batch, 12)).astype(dtype)
    g = rng.standard_normal((batch, 5)).astype(dtype)
    start = [k * batch // 3 for k in range(4)]
    split = SegmentCheckpointer(dropout_chain(dtype), 1, seed=9, threads_mode="split")
    for p in split.gradients():
        p[...] = 0.5    # gradients accumulate onto what is there
    split.forward(x)
    split.backward(g)
    parts = []
    for k in range(3):
        # The same step seed (same Generator seed), the k-th slice's rows at their global row
        # offset; slice 0 accumulates onto the existing gradients, the others onto zeros.
        one = SegmentCheckpointer(dropout_chain(dtype), 1, seed=9, threads_mode="blas")
        for p in one.gradients():
            p[...] = 0.5 if k == 0 else 0.0
        one.forward(x[start[k]:start[k + 1]], row_offset=start[k])
        one.backward(g[start[k]:start[k + 1]])
        parts.append(one.gradients())
    for i, got in enumerate(split.gradients()):
        expected = (parts[0][i] + parts[1][i]) + parts[2][i]
        assert np.array_equal(got, expected), i


@pytest.mark.parametrize("t", [4, 8, 64])
def test_more_threads_than_cores(t, threads):
    """T = 4, 8 and 64 on a 2-core machine (oversubscribed): every slice runs (a batch smaller
    than T gets one slice per row), the split equals the unsplit step within summation
    tolerance and itself run to run, and the reduction is ((g + slice 0) + slice 1) + ... in
    slice order, each slice's part computed by an unsplit step on its rows."""
    threads(t)
    dtype = np.float64
    for batch in (1, t // 2 + 1, 37):
        y0, gx0, grads0, _ = run_step(residual_chain, dtype, "blas", batch=batch)
        y1, gx1, grads1, model = run_step(residual_chain, dtype, "split", batch=batch)
        assert model.slices(batch) == min(t, batch)
        np.testing.assert_allclose(y1, y0, **TOL[dtype])
        np.testing.assert_allclose(gx1, gx0, **TOL[dtype])
        for a, b in zip(grads1, grads0):
            np.testing.assert_allclose(a, b, **TOL[dtype])
        again = run_step(residual_chain, dtype, "split", batch=batch)
        assert all(np.array_equal(a, b) for a, b in zip(again[2], grads1))
    batch = t + 5
    n = min(t, batch)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((batch, 12)).astype(np.float32)
    g = rng.standard_normal((batch, 5)).astype(np.float32)
    start = [k * batch // n for k in range(n + 1)]
    split = SegmentCheckpointer(dropout_chain(np.float32), 1, seed=9, threads_mode="split")
    split.forward(x)
    split.backward(g, accumulate=False)
    expected = None
    for k in range(n):
        one = SegmentCheckpointer(dropout_chain(np.float32), 1, seed=9, threads_mode="blas")
        one.forward(x[start[k]:start[k + 1]], row_offset=start[k])
        one.backward(g[start[k]:start[k + 1]], accumulate=False)
        part = [p.copy() for p in one.gradients()]
        expected = part if expected is None else [a + b for a, b in zip(expected, part)]
    for i, got in enumerate(split.gradients()):
        assert np.array_equal(got, expected[i]), i
    assert ckpt.get_num_threads() == t


@pytest.mark.parametrize("name", ["dropout", "residual"])
def test_fixed_threads_give_bit_equal_results_over_20_runs(name, threads):
    threads(2)
    first = run_step(CHAINS[name], np.float32, "split", batch=64)
    for _ in range(19):
        again = run_step(CHAINS[name], np.float32, "split", batch=64)
        assert np.array_equal(again[0], first[0]) and np.array_equal(again[1], first[1])
        assert all(np.array_equal(a, b) for a, b in zip(again[2], first[2]))


def test_concurrent_split_steps_in_two_threads_match_sequential_ones(threads):
    """A step that finds the pool busy runs its slices itself: the same results."""
    threads(2)
    expected = run_step(residual_chain, np.float64, "split", batch=48)[2]
    results, errors = [], []

    def work():
        try:
            for _ in range(10):
                results.append(run_step(residual_chain, np.float64, "split", batch=48)[2])
        except Exception as exc:   # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert len(results) == 20
    for grads in results:
        assert all(np.array_equal(a, b) for a, b in zip(grads, expected))
    assert ckpt.get_num_threads() == 2


def test_forced_modes_and_the_context_manager(threads):
    threads(2)
    model = SegmentCheckpointer(dense_chain(np.float32), 1)
    assert model.threads_mode is None
    assert ckpt.get_threading_mode() == DEFAULT_MODE == "tuned"
    assert model.slices(1024) == 1          # tuned is OpenBLAS threading: never splits
    with ckpt.threading_mode("auto"):
        assert model.slices(1024) == 1      # auto's reference, before anything is measured
    with ckpt.threading_mode("blas") as mode:
        assert mode == "blas" and ckpt.get_threading_mode() == "blas"
        assert model.slices(10) == 1
        with ckpt.threading_mode("split"):
            assert model.slices(10) == 2
            assert model.slices(1) == 1     # never more slices than rows
        assert ckpt.get_threading_mode() == "blas"
    assert ckpt.get_threading_mode() == DEFAULT_MODE
    # A checkpointer's own mode wins over the context.
    fixed = SegmentCheckpointer(dense_chain(np.float32), 1, threads_mode="blas")
    with ckpt.threading_mode("split"):
        assert fixed.slices(10) == 1
    threads(1)
    with ckpt.threading_mode("split"):
        assert model.slices(10) == 1        # T = 1: nothing to split
    threads(3)
    with ckpt.threading_mode("split"):
        assert model.slices(2) == 2 and model.slices(3) == 3
        y, gx, grads, _ = run_step(dense_chain, np.float64, None, batch=2)
    ref = run_step(dense_chain, np.float64, "blas", batch=2)
    for a, b in zip(grads, ref[2]):
        np.testing.assert_allclose(a, b, **TOL[np.float64])


def test_a_python_path_chain_never_splits(threads):
    threads(2)

    class Scale(Dense):     # a subclass: not a kind the compiled executor runs
        pass

    model = SegmentCheckpointer([Scale(4, 4, dtype=np.float64, rng=0)], 1, threads_mode="split")
    assert model.executor == "python" and model.slices(16) == 1


def test_the_fixed_rule():
    assert choose_slices("split", 8, 3) == 3
    assert choose_slices("split", 64, 1000) == 64
    assert choose_slices("split", 8, 0) == 1
    assert choose_slices("blas", 8, 300) == 1
    with pytest.raises(ValueError, match="fixed mode"):
        choose_slices("tuned", 8, 300)


@pytest.mark.parametrize("bad, error", [("threads", ValueError), ("", ValueError),
                                        (2, TypeError), (None, TypeError)])
def test_bad_modes_are_refused(bad, error):
    with pytest.raises(error, match="mode"):
        with ckpt.threading_mode(bad):
            pass
    if bad is not None:
        with pytest.raises(error, match="threads_mode"):
            SegmentCheckpointer(dense_chain(np.float32), 1, threads_mode=bad)
    assert ckpt.get_threading_mode() == DEFAULT_MODE


def test_bad_slice_count_changes_nothing():
    model = SegmentCheckpointer(dense_chain(np.float64), 1, threads_mode="blas")
    chain = model._typed_chain()
    compiled = model.schedule(4)
    x = np.zeros((4, 12))
    y = np.zeros((4, 5))
    arena = np.zeros(compiled.arena_units * 4)
    with pytest.raises(ValueError, match="slices must be at least 1, got 0"):
        chain.run_forward(compiled.forward_rows, x, y, arena, None, 0, 0, True, 0)
    assert chain.n_slices == 1 and not y.any()


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("t", [2, 3])
def test_tracker_figures_are_exact_with_threads(every, t, threads):
    """The slices are counted in lock step (the whole batch per event), so every figure is the
    unsplit one, except the T - 1 gradient copies held during backward."""
    threads(t)
    blas = ckpt.MemoryUsageTracker()
    split = ckpt.MemoryUsageTracker()
    _, _, grads, model_b = run_step(residual_chain, np.float32, "blas", every=every,
                                    tracker=blas, batch=40)
    _, _, _, model_s = run_step(residual_chain, np.float32, "split", every=every,
                                tracker=split, batch=40)
    copies = (t - 1) * sum(g.nbytes for g in grads)
    assert model_s.gradient_workspace_bytes(40) - model_b.gradient_workspace_bytes(40) == copies
    assert model_s.gradient_workspace_bytes(40, slices=1) == model_b.gradient_workspace_bytes(40)
    assert split.stored_activation_bytes == blas.stored_activation_bytes == 0
    assert split.gradient_bytes == blas.gradient_bytes == 0
    assert split.recomputed_bytes == blas.recomputed_bytes
    # The forward alone peaks the same; the backward adds the copies on top.
    fwd_b, fwd_s = ckpt.MemoryUsageTracker(), ckpt.MemoryUsageTracker()
    for tracker, mode in ((fwd_b, "blas"), (fwd_s, "split")):
        m = SegmentCheckpointer(residual_chain(np.float32), every, seed=3, threads_mode=mode,
                                tracker=tracker)
        m.forward(np.ones((40, 12), np.float32))
        assert tracker.stored_activation_bytes == m._held_after_forward(40) * 4
    assert fwd_s.peak_bytes == fwd_b.peak_bytes
    backward_peak = blas.peak_bytes     # the backward dominates here (gradient buffers on top)
    assert backward_peak > fwd_b.peak_bytes
    assert split.peak_bytes == backward_peak + copies


def test_budget_covers_the_gradient_copies(threads):
    threads(2)
    batch = 8
    rng = np.random.default_rng(2)
    x = rng.standard_normal((batch, 16)).astype(np.float32)
    g = rng.standard_normal((batch, 10)).astype(np.float32)
    layers = build_mlp(16, 21, 64, 10, "tanh", np.float32, seed=0)
    param_bytes = sum(p.nbytes for layer in layers for p in layer.params())
    budget = param_bytes + 24 * 1024
    model = SegmentCheckpointer(layers, budget_bytes=budget, threads_mode="split")
    assert model.slices(batch) == 2
    model.forward(x)
    model.backward(g)
    assert model.memory_tracker.peak_bytes <= budget
    assert model.memory_tracker.peak_bytes > param_bytes    # the copies were counted
    with pytest.raises(ValueError, match="gradient buffers"):
        SegmentCheckpointer(build_mlp(16, 21, 64, 10, "tanh", np.float32, seed=0),
                            budget_bytes=param_bytes, threads_mode="split").forward(x)


def _wait(pid, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the forked child did not finish in {seconds} s (pool hang?)")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_can_still_train(threads):
    threads(2)
    expected = run_step(residual_chain, np.float64, "split", batch=32)[2]
    assert _core.pool_workers() >= 1        # the parent's pool has started its worker
    pid = os.fork()
    if pid == 0:    # the child: its own pool, started on demand
        code = 1
        try:
            fresh = _core.pool_workers() == 0
            got = run_step(residual_chain, np.float64, "split", batch=32)[2]
            same = all(np.array_equal(a, b) for a, b in zip(got, expected))
            code = 0 if fresh and same and _core.pool_workers() >= 1 else 3
        finally:
            os._exit(code)
    assert _wait(pid, 60) == 0
    # and the parent's pool still works
    again = run_step(residual_chain, np.float64, "split", batch=32)[2]
    assert all(np.array_equal(a, b) for a, b in zip(again, expected))


def test_num_threads_is_restored_after_split_steps(threads):
    threads(2)
    run_step(dense_chain, np.float32, "split", batch=16)
    assert ckpt.get_num_threads() == 2
    from threadpoolctl import threadpool_info
    counts = {i["num_threads"] for i in threadpool_info()
              if os.path.basename(i["filepath"]).startswith("libscipy_openblas")}
    assert counts == {2}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_cpu_limit(tmp_path):
    assert cgroup_cpu_limit(str(tmp_path)) is None
    v2 = tmp_path / "v2"
    write(v2 / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(str(v2)) is None
    write(v2 / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(str(v2)) == 2
    write(v2 / "cpu.max", "50000 100000\n")
    assert cgroup_cpu_limit(str(v2)) == 1
    v1 = tmp_path / "v1"
    write(v1 / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(v1 / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(str(v1)) is None
    write(v1 / "cpu" / "cpu.cfs_quota_us", "300000\n")
    assert cgroup_cpu_limit(str(v1)) == 3


def test_default_threads_respect_the_affinity_mask():
    n = default_num_threads()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    if limit is not None:
        assert n <= limit


# Batch 64 x 128 x 128 = 1 Mi multiply-adds: within auto's split band at T = 2.
CLI_SMALL = ["train", "--epochs", "1", "--depth", "3", "--width", "128", "--batch-size", "64",
             "--lr", "0.01", "--json"]


def _cli_results(capsys, argv):
    import json
    from ckpt.cli import main
    assert main(argv) == 0
    return json.loads(capsys.readouterr()[0].strip().splitlines()[-1])


def test_ckpt_train_chooses_threads_by_default(capsys, threads):
    threads(2)
    default = _cli_results(capsys, CLI_SMALL)          # the cores, in the default mode
    assert default["threads"] == 2 and default["threads_mode"] == "blas"   # tuned: unsplit
    split = _cli_results(capsys, CLI_SMALL + ["--threads-mode", "split"])
    assert split["threads"] == 2 and split["threads_mode"] == "split"
    one = _cli_results(capsys, CLI_SMALL + ["--threads", "1"])
    assert one["threads"] == 1 and one["threads_mode"] == "blas"
    blas = _cli_results(capsys, CLI_SMALL + ["--threads-mode", "blas"])
    assert blas["threads"] == 2 and blas["threads_mode"] == "blas"
    assert ckpt.get_num_threads() == 2
    # Tuned computes blas's bits; split equals them within summation tolerance.
    assert default["train_loss"] == blas["train_loss"]
    assert abs(split["train_loss"] - blas["train_loss"]) < 1e-4


def test_fit_splits_in_auto_mode_when_split_measures_fastest(threads):
    threads(2)
    layers = build_mlp(8, 3, 128, 3, "relu", np.float32, seed=0)
    model = SegmentCheckpointer(layers, threads_mode="auto")
    model.threads_tuning.timing = lambda config, seconds: 1.0 / config.slices
    rng = np.random.default_rng(0)
    X = rng.standard_normal((192, 8)).astype(np.float32)
    y = rng.integers(0, 3, 192)
    history = ckpt.fit(model, X, y, epochs=4, batch_size=64, seed=0)
    assert np.isfinite(history["loss"]).all()
    assert model.memory_tracker.gradient_bytes == 0
    assert model.threads_tuning.report()["64 at T=2, auto"]["chosen"] == "split/2"
    assert model.slices(64) == 2


def test_parallel_update_and_zero_grad_match_one_thread(threads):
    """sgd_update and zero_grad are cut across the pool for large parameters after a split step
    (never after a "blas" one, whose OpenBLAS threads hold the other cores): the same values."""
    layers = [Dense(2048, 1600, "relu", dtype=np.float32, rng=0),
              Dense(1600, 7, dtype=np.float32, rng=1)]
    blas = SegmentCheckpointer(layers, 1, threads_mode="blas")
    threads(2)
    blas.forward(np.ones((4, 2048), np.float32))
    blas.backward(np.ones((4, 7), np.float32))
    assert blas._typed_chain().elementwise_slices == 1
    model = SegmentCheckpointer(layers, 1, threads_mode="split")
    chain = model._typed_chain()
    rng = np.random.default_rng(0)
    for g in model.gradients():
        g[...] = rng.standard_normal(g.shape)
    before = [p.copy() for p in model.params()]
    lr = np.float32(0.1)
    expected = [p - lr * g for p, g in zip(before, model.gradients())]
    results = {}
    for t in (1, 2, 3):
        threads(t)
        model.forward(np.ones((4, 2048), np.float32))    # a step split into min(t, 4) slices
        model.discard()
        assert chain.elementwise_slices == min(t, chain.parameter_size // (1 << 20))
        for p, b in zip(model.params(), before):
            p[...] = b
        model.update(0.1)
        results[t] = [p.copy() for p in model.params()]
    for t in (2, 3):
        assert all(np.array_equal(a, b) for a, b in zip(results[t], results[1]))
    assert all(np.array_equal(a, b) for a, b in zip(results[1], expected))
    model.zero_grad()
    assert all(not g.any() for g in model.gradients())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_gradient_copies_never_carry_over_between_steps(threads, dtype):
    """Each slice s >= 1 sets (never adds to) its copy: steps on one model, with T changing
    between them (3, 2, 3), give each step's gradients of a fresh model at that T."""
    model = SegmentCheckpointer(residual_chain(dtype), 2, seed=3, threads_mode="split")
    rng = np.random.default_rng(11)
    x = rng.standard_normal((37, 12)).astype(dtype)
    g = rng.standard_normal((37, 5)).astype(dtype)
    for t in (3, 2, 3):
        threads(t)
        model.zero_grad()
        model.forward(x, step_seed=5)
        model.backward(g)
        fresh = SegmentCheckpointer(residual_chain(dtype), 2, seed=3, threads_mode="split")
        fresh.forward(x, step_seed=5)
        fresh.backward(g)
        assert model.slices(37) == t
        assert all(np.array_equal(a, b) for a, b in zip(model.gradients(), fresh.gradients()))
