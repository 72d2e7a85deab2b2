"""solver="lbfgs" and loss="poisson": scikit-learn's objective, computed by ckpt's chain."""
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from sklearn import neural_network  # noqa: E402
from sklearn.datasets import make_classification, make_multilabel_classification, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402

from ckpt.estimators import MLPClassifier, MLPRegressor, _PackedObjective  # noqa: E402


def _poisson_targets(n=120, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    return X, rng.poisson(np.exp(0.5 * X[:, 0] - 0.3 * X[:, 1]))


def _cases():
    Xc, yc = make_classification(120, 6, n_informative=4, n_classes=3, random_state=0)
    Xb, yb = make_classification(100, 5, random_state=1)
    Xm, ym = make_multilabel_classification(90, 6, n_classes=3, random_state=0)
    Xr, yr = make_regression(110, 6, n_targets=2, noise=0.1, random_state=0)
    Xp, yp = _poisson_targets()
    return [
        ("multiclass relu", MLPClassifier, Xc, yc, dict(hidden_layer_sizes=(7, 5))),
        ("binary tanh", MLPClassifier, Xb, yb, dict(hidden_layer_sizes=(6,), activation="tanh")),
        ("multilabel logistic", MLPClassifier, Xm, ym,
         dict(hidden_layer_sizes=(5,), activation="logistic")),
        ("2 targets identity", MLPRegressor, Xr, yr / 100,
         dict(hidden_layer_sizes=(4, 4), activation="identity")),
        ("poisson", MLPRegressor, Xp, yp, dict(hidden_layer_sizes=(6,), loss="poisson")),
    ]


CASES = _cases()
IDS = [case[0] for case in CASES]


def _fitted_pair(Estimator, X, y, params, w, max_iter):
    kwargs = dict(solver="lbfgs", random_state=0, alpha=0.3, max_iter=max_iter, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = Estimator(dtype=np.float64, **kwargs).fit(X, y, sample_weight=w)
        theirs = getattr(neural_network, Estimator.__name__)(**kwargs).fit(X, y,
                                                                           sample_weight=w)
    return ours, theirs


def _their_loss_grad(theirs, packed, X, y, w):
    Y = theirs._label_binarizer.transform(y) if hasattr(theirs, "_label_binarizer") else y
    Y = np.asarray(Y, dtype=np.float64).reshape(len(X), -1)
    sizes = [X.shape[1]] + [c.shape[1] for c in theirs.coefs_]
    return theirs._loss_grad_lbfgs(
        packed, X, Y, w, [X] + [None] * (len(sizes) - 1), [None] * (len(sizes) - 1),
        [np.empty((a, b)) for a, b in zip(sizes, sizes[1:])], [np.empty(b) for b in sizes[1:]])


def _our_objective(ours, X, y, w):
    Y = ours._validate_input(X, y, np.float64, True, False)[1]
    ours._set_training(True)   # as during fit: the forward keeps what backward needs
    return _PackedObjective(ours, X, Y, w, ours.alpha)


@pytest.mark.parametrize("name, Estimator, X, y, params", CASES, ids=IDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_and_gradient_are_scikit_learns(name, Estimator, X, y, params, weighted):
    """In float64, at the same packed parameters: scikit-learn's _loss_grad_lbfgs, rtol 1e-12."""
    w = np.random.default_rng(1).uniform(0.2, 2.0, len(X)) if weighted else None
    ours, theirs = _fitted_pair(Estimator, X, y, params, w, max_iter=1)
    objective = _our_objective(ours, X, y, w)
    packed = np.random.default_rng(2).normal(scale=0.5, size=objective.packed().size)
    loss, grad = objective(packed)
    their_loss, their_grad = _their_loss_grad(theirs, packed, X, y, w)
    np.testing.assert_allclose(loss, their_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, their_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name, Estimator, X, y, params", CASES, ids=IDS)
def test_gradient_matches_finite_differences(name, Estimator, X, y, params):
    """Central differences in float64 of the packed objective (L2 term included).

    scikit-learn's squared error is a mean over the n outputs but its gradient is that of
    the sum (delta = p - y): the gradient is n times the loss's, which ckpt keeps (the test
    above); so with several outputs the check runs at alpha=0 against n times the loss.
    """
    w = np.random.default_rng(3).uniform(0.2, 2.0, len(X))
    ours, _ = _fitted_pair(Estimator, X, y, params, w, max_iter=1)
    n_outputs = ours.n_outputs_ if ours.out_activation_ == "identity" else 1
    if n_outputs > 1:
        ours.alpha = 0.0
    objective = _our_objective(ours, X, y, w)
    packed = np.random.default_rng(4).normal(scale=0.5, size=objective.packed().size)
    _, grad = objective(packed)
    grad /= n_outputs
    h = 1e-6
    for i in np.random.default_rng(5).choice(packed.size, size=min(25, packed.size),
                                             replace=False):
        step = np.zeros_like(packed)
        step[i] = h
        numeric = (objective(packed + step)[0] - objective(packed - step)[0]) / (2 * h)
        assert numeric == pytest.approx(grad[i], rel=1e-5, abs=1e-8), i


@pytest.mark.parametrize("name, Estimator, X, y, params", CASES, ids=IDS)
def test_twenty_iterations_end_where_scikit_learns_do(name, Estimator, X, y, params):
    ours, theirs = _fitted_pair(Estimator, X, y, params, None, max_iter=20)
    assert ours.n_iter_ == theirs.n_iter_
    np.testing.assert_allclose(ours.loss_, theirs.loss_, rtol=1e-6)
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    for key in ("loss_curve_", "validation_scores_", "best_loss_"):
        assert not hasattr(ours, key) and not hasattr(theirs, key)


def test_max_iter_max_fun_tol_and_the_warnings_are_scikit_learns():
    X, y = CASES[0][2:4]
    kwargs = dict(solver="lbfgs", hidden_layer_sizes=(6,), random_state=0)
    for extra, match in [(dict(max_iter=3), r"after 3 iteration\(s\)[\s\S]*max_iter=3"),
                         (dict(max_fun=4), "STOP: TOTAL NO. OF F")]:
        n_iter = []
        for model in (MLPClassifier(dtype=np.float64, **kwargs, **extra),
                      neural_network.MLPClassifier(**kwargs, **extra)):
            with pytest.warns(ConvergenceWarning, match=match):
                model.fit(X, y)
            n_iter.append(model.n_iter_)
        assert n_iter[0] == n_iter[1] <= extra.get("max_iter", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        ours = MLPClassifier(tol=10.0, dtype=np.float64, **kwargs).fit(X, y)
        theirs = neural_network.MLPClassifier(tol=10.0, **kwargs).fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_ < 5


def test_partial_fit_is_absent_for_lbfgs():
    for Estimator in (MLPClassifier, MLPRegressor):
        model = Estimator(solver="lbfgs")
        assert not hasattr(model, "partial_fit")
        with pytest.raises(AttributeError, match="has no attribute 'partial_fit'") as info:
            model.partial_fit
        assert "only available for stochastic optimizers. lbfgs is not" in str(
            info.value.__cause__)
        assert hasattr(Estimator(solver="sgd"), "partial_fit")
    assert not hasattr(neural_network.MLPClassifier(solver="lbfgs"), "partial_fit")


def test_memory_budget_holds_the_full_batch_below_plain_backprop():
    X, y = make_classification(3000, 20, n_informative=10, random_state=0)
    params = dict(solver="lbfgs", hidden_layer_sizes=(64,) * 6, max_iter=3, random_state=0,
                  dtype=np.float64)
    budget = 8 * 2**20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = MLPClassifier(checkpoint_every=1, **params).fit(X, y)
        tight = MLPClassifier(memory_budget=budget, **params).fit(X, y)
    report = tight.memory_report_
    assert report["batch_size"] == len(X)
    assert plain.memory_report_["measured_peak_bytes"] > budget
    assert report["peak_activation_bytes_plain"] > budget
    assert report["measured_peak_bytes"] <= budget
    assert report["recomputed_layer_forwards"] > 0
    for a, b in zip(tight.coefs_ + tight.intercepts_, plain.coefs_ + plain.intercepts_):
        np.testing.assert_array_equal(a, b)


def test_poisson_trains_like_scikit_learn_with_adam():
    X, y = _poisson_targets()
    kwargs = dict(loss="poisson", hidden_layer_sizes=(6,), max_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = MLPRegressor(dtype=np.float64, **kwargs).fit(X, y)
        theirs = neural_network.MLPRegressor(**kwargs).fit(X, y)
    assert ours.out_activation_ == theirs.out_activation_ == "exp"
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-10)
    np.testing.assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-9)
    assert (ours.predict(X) > 0).all()


def test_poisson_refuses_negative_targets_and_changes_nothing():
    X, y = _poisson_targets()
    model = MLPRegressor(loss="poisson", max_iter=1)
    for bad in (np.where(np.arange(len(y)) == 3, -1, y), np.zeros(len(y))):
        with pytest.raises(ValueError, match=r"requires non-negative y and sum\(y\) > 0"):
            model.fit(X, bad)
        assert not hasattr(model, "coefs_")
    with pytest.raises(ValueError, match="1 of 120 values are negative"):
        model.fit(X, np.where(np.arange(len(y)) == 3, -1, y))
    with pytest.raises(ValueError, match="loss"):
        MLPRegressor(loss="huber").fit(X, y)


def test_a_warm_start_can_switch_between_lbfgs_and_a_stochastic_solver():
    X, y = CASES[0][2:4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MLPClassifier(solver="lbfgs", hidden_layer_sizes=(6,), max_iter=5,
                              random_state=0, warm_start=True).fit(X, y)
        start = model.coefs_[0].copy()
        model.set_params(solver="adam", max_iter=3, early_stopping=True).fit(X, y)
    assert len(model.loss_curve_) == len(model.validation_scores_) == model.n_iter_ == 3
    assert not np.array_equal(model.coefs_[0], start)
    model.set_params(early_stopping=False).partial_fit(X, y)
    assert len(model.loss_curve_) == 4
