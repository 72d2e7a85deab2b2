"""ckpt.layers.Dense and the Layer protocol: numbers against the reference, accumulation, the
protocol methods, initialisation, user subclasses, and input validation that changes nothing."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from conftest import numeric_gradient
from ckpt import _reference
from ckpt.layers import Dense, Layer

SLOPE = 0.2


def _layer(k, n, activation, dtype, seed=0):
    layer = Dense(k, n, activation, dtype=dtype, rng=seed, negative_slope=SLOPE)
    # non-zero biases, so a missing bias shows
    layer.b[...] = np.random.default_rng(seed + 100).standard_normal(n) * 0.1
    return layer


def _inputs(m, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((m, n)).astype(dtype))


# --------------------------------------------------------------------------------------------
# Against the reference: dtype x activation x shape
# --------------------------------------------------------------------------------------------


def test_forward_matches_reference(dtype, activation, shape, tol):
    m, k, n = shape
    layer = _layer(k, n, activation, dtype)
    x, _ = _inputs(m, k, n, dtype)
    y = layer.forward(x)
    assert y.dtype == dtype and y.shape == (m, n) and y.flags.c_contiguous
    np.testing.assert_allclose(y, _reference.dense_forward(x, layer.W, layer.b, activation, SLOPE),
                               **tol)
    np.testing.assert_array_equal(layer(x), y)  # __call__ is forward


@pytest.mark.parametrize("with_output", [False, True], ids=["recompute", "output="])
def test_backward_matches_reference(dtype, activation, shape, tol, with_output):
    m, k, n = shape
    layer = _layer(k, n, activation, dtype)
    x, g = _inputs(m, k, n, dtype, seed=1)
    x0, g0 = x.copy(), g.copy()
    kwargs = {}
    if with_output:
        out = layer.forward(x)
        out0 = out.copy()
        kwargs["output"] = out
    gx = layer.backward(x, g, **kwargs)
    rgx, rgw, rgb = _reference.dense_backward(x, layer.W, layer.b, g, activation, SLOPE)
    assert gx.dtype == dtype and gx.shape == (m, k)
    np.testing.assert_allclose(gx, rgx, **tol)
    np.testing.assert_allclose(layer.grad_W, rgw, **tol)
    np.testing.assert_allclose(layer.grad_b, rgb, **tol)
    # the caller's arrays are never written
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(g, g0)
    if with_output:
        np.testing.assert_array_equal(out, out0)


def test_backward_with_and_without_output_agree(dtype, activation, tol):
    a = _layer(9, 7, activation, dtype, seed=3)
    b = _layer(9, 7, activation, dtype, seed=3)
    x, g = _inputs(5, 9, 7, dtype, seed=4)
    gx_a = a.backward(x, g)
    gx_b = b.backward(x, g, output=b.forward(x))
    np.testing.assert_allclose(gx_a, gx_b, **tol)
    np.testing.assert_allclose(a.grad_W, b.grad_W, **tol)
    np.testing.assert_allclose(a.grad_b, b.grad_b, **tol)
    assert np.abs(a.grad_W).max() > 0


def test_finite_differences_through_the_layer(activation):
    # float64, loss = sum(y * R): grad_input, grad_W and grad_b of Dense itself
    layer = _layer(4, 3, activation, np.float64, seed=8)
    x, r = _inputs(5, 4, 3, np.float64, seed=9)
    assert np.abs(x @ layer.W + layer.b).min() > 1e-3  # away from the relu kink
    gx = layer.backward(x, r)

    def loss():
        return float(np.sum(layer.forward(x) * r))

    for analytic, param in ((gx, x), (layer.grad_W, layer.W), (layer.grad_b, layer.b)):
        np.testing.assert_allclose(analytic, numeric_gradient(loss, param), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Accumulation
# --------------------------------------------------------------------------------------------


def test_gradients_accumulate_over_two_backward_calls_and_zero_grad_resets(dtype, activation,
                                                                          tol):
    layer = _layer(6, 4, activation, dtype)
    x, g = _inputs(3, 6, 4, dtype)
    gx1 = layer.backward(x, g)
    once_w, once_b = layer.grad_W.copy(), layer.grad_b.copy()
    assert np.abs(once_w).max() > 0
    gx2 = layer.backward(x, g)
    np.testing.assert_array_equal(gx1, gx2)  # the input gradient is not accumulated
    np.testing.assert_allclose(layer.grad_W, 2 * once_w, **tol)
    np.testing.assert_allclose(layer.grad_b, 2 * once_b, **tol)
    grads = layer.gradients()
    layer.zero_grad()
    assert all(a is b for a, b in zip(layer.gradients(), grads))
    assert not layer.grad_W.any() and not layer.grad_b.any()
    layer.backward(x, g)
    np.testing.assert_allclose(layer.grad_W, once_w, **tol)
    np.testing.assert_allclose(layer.grad_b, once_b, **tol)


# --------------------------------------------------------------------------------------------
# The Layer protocol on Dense
# --------------------------------------------------------------------------------------------


def test_params_and_gradients_are_the_live_arrays(dtype):
    layer = Dense(3, 4, "relu", dtype=dtype, rng=0)
    assert layer.params()[0] is layer.W and layer.params()[1] is layer.b
    assert layer.gradients()[0] is layer.grad_W and layer.gradients()[1] is layer.grad_b
    assert layer.W.shape == (3, 4) and layer.b.shape == (4,)
    assert layer.grad_W.shape == (3, 4) and layer.grad_b.shape == (4,)
    for arr in layer.params() + layer.gradients():
        assert arr.dtype == dtype and arr.flags.c_contiguous
    assert not layer.b.any() and not layer.grad_W.any() and not layer.grad_b.any()


def test_set_params_and_set_gradients_copy_in_place(dtype):
    layer = Dense(3, 4, None, dtype=dtype, rng=0)
    params, grads = layer.params(), layer.gradients()
    new_w = np.arange(12, dtype=np.float64).reshape(3, 4)
    new_b = [1, 2, 3, 4]  # a list and int values are fine
    layer.set_params([new_w, new_b])
    layer.set_gradients((new_w * 2, np.full(4, 0.5)))
    assert all(a is b for a, b in zip(layer.params(), params))
    assert all(a is b for a, b in zip(layer.gradients(), grads))
    np.testing.assert_array_equal(layer.W, new_w.astype(dtype))
    np.testing.assert_array_equal(layer.b, np.array([1, 2, 3, 4], dtype))
    np.testing.assert_array_equal(layer.grad_W, (new_w * 2).astype(dtype))
    np.testing.assert_array_equal(layer.grad_b, np.full(4, 0.5, dtype))
    assert layer.W.dtype == dtype
    new_w[0, 0] = 99  # a copy, not a reference
    assert layer.W[0, 0] == 0
    # forward uses the new values
    np.testing.assert_allclose(layer.forward(np.ones((1, 3), dtype)),
                               [[13, 17, 21, 25]], rtol=1e-6)


@pytest.mark.parametrize("lr", [0.1, 1, -0.5, 0.0])
def test_update_is_p_minus_lr_times_g(dtype, lr):
    layer = Dense(5, 3, "tanh", dtype=dtype, rng=1)
    rng = np.random.default_rng(2)
    layer.set_params([rng.standard_normal((5, 3)), rng.standard_normal(3)])
    layer.set_gradients([rng.standard_normal((5, 3)), rng.standard_normal(3)])
    expected = [p - dtype.type(lr) * g for p, g in zip(layer.params(), layer.gradients())]
    grads_before = [g.copy() for g in layer.gradients()]
    params = layer.params()
    layer.update(lr)
    assert all(a is b for a, b in zip(layer.params(), params))
    rtol = 1e-6 if dtype == np.float32 else 1e-15
    for p, e in zip(layer.params(), expected):
        np.testing.assert_allclose(p, e, rtol=rtol, atol=rtol)
    for g, g0 in zip(layer.gradients(), grads_before):
        np.testing.assert_array_equal(g, g0)


@pytest.mark.parametrize("lr, exc, message", [
    (True, TypeError, "learning_rate must be a number"),
    ("0.1", TypeError, "learning_rate must be a number"),
    (None, TypeError, "learning_rate must be a number"),
    (float("nan"), ValueError, "learning_rate must be finite"),
    (float("inf"), ValueError, "learning_rate must be finite"),
])
def test_update_rejects_bad_learning_rates_and_changes_nothing(lr, exc, message, snapshot):
    layer = Dense(3, 2, dtype=np.float64, rng=0)
    layer.set_gradients([np.ones((3, 2)), np.ones(2)])
    unchanged = snapshot(layer)
    with pytest.raises(exc, match=message):
        layer.update(lr)
    assert unchanged()


def test_training_mode():
    layer = Dense(2, 2, rng=0)
    assert layer.is_training is True
    layer.set_training(False)
    assert layer.is_training is False
    layer.set_training(np.bool_(True))
    assert layer.is_training is True
    with pytest.raises(TypeError, match="training must be a bool"):
        layer.set_training(0)
    assert layer.is_training is True
    other = Dense(2, 2, rng=0)
    layer.set_training(False)
    assert other.is_training is True  # per instance, not per class


@pytest.mark.parametrize("activation, name", [(None, "identity"), ("relu", "relu"),
                                              ("gelu", "gelu")])
def test_type_count_description_repr(activation, name):
    layer = Dense(3, 4, activation, dtype=np.float64, rng=0)
    assert layer.layer_type == "Dense"
    assert layer.parameter_count == 3 * 4 + 4
    description = f"Dense(3 -> 4, activation={name}, dtype=float64, parameters=16)"
    assert layer.layer_description == description
    assert repr(layer) == description
    assert isinstance(layer, Layer)


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------

K_IN, K_OUT = 400, 300


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_he_initialisation(activation):
    w = Dense(K_IN, K_OUT, activation, dtype=np.float64, rng=0).W
    assert abs(w.mean()) < 0.01 * math.sqrt(2 / K_IN)
    assert w.std() == pytest.approx(math.sqrt(2 / K_IN), rel=0.02)


def test_he_initialisation_for_leaky_relu_uses_the_slope():
    w = Dense(K_IN, K_OUT, "leaky_relu", dtype=np.float64, rng=0, negative_slope=0.5).W
    assert w.std() == pytest.approx(math.sqrt(2 / ((1 + 0.25) * K_IN)), rel=0.02)


@pytest.mark.parametrize("activation", [None, "tanh", "sigmoid", "softplus"])
def test_glorot_initialisation(activation):
    w = Dense(K_IN, K_OUT, activation, dtype=np.float64, rng=0).W
    limit = math.sqrt(6 / (K_IN + K_OUT))
    assert np.abs(w).max() <= limit
    assert np.abs(w).max() > 0.99 * limit  # uniform: the edges are reached
    assert w.std() == pytest.approx(limit / math.sqrt(3), rel=0.02)
    assert abs(w.mean()) < 0.01 * limit


def test_initialisation_dtype_and_zero_bias(dtype, activation):
    layer = Dense(7, 5, activation, dtype=dtype, rng=0)
    assert layer.W.dtype == dtype and layer.b.dtype == dtype
    assert not layer.b.any()
    assert np.isfinite(layer.W).all() and layer.W.std() > 0


def test_rng_int_and_generator_are_reproducible():
    a = Dense(6, 5, "relu", rng=42).W
    b = Dense(6, 5, "relu", rng=np.random.default_rng(42)).W
    c = Dense(6, 5, "relu", rng=np.int64(42)).W
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, Dense(6, 5, "relu", rng=42).W)
    assert not np.array_equal(a, Dense(6, 5, "relu", rng=43).W)
    gen = np.random.default_rng(42)
    first, second = Dense(6, 5, "relu", rng=gen).W, Dense(6, 5, "relu", rng=gen).W
    np.testing.assert_array_equal(first, a)
    assert not np.array_equal(first, second)  # a shared Generator advances
    assert not np.array_equal(Dense(6, 5, rng=None).W, Dense(6, 5, rng=None).W)


# --------------------------------------------------------------------------------------------
# User-written layers
# --------------------------------------------------------------------------------------------


class Scale(Layer):
    """y = x * s, one parameter per feature."""

    def __init__(self, features):
        self.s = np.ones(features)
        self.grad_s = np.zeros(features)

    def forward(self, x):
        return x * self.s

    def backward(self, x, grad_output, *, output=None):
        self.grad_s += (x * grad_output).sum(axis=0)
        return grad_output * self.s

    def params(self):
        return [self.s]

    def gradients(self):
        return [self.grad_s]


def test_layer_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Layer()

    class ForwardOnly(Layer):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="backward"):
        ForwardOnly()


def test_python_subclass_gets_the_whole_protocol():
    layer = Scale(3)
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(layer(x), x)
    layer.set_params([np.array([2.0, 3.0, 4.0])])
    np.testing.assert_array_equal(layer.forward(x), x * [2, 3, 4])
    gx = layer.backward(x, np.ones_like(x))
    np.testing.assert_array_equal(gx, np.ones_like(x) * [2, 3, 4])
    np.testing.assert_array_equal(layer.grad_s, [5, 7, 9])
    layer.update(0.1)
    np.testing.assert_allclose(layer.s, [1.5, 2.3, 3.1])
    s = layer.s
    layer.set_gradients([np.array([1.0, 1.0, 1.0])])
    np.testing.assert_array_equal(layer.grad_s, [1, 1, 1])
    layer.zero_grad()
    assert not layer.grad_s.any()
    assert layer.s is s
    assert layer.layer_type == "Scale"
    assert layer.parameter_count == 3
    assert layer.layer_description == "Scale(parameters=3)" == repr(layer)
    layer.set_training(False)
    assert not layer.is_training
    with pytest.raises(ValueError, match=r"Scale parameter 0 has shape \(3,\), got \(2,\)"):
        layer.set_params([np.ones(2)])
    np.testing.assert_allclose(layer.s, [1.5, 2.3, 3.1])


def test_update_reaches_fortran_ordered_parameters_of_a_subclass():
    layer = Scale(3)
    layer.s = np.asfortranarray(np.ones((2, 3)))  # a 2-D parameter kept in Fortran order
    layer.grad_s = np.ones((2, 3))
    layer.update(0.5)
    np.testing.assert_array_equal(layer.s, np.full((2, 3), 0.5))


def test_parameterless_subclass_defaults():
    class Identity(Layer):
        def forward(self, x):
            return x

        def backward(self, x, grad_output, *, output=None):
            return grad_output

    layer = Identity()
    assert layer.params() == [] and layer.gradients() == []
    assert layer.parameter_count == 0
    layer.update(0.5)
    layer.zero_grad()
    layer.set_params([])
    assert repr(layer) == "Identity(parameters=0)"
    with pytest.raises(ValueError, match="Identity has 0 parameter arrays, got 1"):
        layer.set_params([np.ones(1)])


# --------------------------------------------------------------------------------------------
# Bad inputs raise a clear error and change nothing
# --------------------------------------------------------------------------------------------


def _trained_layer(dtype=np.float32, activation="tanh"):
    layer = Dense(3, 4, activation, dtype=dtype, rng=0)
    x, g = _inputs(2, 3, 4, dtype)
    layer.backward(x, g)  # non-zero gradients, so a stray write shows
    return layer


F32 = np.float32
# (value, exception, what the message says after naming the argument)
BAD_INPUTS = {
    "1-D": (np.ones(3, F32), ValueError, r"must be 2-D \(batch, features\), got shape \(3,\)"),
    "3-D": (np.ones((2, 3, 1), F32), ValueError, r"must be 2-D .*got shape \(2, 3, 1\)"),
    "0-D": (np.array(1.0, F32), ValueError, r"must be 2-D .*got shape \(\)"),
    "features": (np.ones((2, 5), F32), ValueError, "with 3 features, got 5"),
    "float64": (np.ones((2, 3)), TypeError, "has dtype float64, expected float32"),
    "float16": (np.ones((2, 3), np.float16), TypeError, "has dtype float16, expected float32"),
    "complex": (np.ones((2, 3), np.complex64), TypeError, "has dtype complex64, expected float32"),
    "object": (np.ones((2, 3), object), TypeError, "has dtype object, expected float32"),
    "int": (np.ones((2, 3), np.int32), TypeError, "has dtype int32, expected float32"),
    "bool": (np.ones((2, 3), bool), TypeError, "has dtype bool, expected float32"),
    "list": ([[1.0, 2.0, 3.0]], TypeError, "must be a numpy array, got list"),
    "scalar": (1.0, TypeError, "must be a numpy array, got float"),
    "None": (None, TypeError, "must be a numpy array, got NoneType"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_forward_rejects_bad_input(case, snapshot):
    x, exc, message = BAD_INPUTS[case]
    layer = _trained_layer()
    unchanged = snapshot(layer)
    with pytest.raises(exc, match="the input.*" + message):
        layer.forward(x)
    assert unchanged()


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_backward_rejects_bad_input_and_bad_grad_output(case, snapshot):
    bad, exc, message = BAD_INPUTS[case]
    layer = _trained_layer()
    unchanged = snapshot(layer)
    x, g = _inputs(2, 3, 4, F32)
    with pytest.raises(exc, match="the input.*" + message):
        layer.backward(bad, g)
    assert unchanged()
    # the same defect in grad_output (which has 4 features, not 3)
    if case == "features":
        bad, message = np.ones((2, 7), F32), "with 4 features, got 7"
    with pytest.raises(exc, match="grad_output.*" + message):
        layer.backward(x, bad)
    assert unchanged()


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_backward_rejects_bad_output(activation, snapshot):
    layer = _trained_layer(activation=activation)
    unchanged = snapshot(layer)
    x, g = _inputs(2, 3, 4, F32)
    cases = [
        (np.ones((3, 4), F32), ValueError, "output has 3 rows but the input has 2"),
        (np.ones((2, 5), F32), ValueError, "expects output with 4 features, got 5"),
        (np.ones((2, 4)), TypeError, "output has dtype float64, expected float32"),
        ([[0.0] * 4] * 2, TypeError, "output must be a numpy array"),
    ]
    for output, exc, message in cases:
        with pytest.raises(exc, match=message):
            layer.backward(x, g, output=output)
        assert unchanged()


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_backward_rejects_grad_output_with_wrong_rows(activation, snapshot):
    layer = _trained_layer(activation=activation)
    unchanged = snapshot(layer)
    x, _ = _inputs(2, 3, 4, F32)
    for rows in (1, 3, 0):
        with pytest.raises(ValueError, match=f"grad_output has {rows} rows but the input has 2"):
            layer.backward(x, np.ones((rows, 4), F32))
        assert unchanged()


def test_float64_layer_rejects_float32_input(snapshot):
    layer = _trained_layer(np.float64)
    unchanged = snapshot(layer)
    with pytest.raises(TypeError, match=r"has dtype float32, expected float64 .*astype"):
        layer.forward(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="grad_output has dtype float32, expected float64"):
        layer.backward(np.ones((2, 3)), np.ones((2, 4), np.float32))
    assert unchanged()


CONSTRUCTOR_BAD = [
    (dict(in_features=0), ValueError, "in_features must be a positive integer, got 0"),
    (dict(in_features=-3), ValueError, "in_features must be a positive integer, got -3"),
    (dict(out_features=0), ValueError, "out_features must be a positive integer, got 0"),
    (dict(out_features=-1), ValueError, "out_features must be a positive integer, got -1"),
    (dict(in_features=2.0), TypeError, "in_features must be a positive integer, got float"),
    (dict(out_features=2.5), TypeError, "out_features must be a positive integer, got float"),
    (dict(in_features=True), TypeError, "in_features must be a positive integer, got bool"),
    (dict(out_features=False), TypeError, "out_features must be a positive integer, got bool"),
    (dict(in_features="3"), TypeError, "in_features must be a positive integer, got str"),
    (dict(activation="RELU"), ValueError, "unknown activation 'RELU'; choose one of None, 'relu'"),
    (dict(activation="identity"), ValueError, "unknown activation 'identity'"),
    (dict(activation=""), ValueError, "unknown activation ''"),
    (dict(dtype=np.float16), TypeError, "dtype must be float32 or float64, got float16"),
    (dict(dtype=np.int64), TypeError, "dtype must be float32 or float64, got int64"),
    (dict(dtype=np.complex128), TypeError, "dtype must be float32 or float64, got complex128"),
    (dict(dtype="float128-ish"), TypeError, "dtype must be float32 or float64"),
    (dict(dtype=object), TypeError, "dtype must be float32 or float64, got object"),
    (dict(rng="seed"), TypeError, "rng must be a numpy Generator, an int seed or None, got str"),
    (dict(rng=1.5), TypeError, "rng must be a numpy Generator, an int seed or None, got float"),
    (dict(rng=True), TypeError, "rng must be .* got bool"),
    (dict(rng=np.random.RandomState(0)), TypeError, "rng must be .* got RandomState"),
    (dict(rng=-1), ValueError, "the seed must be non-negative, got -1"),
    (dict(negative_slope=-0.1), ValueError, r"negative_slope must be a number in \[0, 1\)"),
    (dict(negative_slope=1.0), ValueError, r"negative_slope must be a number in \[0, 1\), got 1.0"),
    (dict(negative_slope=5), ValueError, r"negative_slope must be a number in \[0, 1\), got 5"),
    (dict(negative_slope=float("nan")), ValueError, r"negative_slope must be a number in \[0, 1\)"),
    (dict(negative_slope=True), ValueError, r"negative_slope .* got True"),
    (dict(negative_slope="0.1"), ValueError, r"negative_slope .* got '0.1'"),
]


@pytest.mark.parametrize("kwargs, exc, message", CONSTRUCTOR_BAD,
                         ids=[f"{k}={v!r}"[:40] for (kw, _, _) in CONSTRUCTOR_BAD
                              for k, v in kw.items()])
def test_constructor_rejects_bad_arguments(kwargs, exc, message):
    args = dict(in_features=3, out_features=4, activation="leaky_relu")
    args.update(kwargs)
    with pytest.raises(exc, match=message):
        Dense(args.pop("in_features"), args.pop("out_features"), args.pop("activation"), **args)


def test_constructor_accepts_numpy_integers_and_dtype_spellings():
    layer = Dense(np.int64(3), np.int32(4), dtype="float64", rng=0)
    assert layer.in_features == 3 and type(layer.in_features) is int
    assert layer.out_features == 4 and type(layer.out_features) is int
    assert layer.dtype == np.float64
    assert Dense(3, 4, dtype=np.dtype("f4"), rng=0).dtype == np.float32
    assert Dense(3, 4, "leaky_relu", negative_slope=0, rng=0).negative_slope == 0.0


def test_set_params_rejects_wrong_count_and_shapes_and_copies_nothing(snapshot):
    layer = _trained_layer()
    unchanged = snapshot(layer)
    good_w, good_b = np.full((3, 4), 5.0), np.full(4, 5.0)
    cases = [
        ([good_w], ValueError, "Dense has 2 parameter arrays, got 1"),
        ([good_w, good_b, good_b], ValueError, "Dense has 2 parameter arrays, got 3"),
        ([], ValueError, "Dense has 2 parameter arrays, got 0"),
        ([good_w.T, good_b], ValueError, r"Dense parameter 0 has shape \(3, 4\), got \(4, 3\)"),
        # the first array is fine, the second is bad: nothing may be copied
        ([good_w, np.ones(5)], ValueError, r"Dense parameter 1 has shape \(4,\), got \(5,\)"),
        ([good_w, np.ones((1, 4))], ValueError, r"Dense parameter 1 has shape \(4,\), got \(1, 4\)"),
        ([good_w, np.ones(4, complex)], TypeError, "Dense parameter 1 must be real numbers"),
        ([good_w, np.array(["a"] * 4)], TypeError, "Dense parameter 1 must be real numbers"),
        ([good_w, np.ones(4, object)], TypeError, "Dense parameter 1 must be real numbers"),
    ]
    for values, exc, message in cases:
        with pytest.raises(exc, match=message):
            layer.set_params(values)
        assert unchanged()
        with pytest.raises(exc, match=message.replace("parameter", "gradient")):
            layer.set_gradients(values)
        assert unchanged()


def test_non_contiguous_and_fortran_inputs_give_the_same_result(dtype, activation, tol):
    layer = _layer(5, 4, activation, dtype)
    twin = _layer(5, 4, activation, dtype)
    x, g = _inputs(6, 5, 4, dtype, seed=5)
    y = layer.forward(x)
    gx = layer.backward(x, g)

    wide = np.zeros((6, 10), dtype)
    wide[:, ::2] = x
    x_strided = wide[:, ::2]
    assert not x_strided.flags.c_contiguous
    x_fortran = np.asfortranarray(x)
    g_fortran = np.asfortranarray(g)
    y_fortran = np.asfortranarray(y)
    assert not x_fortran.flags.c_contiguous
    x_reversed = x[::-1].copy()[::-1]  # negative strides
    assert not x_reversed.flags.c_contiguous
    for xi in (x_strided, x_fortran, x_reversed):
        np.testing.assert_allclose(twin.forward(xi), y, **tol)
    twin_gx = twin.backward(x_fortran, g_fortran, output=y_fortran)
    np.testing.assert_allclose(twin_gx, gx, **tol)
    np.testing.assert_allclose(twin.grad_W, layer.grad_W, **tol)
    np.testing.assert_allclose(twin.grad_b, layer.grad_b, **tol)
    twin.zero_grad()
    np.testing.assert_allclose(twin.backward(x_reversed, g[::-1].copy()[::-1]), gx, **tol)
    np.testing.assert_allclose(twin.grad_W, layer.grad_W, **tol)
    # the strided views were not written through
    np.testing.assert_array_equal(wide[:, 1::2], 0)


def test_read_only_inputs_work(dtype):
    layer = _layer(3, 2, "sigmoid", dtype)
    x, g = _inputs(4, 3, 2, dtype)
    y = layer.forward(x)
    for arr in (x, g, y):
        arr.flags.writeable = False
    np.testing.assert_array_equal(layer.forward(x), y)
    layer.backward(x, g, output=y)
    assert layer.grad_W.any()


def test_empty_batch(dtype, activation, snapshot):
    layer = _trained_layer(dtype, activation)
    unchanged = snapshot(layer)
    x = np.empty((0, 3), dtype)
    y = layer.forward(x)
    assert y.shape == (0, 4) and y.dtype == dtype
    gx = layer.backward(x, np.empty((0, 4), dtype))
    assert gx.shape == (0, 3) and gx.dtype == dtype
    gx = layer.backward(x, np.empty((0, 4), dtype), output=y)
    assert gx.shape == (0, 3)
    assert unchanged()  # nothing to accumulate


def _nan_input(dtype):
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(dtype)
    x[1, 2] = np.nan
    return x


@pytest.mark.parametrize("activation", [
    None,
    "relu",
    "leaky_relu", "tanh", "sigmoid", "gelu", "softplus",
], ids=lambda a: a or "identity")
def test_nan_propagates_through_forward(dtype, activation):
    layer = _layer(4, 5, activation, dtype)
    x = _nan_input(dtype)
    y = layer.forward(x)  # no exception
    assert np.isnan(y[1]).all()
    assert np.isfinite(y[[0, 2]]).all()
    np.testing.assert_array_equal(
        np.isnan(y), np.isnan(_reference.dense_forward(x, layer.W, layer.b, activation, SLOPE)))


def test_nan_in_backward_matches_the_reference_pattern(dtype, activation):
    layer = _layer(4, 5, activation, dtype)
    x = _nan_input(dtype)
    g = np.ones((3, 5), dtype)
    gx = layer.backward(x, g)  # no exception
    rgx, rgw, rgb = _reference.dense_backward(x, layer.W, layer.b, g, activation, SLOPE)
    # the NaN feature's weight gradients are NaN whatever the activation
    assert np.isnan(layer.grad_W[2]).all()
    np.testing.assert_array_equal(np.isnan(layer.grad_W), np.isnan(rgw))
    np.testing.assert_array_equal(np.isnan(layer.grad_b), np.isnan(rgb))
    np.testing.assert_array_equal(np.isnan(gx), np.isnan(rgx))


def test_nan_in_grad_output_propagates(dtype, activation):
    layer = _layer(4, 5, activation, dtype)
    x, g = _inputs(3, 4, 5, dtype)
    g[0, 1] = np.nan
    gx = layer.backward(x, g)
    assert np.isnan(layer.grad_b[1])
    assert np.isnan(layer.grad_W[:, 1]).all()
    assert np.isnan(gx[0]).all()
    assert np.isfinite(gx[1:]).all()


def test_layer_description_mentions_float32_default():
    layer = Dense(2, 3, "softplus", rng=0)
    assert layer.dtype == np.float32
    assert re.fullmatch(r"Dense\(2 -> 3, activation=softplus, dtype=float32, parameters=9\)",
                        repr(layer))


def test_a_size_beyond_the_32_bit_blas_limit_is_refused_before_allocating():
    with pytest.raises(ValueError, match="in_features = 2147483648 exceeds the 32-bit BLAS limit "
                                         "2147483647"):
        Dense(2**31, 2)
    with pytest.raises(ValueError, match="out_features = 4294967296 exceeds"):
        Dense(2, 2**32)


def test_weights_that_cannot_fit_in_memory_are_a_memory_error_naming_the_sizes(monkeypatch):
    from ckpt.elements import _checks as layers   # where the memory check lives
    monkeypatch.setattr(layers, "available_memory_bytes", lambda: 3 * 2**20)
    # W and grad_W in float32 plus one 1 MiB block of the float64 draw: 8 + 1 = 9 MiB.
    with pytest.raises(MemoryError, match=r"Dense\(1024 -> 1024, float32\) needs 9.0 MiB, but "
                                          r"only 3.0 MiB of memory is available"):
        Dense(1024, 1024)
    Dense(64, 64)
    monkeypatch.undo()
    with pytest.raises(MemoryError, match=r"Dense\(1048576 -> 1048576, float64\) needs 16.0 TiB"):
        Dense(2**20, 2**20, dtype=np.float64)


def test_masked_inputs_and_set_params_none_are_clear_type_errors():
    layer = Dense(3, 2, rng=0)
    x = np.ma.masked_array(np.ones((2, 3), np.float32), mask=[[0, 1, 0], [0, 0, 0]])
    with pytest.raises(TypeError, match="the input is a masked array"):
        layer.forward(x)
    with pytest.raises(TypeError, match="the input is a masked array"):
        layer.backward(x, np.ones((2, 2), np.float32))
    with pytest.raises(TypeError, match="Dense needs a sequence of 2 parameter arrays, got "
                                        "NoneType"):
        layer.set_params(None)
    with pytest.raises(TypeError, match="needs a sequence of 2 gradient arrays, got ndarray"):
        layer.set_gradients(np.zeros(2))


@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu"])
def test_weights_drawn_in_blocks_equal_one_draw_of_the_whole_matrix(activation):
    # 700 x 400 = 280,000 values: more than two 1 MiB blocks of float64, the last one partial.
    layer = Dense(700, 400, activation, dtype=np.float32, rng=3)
    rng = np.random.default_rng(3)
    if activation in ("relu", "leaky_relu"):
        gain = 2.0 if activation == "relu" else 2.0 / (1 + 0.01 ** 2)
        whole = rng.normal(0.0, np.sqrt(gain / 700), (700, 400))
    else:
        limit = np.sqrt(6.0 / 1100)
        whole = rng.uniform(-limit, limit, (700, 400))
    np.testing.assert_array_equal(layer.W, whole.astype(np.float32))
