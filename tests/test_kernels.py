"""The compiled kernels of ckpt._core against the NumPy reference, closed forms and finite
differences; their argument checks, including the 32-bit BLAS limit."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import numeric_gradient
from ckpt import _core, _reference
from ckpt.activations import ACTIVATIONS

ALPHA = 0.2  # a leaky_relu slope far from the default, so a wrong slope shows
INT_MAX = 2**31 - 1
BIG = 2**31  # one past the 32-bit BLAS limit


def _code(activation):
    return ACTIVATIONS[activation].code


def _values_for_backward(x, w, b, activation):
    """What ckpt passes as v: the output, or the pre-activation for GELU."""
    code = _code(activation)
    v = np.empty((x.shape[0], w.shape[1]), x.dtype)
    _core.dense_forward(x, w, b, v, 0 if ACTIVATIONS[activation].needs_preactivation else code, ALPHA)
    return v


# --------------------------------------------------------------------------------------------
# The activation table
# --------------------------------------------------------------------------------------------


def test_activation_codes_cover_the_documented_activations():
    assert set(ACTIVATIONS) == {None, "relu", "leaky_relu", "tanh", "sigmoid", "gelu",
                                "softplus", "silu"}
    assert ACTIVATIONS[None].code == 0
    assert len({a.code for a in ACTIVATIONS.values()}) == 8
    assert {a.name for a in ACTIVATIONS.values() if a.needs_preactivation} == {"gelu", "silu"}


def test_the_c_enum_and_the_activation_table_agree():
    # Every code of _simd.h's enum has a table entry of the same name, and no entry lacks one.
    names = _core.activation_names()
    assert sorted(a.label for a in ACTIVATIONS.values()) == sorted(names)
    for entry in ACTIVATIONS.values():
        assert names[entry.code] == entry.label


# --------------------------------------------------------------------------------------------
# Compiled against reference: dtype x activation x shape
# --------------------------------------------------------------------------------------------


def test_dense_forward_matches_reference(dtype, activation, shape, tol, make_problem):
    m, k, n = shape
    x, w, b, _ = make_problem(m, k, n, dtype, seed=1)
    x0, w0, b0 = x.copy(), w.copy(), b.copy()
    y = np.full((m, n), np.nan, dtype)  # every entry must be written
    _core.dense_forward(x, w, b, y, _code(activation), ALPHA)
    expected = _reference.dense_forward(x, w, b, activation, ALPHA)
    assert y.dtype == dtype and expected.dtype == dtype
    assert y.shape == (m, n)
    np.testing.assert_allclose(y, expected, **tol)
    # inputs are read-only for the kernel
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("delta", ["separate", "aliases_v"])
def test_dense_backward_matches_reference(dtype, activation, shape, tol, make_problem, delta):
    m, k, n = shape
    x, w, b, g = make_problem(m, k, n, dtype, seed=2)
    rng = np.random.default_rng(3)
    gw0 = rng.standard_normal((k, n)).astype(dtype)  # grad_W and grad_b accumulate
    gb0 = rng.standard_normal(n).astype(dtype)
    gw, gb = gw0.copy(), gb0.copy()
    gx = np.full((m, k), np.nan, dtype)  # grad_input is overwritten
    g0 = g.copy()
    v = _values_for_backward(x, w, b, activation)
    v0 = v.copy()
    d = v if delta == "aliases_v" else np.empty_like(v)

    _core.dense_backward(x, w, g, v, d, gw, gb, gx, _code(activation), ALPHA)

    rgx, rgw, rgb = _reference.dense_backward(x, w, b, g, activation, ALPHA)
    np.testing.assert_allclose(gx, rgx, **tol)
    np.testing.assert_allclose(gw, gw0 + rgw, **tol)
    np.testing.assert_allclose(gb, gb0 + rgb, **tol)
    np.testing.assert_array_equal(g, g0)
    if delta == "separate":
        np.testing.assert_array_equal(v, v0)
    if activation is not None:
        # d receives the delta g * act'(z)
        z = x @ w + b
        np.testing.assert_allclose(d, g * _reference.DERIVATIVES[activation](z, ALPHA), **tol)


def test_dense_backward_without_grad_input(dtype, activation, make_problem, tol):
    x, w, b, g = make_problem(6, 5, 7, dtype, seed=4)
    v = _values_for_backward(x, w, b, activation)
    gw = np.zeros_like(w)
    gb = np.zeros_like(b)
    _core.dense_backward(x, w, g, v, v, gw, gb, None, _code(activation), ALPHA)
    _, rgw, rgb = _reference.dense_backward(x, w, b, g, activation, ALPHA)
    np.testing.assert_allclose(gw, rgw, **tol)
    np.testing.assert_allclose(gb, rgb, **tol)


def test_identity_backward_needs_no_buffers_and_leaves_them_alone(dtype, make_problem, tol):
    x, w, b, g = make_problem(4, 3, 5, dtype, seed=5)
    gw, gb, gx = np.zeros_like(w), np.zeros_like(b), np.empty_like(x)
    _core.dense_backward(x, w, g, None, None, gw, gb, gx, 0)
    rgx, rgw, rgb = _reference.dense_backward(x, w, b, g, None)
    np.testing.assert_allclose(gx, rgx, **tol)
    np.testing.assert_allclose(gw, rgw, **tol)
    np.testing.assert_allclose(gb, rgb, **tol)

    v = np.full((4, 5), 7.0, dtype)
    d = np.full((4, 5), 9.0, dtype)
    gw2, gb2, gx2 = np.zeros_like(w), np.zeros_like(b), np.empty_like(x)
    _core.dense_backward(x, w, g, v, d, gw2, gb2, gx2, 0)
    assert (v == 7).all() and (d == 9).all()
    np.testing.assert_array_equal(gw2, gw)
    np.testing.assert_array_equal(gb2, gb)
    np.testing.assert_array_equal(gx2, gx)


def test_empty_batch_kernels_touch_nothing(dtype, activation):
    w = np.ones((4, 6), dtype)
    b = np.ones(6, dtype)
    x = np.empty((0, 4), dtype)
    y = np.empty((0, 6), dtype)
    _core.dense_forward(x, w, b, y, _code(activation), ALPHA)
    assert y.shape == (0, 6)
    gw = np.full((4, 6), 3.0, dtype)
    gb = np.full(6, 5.0, dtype)
    gx = np.empty((0, 4), dtype)
    _core.dense_backward(x, w, y, y, y, gw, gb, gx, _code(activation), ALPHA)
    assert (gw == 3).all() and (gb == 5).all()


# --------------------------------------------------------------------------------------------
# Closed forms, for every implementation (compiled kernels, reference, Dense layer)
# --------------------------------------------------------------------------------------------

Z_GRID = np.array([-1000.0, -30.0, -5.0, -1.5, -0.3, 0.0, 0.25, 0.7, 2.0, 6.0, 30.0, 1000.0])


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _sigmoid_prime(z):
    e = math.exp(-abs(z))
    return e / (1.0 + e) ** 2


def _softplus(z):
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def _gelu(z):
    return 0.5 * z * math.erfc(-z / math.sqrt(2.0))


def _gelu_prime(z):
    return 0.5 * math.erfc(-z / math.sqrt(2.0)) + z * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


CLOSED_FORMS = {
    # activation: (f(z), f'(z)); at the kink z = 0 relu' is 0 and leaky_relu' is the slope.
    None: (lambda z: z, lambda z: 1.0),
    "relu": (lambda z: max(z, 0.0), lambda z: 1.0 if z > 0 else 0.0),
    "leaky_relu": (lambda z: z if z > 0 else ALPHA * z, lambda z: 1.0 if z > 0 else ALPHA),
    "tanh": (math.tanh, lambda z: 1.0 / math.cosh(z) ** 2 if abs(z) < 300 else 0.0),
    "sigmoid": (_sigmoid, _sigmoid_prime),
    "gelu": (_gelu, _gelu_prime),
    "softplus": (_softplus, _sigmoid),
    "silu": (lambda z: z * _sigmoid(z), lambda z: _sigmoid(z) * (1 + z * (1 - _sigmoid(z)))),
}


def test_activation_values_and_derivatives_match_closed_forms(impl, dtype, activation):
    # With W = [[1]] and b = 0, y = act(z) for x = z, and grad_input = act'(z) for g = 1.
    z = Z_GRID if dtype == np.float64 else Z_GRID[np.abs(Z_GRID) <= 30]
    x = z.astype(dtype).reshape(-1, 1)
    w = np.ones((1, 1), dtype)
    b = np.zeros(1, dtype)
    f, fprime = CLOSED_FORMS[activation]
    expected_y = np.array([f(float(v)) for v in x[:, 0]])
    expected_d = np.array([fprime(float(v)) for v in x[:, 0]])
    # Values near 1 (sigmoid, tanh) lose their small complement in the output dtype, and the
    # derivatives are computed from the output, so the check is absolute there.
    rtol, atol = (1e-5, 1e-6) if dtype == np.float32 else (1e-13, 1e-15)
    with np.errstate(over="ignore", under="ignore"):
        y = impl.forward(x, w, b, activation, ALPHA)
        gx, gw, gb = impl.backward(x, w, b, np.ones_like(x), activation, ALPHA)
    assert np.isfinite(y).all() and np.isfinite(gx).all()
    np.testing.assert_allclose(y[:, 0], expected_y, rtol=rtol, atol=atol)
    np.testing.assert_allclose(gx[:, 0], expected_d, rtol=rtol, atol=atol)
    np.testing.assert_allclose(gb[0], expected_d.sum(), rtol=rtol * 10, atol=atol * len(z))


# --------------------------------------------------------------------------------------------
# Central finite differences in float64
# --------------------------------------------------------------------------------------------




@pytest.mark.parametrize("shape", [(4, 5, 3), (1, 2, 6)], ids=["4x5x3", "1x2x6"])
def test_gradients_match_finite_differences(impl, activation, shape, make_problem):
    m, k, n = shape
    x, w, b, _ = make_problem(m, k, n, np.float64, seed=11)
    r = np.random.default_rng(12).standard_normal((m, n))
    z = x @ w + b
    # finite differences of relu/leaky_relu are only meaningful away from the kink at 0
    assert np.abs(z).min() > 1e-3, "regenerate the problem: an input sits on a kink"

    def loss():
        return float(np.sum(impl.forward(x, w, b, activation, ALPHA) * r))

    gx, gw, gb = impl.backward(x, w, b, r, activation, ALPHA)
    for name, analytic, param in (("grad_input", gx, x), ("grad_W", gw, w), ("grad_b", gb, b)):
        numeric = numeric_gradient(loss, param)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7, err_msg=name)
    assert np.abs(gw).max() > 1e-3  # a zero gradient would pass trivially


# --------------------------------------------------------------------------------------------
# sgd_step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 13, 1000])
def test_sgd_step_matches_numpy(dtype, size):
    rng = np.random.default_rng(size)
    p = rng.standard_normal(size).astype(dtype)
    g = rng.standard_normal(size).astype(dtype)
    expected = p - dtype.type(0.03) * g
    g0 = g.copy()
    _core.sgd_step(p, g, 0.03)
    rtol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(p, expected, rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(g, g0)


def test_sgd_step_rejects_length_mismatch_and_changes_nothing():
    p = np.arange(4.0)
    with pytest.raises(ValueError, match="4 values but its gradient has 3"):
        _core.sgd_step(p, np.ones(3), 0.1)
    np.testing.assert_array_equal(p, np.arange(4.0))


# --------------------------------------------------------------------------------------------
# Argument checks: every bad call raises and writes nothing
# --------------------------------------------------------------------------------------------


def _forward_args(dt=np.float64):
    return dict(x=np.ones((2, 3), dt), w=np.ones((3, 5), dt), b=np.ones(5, dt),
                y=np.full((2, 5), -7.0, dt))


FORWARD_BAD = {
    "W rows": (dict(w=np.ones((4, 5))), "x has 3 features but W has 4 rows"),
    "bias length": (dict(b=np.ones(4)), r"b has 4 entries, expected 5"),
    "y rows": (dict(y=np.zeros((3, 5))), r"y has shape \(3, 5\), expected \(2, 5\)"),
    "y cols": (dict(y=np.zeros((2, 4))), r"y has shape \(2, 4\), expected \(2, 5\)"),
}


@pytest.mark.parametrize("case", list(FORWARD_BAD), ids=list(FORWARD_BAD))
def test_dense_forward_rejects_bad_shapes(case):
    change, message = FORWARD_BAD[case]
    args = {**_forward_args(), **change}
    y_before = args["y"].copy()
    with pytest.raises(ValueError, match=message):
        _core.dense_forward(args["x"], args["w"], args["b"], args["y"], 1)
    np.testing.assert_array_equal(args["y"], y_before)


@pytest.mark.parametrize("act", [-1, len(ACTIVATIONS), 100])   # the first code past the table
def test_kernels_reject_unknown_activation_codes(act):
    a = _forward_args()
    with pytest.raises(ValueError, match=f"unknown activation code {act}"):
        _core.dense_forward(a["x"], a["w"], a["b"], a["y"], act)
    assert (a["y"] == -7).all()
    gw, gb, gx = np.full((3, 5), 2.0), np.full(5, 2.0), np.full((2, 3), 2.0)
    v = np.ones((2, 5))
    with pytest.raises(ValueError, match=f"unknown activation code {act}"):
        _core.dense_backward(a["x"], a["w"], v, v, v.copy(), gw, gb, gx, act)
    assert (gw == 2).all() and (gb == 2).all() and (gx == 2).all()


def _backward_args():
    return dict(x=np.ones((2, 3)), w=np.ones((3, 5)), g=np.ones((2, 5)), v=np.ones((2, 5)),
                d=np.zeros((2, 5)), gw=np.full((3, 5), 4.0), gb=np.full(5, 4.0),
                gx=np.full((2, 3), 4.0))


BACKWARD_BAD = {
    "W rows": (dict(w=np.ones((2, 5))), "x has 3 features but W has 2 rows"),
    "grad_output rows": (dict(g=np.ones((3, 5))),
                         r"grad_output has shape \(3, 5\), expected \(2, 5\)"),
    "grad_output cols": (dict(g=np.ones((2, 4))),
                         r"grad_output has shape \(2, 4\), expected \(2, 5\)"),
    "grad_W": (dict(gw=np.zeros((5, 3))), r"grad_W has shape \(5, 3\), expected \(3, 5\)"),
    "grad_b": (dict(gb=np.zeros(3)), "grad_b has 3 entries, expected 5"),
    "values missing": (dict(v=None), r"activation values must have shape \(2, 5\)"),
    "values shape": (dict(v=np.ones((1, 5))), r"activation values must have shape \(2, 5\)"),
    "delta missing": (dict(d=None), r"delta buffer must have shape \(2, 5\)"),
    "delta shape": (dict(d=np.ones((2, 6))), r"delta buffer must have shape \(2, 5\)"),
    "grad_input": (dict(gx=np.zeros((2, 4))), r"grad_input has shape \(2, 4\), expected \(2, 3\)"),
}


@pytest.mark.parametrize("case", list(BACKWARD_BAD), ids=list(BACKWARD_BAD))
def test_dense_backward_rejects_bad_shapes(case):
    change, message = BACKWARD_BAD[case]
    a = {**_backward_args(), **change}
    before = {k: a[k].copy() for k in ("gw", "gb", "gx", "d") if a[k] is not None}
    with pytest.raises(ValueError, match=message):
        _core.dense_backward(a["x"], a["w"], a["g"], a["v"], a["d"], a["gw"], a["gb"], a["gx"],
                             _code("tanh"))
    for k, arr in before.items():
        np.testing.assert_array_equal(a[k], arr, err_msg=k)


def test_kernels_reject_mixed_dtypes():
    a = _forward_args()
    with pytest.raises(ValueError, match="dtype mismatch"):
        _core.dense_forward(a["x"].astype(np.float32), a["w"], a["b"], a["y"])
    assert (a["y"] == -7).all()


def test_kernels_reject_non_contiguous_arrays():
    a = _forward_args()
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.dense_forward(np.ones((3, 2)).T, a["w"], a["b"], a["y"])
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.dense_forward(a["x"], a["w"], a["b"], np.zeros((5, 2)).T)
    assert (a["y"] == -7).all()


def test_kernels_refuse_read_only_outputs_but_accept_read_only_inputs():
    a = _forward_args()
    for arr in (a["x"], a["w"], a["b"]):
        arr.flags.writeable = False
    _core.dense_forward(a["x"], a["w"], a["b"], a["y"], 0)
    np.testing.assert_array_equal(a["y"], np.full((2, 5), 4.0))
    a["y"].flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _core.dense_forward(a["x"], a["w"], a["b"], a["y"], 0)


# --------------------------------------------------------------------------------------------
# The 32-bit BLAS limit. Arrays with a dimension of 2**31 but no element cost nothing, so the
# check on in_features and the batch size can be reached; out_features also needs a bias of
# 2**31 entries, which np.empty reserves lazily (no page is touched).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_dense_forward_rejects_in_features_past_int_max(dt):
    x = np.empty((0, BIG), dt)
    w = np.empty((BIG, 0), dt)
    with pytest.raises(ValueError, match=f"in_features = {BIG} exceeds the 32-bit BLAS limit "
                                         f"{INT_MAX}"):
        _core.dense_forward(x, w, np.empty(0, dt), np.empty((0, 0), dt))


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_dense_forward_rejects_batch_past_int_max(dt):
    x = np.empty((BIG, 0), dt)
    y = np.empty((BIG, 0), dt)
    with pytest.raises(ValueError, match=f"batch size = {BIG} exceeds the 32-bit BLAS limit"):
        _core.dense_forward(x, np.empty((0, 0), dt), np.empty(0, dt), y)


def test_dense_forward_accepts_int_max_exactly():
    # INT_MAX itself is allowed: the check is "greater than", not "at least"
    x = np.empty((0, INT_MAX), np.float32)
    w = np.empty((INT_MAX, 0), np.float32)
    _core.dense_forward(x, w, np.empty(0, np.float32), np.empty((0, 0), np.float32))


def test_dense_forward_rejects_out_features_past_int_max():
    try:
        b = np.empty(BIG, np.float32)  # 8 GiB of address space, never touched
    except MemoryError:
        pytest.skip("cannot reserve 8 GiB of address space here")
    x = np.empty((0, 0), np.float32)
    w = np.empty((0, BIG), np.float32)
    y = np.empty((0, BIG), np.float32)
    with pytest.raises(ValueError, match=f"out_features = {BIG} exceeds the 32-bit BLAS limit"):
        _core.dense_forward(x, w, b, y)


@pytest.mark.parametrize("activation", [None, "relu"], ids=["identity", "relu"])
def test_dense_backward_rejects_dims_past_int_max(activation):
    dt = np.float64
    code = _code(activation)
    # in_features
    x = np.empty((0, BIG), dt)
    w = np.empty((BIG, 0), dt)
    g = np.empty((0, 0), dt)
    v = d = None if activation is None else np.empty((0, 0), dt)
    with pytest.raises(ValueError, match=f"in_features = {BIG} exceeds the 32-bit BLAS limit"):
        _core.dense_backward(x, w, g, v, d, np.empty((BIG, 0), dt), np.empty(0, dt),
                             np.empty((0, BIG), dt), code)
    # batch size (with and without grad_input)
    x = np.empty((BIG, 0), dt)
    w = np.empty((0, 0), dt)
    g = np.empty((BIG, 0), dt)
    v = d = None if activation is None else np.empty((BIG, 0), dt)
    for gx in (np.empty((BIG, 0), dt), None):
        with pytest.raises(ValueError, match=f"batch size = {BIG} exceeds the 32-bit BLAS limit"):
            _core.dense_backward(x, w, g, v, d, np.empty((0, 0), dt), np.empty(0, dt), gx, code)
