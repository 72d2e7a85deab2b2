"""The estimators' output-loss kernel (scikit-learn's MLP losses) against its NumPy twin."""
import numpy as np
import pytest

from ckpt import _core
from ckpt import _reference_train as ref

TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}
DTYPES = [np.float32, np.float64]
OUTPUTS = ["identity", "logistic", "softmax"]


def _targets(output, shape, rng, dtype):
    if output == "identity":
        return rng.standard_normal(shape).astype(dtype)
    if output == "logistic":
        return rng.integers(0, 2, shape).astype(dtype)
    return np.eye(shape[1], dtype=dtype)[rng.integers(0, shape[1], shape[0])]


def _kernel(z, y, w, output):
    grad = np.empty_like(z)
    loss = _core.output_loss_kernel(z, y, w, grad, _core.OUTPUT_CODES[output])
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (64, 10)])
@pytest.mark.parametrize("weighted", [False, True])
def test_kernel_matches_reference(dtype, output, shape, weighted):
    if output == "softmax" and shape[1] == 1:
        pytest.skip("softmax needs two classes or more")
    rng = np.random.default_rng(0)
    z = (3 * rng.standard_normal(shape)).astype(dtype)
    y = _targets(output, shape, rng, dtype)
    w = rng.uniform(0, 3, shape[0]).astype(dtype) if weighted else None
    loss, grad = _kernel(z, y, w, output)
    ref_loss, ref_grad = ref.output_loss(z, y, w, output)
    assert grad.dtype == dtype
    np.testing.assert_allclose(loss, ref_loss, **TOL[dtype])
    np.testing.assert_allclose(grad, ref_grad, **TOL[dtype])


@pytest.mark.parametrize("output", OUTPUTS)
def test_gradient_matches_finite_differences(output):
    rng = np.random.default_rng(1)
    z = rng.standard_normal((5, 4))
    y = _targets(output, z.shape, rng, np.float64)
    w = rng.uniform(0.5, 2, 5)
    _, grad = _kernel(z, y, w, output)
    h = 1e-6
    numeric = np.empty_like(z)
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        numeric[idx] = (_kernel(zp, y, w, output)[0] - _kernel(zm, y, w, output)[0]) / (2 * h)
    # As in scikit-learn, the squared error's reported loss is also averaged over the outputs,
    # but the gradient back-propagated is not.
    scale = z.shape[1] if output == "identity" else 1
    np.testing.assert_allclose(grad, scale * numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("output", OUTPUTS)
def test_integer_weights_equal_repeated_rows(output):
    rng = np.random.default_rng(2)
    z = rng.standard_normal((6, 3))
    y = _targets(output, z.shape, rng, np.float64)
    w = np.array([0, 1, 2, 3, 1, 0], np.float64)
    loss, grad = _kernel(z, y, w, output)
    rows = np.repeat(np.arange(6), w.astype(int))
    loss_rep, grad_rep = _kernel(z[rows], y[rows], None, output)
    assert loss == pytest.approx(loss_rep, rel=1e-12)
    # Each row's gradient is the sum of its repeats'; zero-weight rows get none.
    summed = np.zeros_like(grad)
    np.add.at(summed, rows, grad_rep)
    np.testing.assert_allclose(grad, summed, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_outputs_are_clipped_like_scikit_learn(dtype):
    eps = np.finfo(dtype).eps
    z = np.array([[800.0, -800.0]], dtype)
    wrong = np.array([[0.0, 1.0]], dtype)
    loss, grad = _kernel(z, wrong, None, "logistic")
    assert loss == pytest.approx(-2 * np.log(eps), rel=1e-6)
    np.testing.assert_array_equal(grad, [[1.0, -1.0]])
    loss, grad = _kernel(z, wrong, None, "softmax")
    assert loss == pytest.approx(-np.log(eps), rel=1e-6)
    np.testing.assert_array_equal(grad, [[1.0, -1.0]])
    right = np.array([[1.0, 0.0]], dtype)
    assert _kernel(z, right, None, "softmax")[0] == pytest.approx(-np.log(1 - eps))


def test_empty_batch_and_read_only_inputs():
    z = np.zeros((0, 3), np.float32)
    assert _kernel(z, z, None, "softmax") == (0.0, pytest.approx(z))
    z = np.ones((2, 3))
    z.flags.writeable = False
    assert _kernel(z, z, None, "identity")[0] == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(y=np.zeros((3, 3))), "y has shape"),
    (dict(grad=np.zeros((2, 2))), "grad has shape"),
    (dict(w=np.ones(2)), "3 rows but 2 sample weights"),
    (dict(w=np.array([1.0, -1.0, 1.0])), "not a non-negative number"),
    (dict(w=np.array([1.0, np.nan, 1.0])), "not a non-negative number"),
    (dict(w=np.zeros(3)), "sum to 0"),
    (dict(output=3), "unknown output code"),
])
def test_bad_input_is_refused(kwargs, match):
    args = dict(z=np.zeros((3, 2)), y=np.zeros((3, 2)), w=None, grad=np.zeros((3, 2)), output=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        _core.output_loss_kernel(args["z"], args["y"], args["w"], args["grad"], args["output"])
