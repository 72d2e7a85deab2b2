"""ckpt's OpenBLAS and its threads (threadpoolctl, set/get_num_threads), Dense from several
Python threads, and what the package ships (__version__, py.typed)."""
from __future__ import annotations

import importlib.resources
import os
import re
import threading
import time

import numpy as np
import pytest
import scipy_openblas32
from threadpoolctl import threadpool_info, threadpool_limits

import ckpt
from ckpt import _core, _reference
from ckpt.layers import Dense

OPENBLAS32_DIR = os.path.realpath(os.path.dirname(scipy_openblas32.__file__))


def _is_ckpt_blas(info):
    path = os.path.realpath(info["filepath"])
    return os.path.commonpath([path, OPENBLAS32_DIR]) == OPENBLAS32_DIR


def _ckpt_blas_entries():
    return [info for info in threadpool_info() if _is_ckpt_blas(info)]


def test_threadpoolctl_sees_ckpts_openblas():
    entries = _ckpt_blas_entries()
    assert len(entries) == 1, threadpool_info()
    info = entries[0]
    assert info["user_api"] == "blas"
    assert info["internal_api"] == "openblas"
    assert info["prefix"] == "libscipy_openblas"
    assert os.path.basename(info["filepath"]).startswith("libscipy_openblas")
    assert info["num_threads"] == ckpt.get_num_threads()
    # it is not the OpenBLAS that numpy bundles (numpy.libs/..._openblas64_...)
    numpy_dir = os.path.realpath(os.path.dirname(np.__file__))
    assert not os.path.realpath(info["filepath"]).startswith(numpy_dir)


def test_threadpool_limits_caps_ckpts_blas(restore_num_threads):
    ckpt.set_num_threads(2)
    before = ckpt.get_num_threads()
    assert before == 2
    with threadpool_limits(limits=1, user_api="blas"):
        assert ckpt.get_num_threads() == 1
        assert _ckpt_blas_entries()[0]["num_threads"] == 1
        # the kernels still compute correctly with one thread
        layer = Dense(64, 32, "tanh", dtype=np.float64, rng=0)
        x = np.random.default_rng(0).standard_normal((50, 64))
        np.testing.assert_allclose(layer.forward(x),
                                   _reference.dense_forward(x, layer.W, layer.b, "tanh"),
                                   rtol=1e-12, atol=1e-12)
    assert ckpt.get_num_threads() == before


@pytest.mark.parametrize("n", [1, 2, 3])
def test_set_and_get_num_threads_round_trip(n, restore_num_threads):
    ckpt.set_num_threads(n)
    assert ckpt.get_num_threads() == n
    assert _ckpt_blas_entries()[0]["num_threads"] == n


@pytest.mark.parametrize("n", [0, -1, -(2**31)])
def test_set_num_threads_rejects_fewer_than_one(n, restore_num_threads):
    ckpt.set_num_threads(1)
    with pytest.raises(ValueError, match=f"the number of threads must be at least 1, got {n}"):
        ckpt.set_num_threads(n)
    assert ckpt.get_num_threads() == 1


def test_set_num_threads_rejects_non_numbers(restore_num_threads):
    ckpt.set_num_threads(1)
    with pytest.raises(TypeError):
        ckpt.set_num_threads("2")
    with pytest.raises(TypeError):
        ckpt.set_num_threads(None)
    assert ckpt.get_num_threads() == 1


def test_results_agree_across_thread_counts(restore_num_threads, dtype):
    # big enough for OpenBLAS to split the GEMMs between threads
    rng = np.random.default_rng(1)
    layer = Dense(300, 200, "gelu", dtype=dtype, rng=1)
    x = rng.standard_normal((256, 300)).astype(dtype)
    g = rng.standard_normal((256, 200)).astype(dtype)
    results = []
    for n in (1, 2):
        ckpt.set_num_threads(n)
        layer.zero_grad()
        y = layer.forward(x)
        gx = layer.backward(x, g)
        results.append((y, gx, layer.grad_W.copy(), layer.grad_b.copy()))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    for one, two in zip(*results):
        np.testing.assert_allclose(one, two, **tol)


def test_dense_from_several_python_threads_at_once(dtype):
    # each thread has its own layer and shapes; Dense.backward's scratch buffer is per thread
    shapes = [(5, 7, 3), (40, 9, 12), (1, 4, 20), (17, 30, 2)]
    layers = [Dense(k, n, act, dtype=dtype, rng=i)
              for i, ((m, k, n), act) in enumerate(zip(shapes, ["relu", "tanh", "gelu", "sigmoid"]))]
    inputs = [np.random.default_rng(i).standard_normal((m, k)).astype(dtype)
              for i, (m, k, n) in enumerate(shapes)]
    grads = [np.random.default_rng(10 + i).standard_normal((m, n)).astype(dtype)
             for i, (m, k, n) in enumerate(shapes)]
    rounds = 50
    outputs = [None] * len(shapes)
    errors = []
    barrier = threading.Barrier(len(shapes))

    def work(i):
        try:
            barrier.wait()
            for _ in range(rounds):
                gx = layers[i].backward(inputs[i], grads[i])
            outputs[i] = gx
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shapes))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    for layer, x, g, gx in zip(layers, inputs, grads, outputs):
        rgx, rgw, rgb = _reference.dense_backward(x, layer.W, layer.b, g, layer.activation)
        np.testing.assert_allclose(gx, rgx, **tol)
        np.testing.assert_allclose(layer.grad_W, rounds * rgw, **tol)
        np.testing.assert_allclose(layer.grad_b, rounds * rgb, **tol)


# --------------------------------------------------------------------------------------------
# The package
# --------------------------------------------------------------------------------------------


def test_version_is_a_string():
    assert isinstance(ckpt.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.+-].*)?", ckpt.__version__)
    assert "__version__" in ckpt.__all__


def test_public_names():
    for name in ckpt.__all__:
        assert hasattr(ckpt, name), name
    assert ckpt.get_num_threads is _core.get_num_threads
    assert ckpt.set_num_threads is _core.set_num_threads


def test_py_typed_is_shipped():
    marker = importlib.resources.files("ckpt").joinpath("py.typed")
    assert marker.is_file()


# --------------------------------------------------------------------------------------------
# One checkpointer, several threads: a step belongs to the thread that began it
# --------------------------------------------------------------------------------------------

def _shared_model():
    from ckpt.train import build_mlp
    layers = build_mlp(16, 3, 32, 4, "relu", np.float64, seed=0, residual=True, dropout=0.2)
    return ckpt.SegmentCheckpointer(layers, 2, seed=0)


class _FixedSeed:
    """Stands in for a checkpointer's Generator: every step draws the same seed."""

    def __init__(self, seed):
        self.seed = seed

    def integers(self, *args, **kwargs):
        return np.uint64(self.seed)


@pytest.mark.parametrize("n_threads", [2, 4])
def test_threads_sharing_a_checkpointer_get_errors_never_crashes_or_wrong_gradients(n_threads):
    model = _shared_model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 16))
    g = rng.standard_normal((12, 4))
    outcomes = []                    # (seed of the step, its input gradient) or None: refused

    def work():
        for _ in range(3000 // n_threads):
            try:
                model.forward(x)
                seed = model._state.seed     # our pending step's seed: no one else can change it
                time.sleep(0)                # hand the GIL over: let another thread try a step
                outcomes.append((seed, model.backward(g)))
            except ckpt.CheckpointStateError:
                outcomes.append(None)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [o for o in outcomes if o is not None]
    assert len(done) < len(outcomes) and done     # steps interleaved and were refused
    assert model._state is None
    # every completed step equals the single-threaded step with its seed
    twin = _shared_model()
    for seed, gx in done[:: max(1, len(done) // 40)]:
        twin._rng = _FixedSeed(seed)
        twin.forward(x)
        np.testing.assert_array_equal(twin.backward(g), gx)


def test_a_pending_step_belongs_to_its_thread():
    model = _shared_model()
    x, g = np.ones((3, 16)), np.ones((3, 4))
    model.forward(x)
    outcome = {}

    def other():
        for name, call in (("forward", lambda: model.forward(x)),
                           ("backward", lambda: model.backward(g)),
                           ("update", lambda: model.update(0.1))):
            try:
                call()
            except ckpt.CheckpointStateError as exc:
                outcome[name] = str(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert set(outcome) == {"forward", "backward", "update"}
    assert "belongs to the thread that began it" in outcome["forward"]
    model.backward(g)                 # the owner finishes its step
    t = threading.Thread(target=lambda: (model.forward(x), model.backward(g)))
    t.start()
    t.join()                          # and then another thread may run steps


def test_separate_checkpointers_run_in_parallel_threads():
    models = [_shared_model() for _ in range(2)]
    x, g = np.ones((8, 16)), np.ones((8, 4))
    results = [None, None]

    def work(i):
        for _ in range(200):
            models[i].zero_grad()
            models[i].forward(x)
            models[i].backward(g)
        results[i] = [a.copy() for a in models[i].gradients()]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(a, b) for a, b in zip(*results))   # same seed, same steps


def test_schedule_caches_stay_bounded_across_batch_sizes():
    layers = [Dense(8, 8, "relu", dtype=np.float64, rng=i) for i in range(6)]
    model = ckpt.SegmentCheckpointer(layers, budget_bytes="1MiB")
    for rows in range(1, 60):
        model.forward(np.ones((rows, 8)))
        model.backward(np.ones((rows, 8)))
    assert len(model._policy._cache) <= model._policy.CACHED_SCHEDULES


def test_check_inputs_detects_an_input_edited_between_forward_and_backward():
    model = ckpt.SegmentCheckpointer([Dense(4, 4, rng=0), Dense(4, 2, rng=1)], 0,
                                     check_inputs=True)
    x = np.ones((3, 4), np.float32)
    model.forward(x)
    model.backward(np.ones((3, 2), np.float32))          # untouched: fine
    model.forward(x)
    x[0, 0] = 5
    with pytest.raises(ckpt.CheckpointStateError, match="modified in place"):
        model.backward(np.ones((3, 2), np.float32))
@pytest.mark.parametrize("n", [65, 100_000, 2**40, 2**64])
def test_set_num_threads_is_bounded_by_openblas_max_threads(n, restore_num_threads):
    # The bound is the MAX_THREADS that OpenBLAS reports in its config, and clamps to silently.
    limit = _core.max_num_threads()
    assert f"MAX_THREADS={limit}" in scipy_openblas32.get_openblas_config()
    ckpt.set_num_threads(1)
    if n <= limit:
        pytest.skip(f"this OpenBLAS allows {limit} threads")
    with pytest.raises(ValueError, match=f"at most {limit} .*MAX_THREADS.*got {n}"):
        ckpt.set_num_threads(n)
    assert ckpt.get_num_threads() == 1
    ckpt.set_num_threads(limit)         # oversubscription up to the bound is fine
    assert ckpt.get_num_threads() == limit
