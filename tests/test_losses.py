"""Losses: the fused kernels against the NumPy reference, finite differences, validation."""
import numpy as np
import pytest

from ckpt import _reference_train as ref
from ckpt.losses import get_loss, mse_loss, softmax_cross_entropy

TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}
DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (64, 10), (0, 4)])
def test_cross_entropy_matches_reference(dtype, shape):
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal(shape)).astype(dtype)
    labels = rng.integers(0, shape[1], shape[0])
    loss, grad = softmax_cross_entropy(logits, labels)
    ref_loss, ref_grad = ref.softmax_cross_entropy(logits.astype(np.float64), labels)
    assert grad.dtype == dtype and grad.shape == shape
    np.testing.assert_allclose(loss, ref_loss, **TOL[dtype])
    np.testing.assert_allclose(grad, ref_grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (0, 2)])
def test_mse_matches_reference(dtype, shape):
    rng = np.random.default_rng(1)
    pred = rng.standard_normal(shape).astype(dtype)
    target = rng.standard_normal(shape)
    loss, grad = mse_loss(pred, target)
    ref_loss, ref_grad = ref.mse_loss(pred.astype(np.float64), target.astype(dtype))
    assert grad.dtype == dtype and grad.shape == shape
    np.testing.assert_allclose(loss, ref_loss, **TOL[dtype])
    np.testing.assert_allclose(grad, ref_grad, **TOL[dtype])


def test_mse_is_the_mean_over_all_elements_like_pytorch():
    loss, grad = mse_loss(np.ones((2, 3)), np.zeros((2, 3)))
    assert loss == 1.0
    np.testing.assert_allclose(grad, np.full((2, 3), 2 / 6))
    loss, _ = mse_loss(np.array([[1.0], [3.0]]), np.array([0.0, 0.0]))  # 1-D target, 1 output
    assert loss == 5.0


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4]], np.float32)
    loss, grad = softmax_cross_entropy(logits, np.array([1, 2]))
    expected = (1e4 + np.log(3)) / 2
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-6)


def _finite_difference(fn, x, eps=1e-6):
    numeric = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (fn(up) - fn(down)) / (2 * eps)
    return numeric


def test_cross_entropy_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((6, 4))
    labels = rng.integers(0, 4, 6)
    _, grad = softmax_cross_entropy(logits, labels)
    numeric = _finite_difference(lambda z: softmax_cross_entropy(z, labels)[0], logits)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_mse_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    pred, target = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    _, grad = mse_loss(pred, target)
    numeric = _finite_difference(lambda p: mse_loss(p, target)[0], pred)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_gradient_goes_into_out_and_read_only_inputs_are_accepted():
    logits = np.arange(6, dtype=np.float64).reshape(2, 3)
    logits.flags.writeable = False
    out = np.empty((2, 3))
    _, grad = softmax_cross_entropy(logits, np.array([0, 2]), out=out)
    assert grad is out
    with pytest.raises(ValueError, match="out must be"):
        softmax_cross_entropy(logits, np.array([0, 2]), out=np.empty((2, 3), np.float32))


@pytest.mark.parametrize("logits, labels, error, match", [
    (np.zeros((2, 3)), np.array([0, 3]), ValueError, "label 3 of row 1 is outside the 3 classes"),
    (np.zeros((2, 3)), np.array([-1, 0]), ValueError, "label -1 of row 0"),
    (np.zeros((2, 3)), np.array([0.0, 1.0]), TypeError, "labels must be integers"),
    (np.zeros((2, 3)), np.array([0, 1, 2]), ValueError, "2 rows but there are 3 labels"),
    (np.zeros((2, 3)), np.array([[0], [1]]), ValueError, "labels must be 1-D"),
    (np.zeros(3), np.array([0]), ValueError, "logits must be 2-D"),
    (np.zeros((2, 3), np.int64), np.array([0, 1]), TypeError, "float32 or float64"),
    ([[0.0, 1.0]], np.array([0]), TypeError, "numpy array"),
    (np.zeros((2, 0)), np.array([0, 0]), ValueError, "at least one class"),
])
def test_cross_entropy_rejects_bad_input(logits, labels, error, match):
    with pytest.raises(error, match=match):
        softmax_cross_entropy(logits, labels)


def test_mse_rejects_bad_input():
    with pytest.raises(ValueError, match=r"target has shape \(2, 2\), expected \(2, 3\)"):
        mse_loss(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(TypeError, match="real numbers"):
        mse_loss(np.zeros((2, 1)), np.array(["a", "b"]))


def test_get_loss():
    assert get_loss("mse") is mse_loss
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        get_loss("hinge")


def test_out_overlapping_an_input_is_refused_and_untouched():
    logits = np.arange(6, dtype=np.float64).reshape(2, 3)
    before = logits.copy()
    with pytest.raises(ValueError, match="out shares memory with logits"):
        softmax_cross_entropy(logits, np.array([0, 2]), out=logits)
    np.testing.assert_array_equal(logits, before)
    pred = np.zeros((2, 3))
    target = np.ones((4, 3))
    with pytest.raises(ValueError, match="out shares memory with pred"):
        mse_loss(pred, target[:2], out=pred)
    with pytest.raises(ValueError, match="out shares memory with target"):
        mse_loss(pred, target[2:], out=target[2:])
    # A separate buffer of the same values is fine, and gives the true loss.
    loss, _ = mse_loss(pred, target[:2], out=np.empty((2, 3)))
    assert loss == 1.0
