"""backward(accumulate=False): the gradients are set to the backward's, bit for bit the values
zero_grad() and an accumulating backward give -- compiled (unsplit and split) and Python
chains, stale or NaN gradients before, empty batches, gradients sharing memory -- and a bad
flag changes nothing."""
from __future__ import annotations

import numpy as np
import pytest

import ckpt
from ckpt import Dense, SegmentCheckpointer
from ckpt.train import build_mlp
from test_split import CHAINS


class PlainDense(Dense):
    """A Dense the compiled executor does not run (it dispatches on exact classes)."""


def batch(dtype, rows=37, n_in=12, n_out=5, seed=11):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, n_in)).astype(dtype),
            rng.standard_normal((rows, n_out)).astype(dtype))


def gradients_both_ways(make, dtype, mode, every, rows=37, n_in=12, n_out=5):
    """(zero_grad + backward, backward(accumulate=False) over NaN gradients) of one step."""
    x, g = batch(dtype, rows, n_in, n_out)
    results = []
    for accumulate in (True, False):
        model = SegmentCheckpointer(make(dtype), every, seed=3, threads_mode=mode)
        for a in model.gradients():
            a.fill(np.nan)
        if accumulate:
            model.zero_grad()
        model.forward(x, step_seed=5)
        model.backward(g, accumulate=accumulate)
        results.append([a.copy() for a in model.gradients()])
    return results


@pytest.mark.parametrize("name", sorted(CHAINS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode,t", [("blas", 1), ("blas", 2), ("split", 2), ("split", 3)])
@pytest.mark.parametrize("every", [1, 2])
def test_set_gradients_equal_zeroed_then_accumulated(restore_num_threads, name, dtype, mode, t,
                                                     every):
    ckpt.set_num_threads(t)
    added, set_ = gradients_both_ways(CHAINS[name], dtype, mode, every)
    assert all(np.array_equal(a, b) for a, b in zip(added, set_))
    assert all(np.isfinite(a).all() for a in set_)


def test_the_python_path_sets_gradients_too():
    def make(dtype):
        rng = np.random.default_rng(0)
        return [PlainDense(12, 16, "relu", dtype=dtype, rng=rng), Dense(16, 5, dtype=dtype, rng=rng)]
    assert SegmentCheckpointer(make(np.float64)).executor == "python"
    added, set_ = gradients_both_ways(make, np.float64, None, 1)
    assert all(np.array_equal(a, b) for a, b in zip(added, set_))


@pytest.mark.parametrize("mode", ["blas", "split"])
def test_a_second_backward_adds_and_a_setting_one_restarts(restore_num_threads, mode):
    """accumulate=True after a setting backward adds to it; the next accumulate=False drops
    both: gradient accumulation over micro-batches keeps working."""
    ckpt.set_num_threads(2)
    model = SegmentCheckpointer(CHAINS["residual"](np.float64), 2, seed=3, threads_mode=mode)
    x, g = batch(np.float64)
    model.forward(x, step_seed=5)
    model.backward(g, accumulate=False)
    once = [a.copy() for a in model.gradients()]
    model.forward(x, step_seed=5)
    model.backward(g)
    assert all(np.allclose(a, 2 * b, rtol=1e-12, atol=0) for a, b in zip(model.gradients(), once))
    model.forward(x, step_seed=5)
    model.backward(g, accumulate=False)
    assert all(np.array_equal(a, b) for a, b in zip(model.gradients(), once))


def test_an_empty_batch_sets_zero_gradients():
    model = SegmentCheckpointer(build_mlp(8, 2, 16, 3, seed=0), 1)
    for a in model.gradients():
        a.fill(7.0)
    model.forward(np.zeros((0, 8), np.float32))
    model.backward(np.zeros((0, 3), np.float32), accumulate=False)
    assert all(not a.any() for a in model.gradients())


def test_gradients_sharing_memory_still_get_both_contributions():
    """Two layers whose gradient arrays are one (rebound by hand): setting would keep only the
    last element's part, so the executor zeroes and adds instead."""
    def make(dtype):
        rng = np.random.default_rng(0)
        layers = [Dense(6, 6, "tanh", dtype=dtype, rng=rng) for _ in range(3)]
        layers[2].grad_W = layers[0].grad_W
        layers[2].grad_b = layers[0].grad_b
        return layers
    assert SegmentCheckpointer(make(np.float64)).executor == "compiled"
    added, set_ = gradients_both_ways(make, np.float64, "blas", 1, 9, 6, 6)
    # the shared array holds both layers' parts
    assert all(np.array_equal(a, b) for a, b in zip(added, set_))


def test_accumulate_must_be_a_bool_and_a_refusal_changes_nothing():
    model = SegmentCheckpointer(build_mlp(8, 2, 16, 3, seed=0), 1)
    x, g = batch(np.float32, 4, 8, 3)
    for a in model.gradients():
        a.fill(1.5)
    model.forward(x)
    with pytest.raises(TypeError, match="accumulate must be True or False, got str"):
        model.backward(g, accumulate="no")
    assert all((a == 1.5).all() for a in model.gradients())
    model.backward(g, accumulate=np.bool_(False))   # the forward is still pending
    assert not any((a == 1.5).all() for a in model.gradients())
