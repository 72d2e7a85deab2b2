"""Shared fixtures of the ckpt test suite.

Parametrized fixtures (``dtype``, ``activation``, ``shape``, ``impl``) give every test that asks
for them the full product; ``tol``, ``make_problem`` and ``snapshot`` are helpers.
"""
from __future__ import annotations

import numpy as np
import pytest

import ckpt
from ckpt import _core, _reference
from ckpt.activations import ACTIVATIONS as TABLE
from ckpt.layers import Dense

# Every activation of the table (ckpt.activations), None (the identity) first.
ACTIVATIONS = list(TABLE)
DTYPES = [np.float32, np.float64]
# (batch, in_features, out_features): batch 1 and 0, non-square, sizes not multiples of 8.
SHAPES = [(1, 3, 5), (7, 13, 11), (0, 4, 6), (33, 17, 9)]

# Compiled kernels against the NumPy reference. Both compute in the array's dtype; the compiled
# activations go through double precision, and the GEMM summation order differs from NumPy's,
# which is what float32 rtol/atol absorb (the worst seen over many seeds is ~1e-6 relative).
TOLERANCES = {
    np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6),
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-12),
}


def numeric_gradient(loss, array, eps=1e-6):
    """Central finite differences of loss() with respect to ``array`` (changed in place and
    restored), in float64."""
    grad = np.empty_like(array)
    flat, gflat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = loss()
        flat[i] = old - eps
        down = loss()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


def _act_id(activation):
    return "identity" if activation is None else activation


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(params=ACTIVATIONS, ids=_act_id)
def activation(request):
    return request.param


@pytest.fixture(params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def shape(request):
    return request.param


@pytest.fixture
def tol(dtype):
    return TOLERANCES[dtype]


@pytest.fixture
def make_problem():
    """make_problem(m, k, n, dtype, seed) -> x, W, b, grad_output, well scaled."""

    def make(m, k, n, dtype=np.float64, seed=0):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((m, k)).astype(dtype)
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
        b = (0.1 * rng.standard_normal(n)).astype(dtype)
        g = rng.standard_normal((m, n)).astype(dtype)
        return x, w, b, g

    return make


@pytest.fixture
def snapshot():
    """snapshot(layer) -> a function that asserts params and gradients are bit-identical now."""

    def take(layer):
        params = [p.copy() for p in layer.params()]
        grads = [g.copy() for g in layer.gradients()]
        param_ids = [id(p) for p in layer.params()]
        grad_ids = [id(g) for g in layer.gradients()]

        def unchanged():
            assert [id(p) for p in layer.params()] == param_ids
            assert [id(g) for g in layer.gradients()] == grad_ids
            for before, now in zip(params, layer.params()):
                np.testing.assert_array_equal(now, before)
            for before, now in zip(grads, layer.gradients()):
                np.testing.assert_array_equal(now, before)
            return True

        return unchanged

    return take


# --------------------------------------------------------------------------------------------
# Implementations of one Dense step, behind one interface, for checks that hold for all of them
# --------------------------------------------------------------------------------------------


class CompiledKernels:
    """_core.dense_forward / _core.dense_backward, called as ckpt's own code calls them."""

    name = "compiled"

    def forward(self, x, w, b, activation, alpha=0.01):
        y = np.empty((x.shape[0], w.shape[1]), x.dtype)
        _core.dense_forward(x, w, b, y, TABLE[activation].code, alpha)
        return y

    def backward(self, x, w, b, g, activation, alpha=0.01):
        code = TABLE[activation].code
        m, n = g.shape
        gw = np.zeros_like(w)
        gb = np.zeros_like(b)
        gx = np.empty_like(x)
        v = d = None
        if activation is not None:
            v = np.empty((m, n), x.dtype)
            fwd_code = 0 if TABLE[activation].needs_preactivation else code
            _core.dense_forward(x, w, b, v, fwd_code, alpha)
            d = v  # the delta may overwrite the activation values (documented)
        _core.dense_backward(x, w, g, v, d, gw, gb, gx, code, alpha)
        return gx, gw, gb


class ReferenceKernels:
    """The pure-NumPy twins in ckpt._reference."""

    name = "reference"

    def forward(self, x, w, b, activation, alpha=0.01):
        return _reference.dense_forward(x, w, b, activation, alpha)

    def backward(self, x, w, b, g, activation, alpha=0.01):
        return _reference.dense_backward(x, w, b, g, activation, alpha)


class DenseLayer:
    """ckpt.layers.Dense with the given parameters copied in."""

    name = "Dense"

    @staticmethod
    def _layer(x, w, b, activation, alpha):
        layer = Dense(w.shape[0], w.shape[1], activation, dtype=x.dtype, rng=0,
                      negative_slope=alpha)
        layer.set_params([w, b])
        return layer

    def forward(self, x, w, b, activation, alpha=0.01):
        return self._layer(x, w, b, activation, alpha).forward(x)

    def backward(self, x, w, b, g, activation, alpha=0.01):
        layer = self._layer(x, w, b, activation, alpha)
        gx = layer.backward(x, g)
        return gx, layer.grad_W.copy(), layer.grad_b.copy()


IMPLEMENTATIONS = [CompiledKernels(), ReferenceKernels(), DenseLayer()]


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda impl: impl.name)
def impl(request):
    return request.param


@pytest.fixture
def restore_num_threads():
    """Put ckpt's OpenBLAS thread count back as it was after the test."""
    before = ckpt.get_num_threads()
    yield before
    ckpt.set_num_threads(before)


@pytest.fixture(autouse=True)
def _blas_threading_outside_split_tests(request):
    """Outside tests/test_split.py, steps run unsplit ("blas" mode): the suite's bit-equality
    tests compare the compiled executor with unsplit references, and a batch split changes the
    summation order of the parameter gradients. test_split.py tests the split itself."""
    if request.node.path.name == "test_split.py":
        yield
        return
    with ckpt.threading_mode("blas"):
        yield
