"""Sparse X: the first layer's X @ W and X.T @ G on the sparse matrix, the rest compiled."""
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
sp = pytest.importorskip("scipy.sparse")

from sklearn.exceptions import ConvergenceWarning  # noqa: E402

from ckpt.estimators import MLPClassifier, MLPRegressor, _PackedObjective  # noqa: E402

FORMATS = {"csr_matrix": sp.csr_matrix, "csc_matrix": sp.csc_matrix,
           "csr_array": sp.csr_array, "csc_array": sp.csc_array}


def _sparse_problem(n=2000, d=500, density=0.01, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.random(n, d, density=density, format="csr", random_state=seed,
                  data_rvs=lambda k: rng.normal(size=k))
    w = rng.normal(size=d)
    score = X @ w
    return X, (score > np.median(score)).astype(int), score


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-9), (np.float32, 2e-4)])
def test_sparse_training_equals_dense_training(fmt, dtype, rtol):
    X, y, _ = _sparse_problem()
    Xs = FORMATS[fmt](X.astype(dtype))
    Xd = X.toarray().astype(dtype)
    kwargs = dict(hidden_layer_sizes=(16, 8), max_iter=3, random_state=0, dtype=dtype,
                  batch_size=256, activation="tanh")
    dense = MLPClassifier(**kwargs).fit(Xd, y)
    sparse = MLPClassifier(**kwargs).fit(Xs, y)
    for a, b in zip(sparse.coefs_ + sparse.intercepts_, dense.coefs_ + dense.intercepts_):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-2)
    np.testing.assert_allclose(sparse.loss_curve_, dense.loss_curve_, rtol=rtol)
    np.testing.assert_allclose(sparse.predict_proba(Xs), dense.predict_proba(Xd), rtol=rtol,
                               atol=rtol * 1e-2)
    np.testing.assert_allclose(dense.predict_proba(Xs), dense.predict_proba(Xd), rtol=rtol,
                               atol=rtol * 1e-2)
    # The report is of the compiled chain after the first layer: 500 input columns are not in it.
    assert sparse.memory_report_["first_layer_outside_chain"]
    assert not dense.memory_report_["first_layer_outside_chain"]
    assert sparse.memory_report_["n_layers"] == dense.memory_report_["n_layers"] - 1
    assert 0 < sparse.memory_report_["measured_peak_bytes"] < dense.memory_report_[
        "measured_peak_bytes"]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("activation", ["relu", "logistic", "gelu", "silu"])
def test_sparse_lbfgs_and_regression_equal_dense(activation):
    X, _, score = _sparse_problem(n=600, d=200, density=0.03)
    kwargs = dict(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=15, random_state=0,
                  dtype=np.float64, activation=activation)
    dense = MLPRegressor(**kwargs).fit(X.toarray(), score)
    sparse = MLPRegressor(**kwargs).fit(X.tocsc(), score)
    assert sparse.n_iter_ == dense.n_iter_
    np.testing.assert_allclose(sparse.coefs_[0], dense.coefs_[0], rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(sparse.predict(X), dense.predict(X.toarray()), rtol=1e-7,
                               atol=1e-10)


def test_sparse_gradient_matches_finite_differences_and_dense():
    X, _, score = _sparse_problem(n=300, d=80, density=0.05)
    model = MLPRegressor(hidden_layer_sizes=(6, 5), solver="lbfgs", max_iter=1, alpha=0.1,
                         random_state=0, dtype=np.float64, activation="tanh")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, score)
    model._set_training(True)
    Y = score.reshape(-1, 1)
    sparse = _PackedObjective(model, X, Y, None, 0.1)
    dense = _PackedObjective(model, X.toarray(), Y, None, 0.1)
    packed = np.random.default_rng(0).normal(scale=0.3, size=sparse.packed().size)
    loss, grad = sparse(packed)
    dense_loss, dense_grad = dense(packed)
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-10, atol=1e-14)
    h = 1e-6
    for i in list(range(0, 80 * 6, 37)) + [grad.size - 1]:   # first-layer weights, last bias
        step = np.zeros_like(packed)
        step[i] = h
        numeric = (sparse(packed + step)[0] - sparse(packed - step)[0]) / (2 * h)
        assert numeric == pytest.approx(grad[i], rel=1e-5, abs=1e-9), i


def test_integer_sparse_input_is_refused_and_changes_nothing():
    X, y, _ = _sparse_problem(n=100, d=20, density=0.1)
    model = MLPClassifier(max_iter=1)
    for bad in (X.astype(np.int64), X.astype(bool).tocsc()):
        with pytest.raises(TypeError, match="sparse X must hold floating-point values"):
            model.fit(bad, y)
        assert not hasattr(model, "coefs_")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y)
    with pytest.raises(TypeError, match="got dtype int32"):
        model.predict(X.astype(np.int32))


CHILD = textwrap.dedent("""
    import resource, sys, warnings
    import numpy as np
    import scipy.sparse as sp
    from ckpt.estimators import MLPClassifier
    n, d, density = 100_000, 50_000, 0.001
    per_row = int(d * density)
    rng = np.random.default_rng(0)
    indices = np.sort(rng.integers(0, d, size=(n, per_row)), axis=1).astype(np.int32).ravel()
    indptr = np.arange(0, n * per_row + 1, per_row, dtype=np.int64)
    X = sp.csr_matrix((rng.random(n * per_row, dtype=np.float32), indices, indptr), (n, d))
    y = (np.asarray(X[:, :5000].sum(axis=1)).ravel() > 2.5).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MLPClassifier(hidden_layer_sizes=(16,), max_iter=1, batch_size=2000,
                              random_state=0).fit(X, y)
    accuracy = (model.predict(X) == y).mean()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak, n * d * X.dtype.itemsize, accuracy)
""")


def test_training_on_a_large_sparse_matrix_never_densifies_it():
    """100,000 x 50,000 at 0.1% density (20 GB dense in float32): the child's peak resident
    memory stays below 10% of the dense size."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    peak, dense_bytes, accuracy = out.stdout.split()
    assert int(peak) <= 0.1 * int(dense_bytes), (peak, dense_bytes)
    assert float(accuracy) > 0.5
