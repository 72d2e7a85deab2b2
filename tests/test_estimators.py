"""ckpt.MLPClassifier and ckpt.MLPRegressor: scikit-learn's checks, its semantics, round trips."""
import copy
import importlib
import io
import numbers
import os
import pickle
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

import joblib  # noqa: E402
from sklearn import neural_network  # noqa: E402
from sklearn.datasets import make_classification, make_multilabel_classification, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import (  # noqa: E402
    check_sample_weight_equivalence_on_dense_data,
    parametrize_with_checks,
)

import ckpt  # noqa: E402
from ckpt.estimators import MLPClassifier, MLPRegressor  # noqa: E402

@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@parametrize_with_checks(
    [MLPClassifier(hidden_layer_sizes=(32,), max_iter=100, learning_rate_init=0.01, dtype=None),
     MLPRegressor(hidden_layer_sizes=(32,), max_iter=100, learning_rate_init=0.01, dtype=None),
     MLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=50, dtype=None)])
def test_scikit_learn_checks(estimator, check):
    """dtype=None (scikit-learn's dtypes): every check passes, none expected to fail."""
    check(estimator)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_sample_weight_equivalence_in_float64(Estimator):
    check_sample_weight_equivalence_on_dense_data(
        Estimator.__name__, Estimator(hidden_layer_sizes=(16,), max_iter=50, dtype=np.float64))


# ---------------------------------------------------------------------------- data
def _classification(n_classes=3, n=120, seed=0):
    X, y = make_classification(n, 6, n_informative=4, n_classes=n_classes, random_state=seed)
    return X, y


def _regression(n_targets=1, n=150, seed=0):
    X, y = make_regression(n, 6, n_targets=n_targets, noise=0.1, random_state=seed)
    return X, y / 100


def _multilabel(n=120, seed=0):
    return make_multilabel_classification(n, 6, n_classes=3, random_state=seed)


# ---------------------------------------------------------------------------- scikit-learn's maths
SAME_AS_SKLEARN = [
    ("adam, multiclass, L2", MLPClassifier, _classification,
     dict(hidden_layer_sizes=(12, 12), max_iter=6, alpha=0.01, batch_size=32)),
    ("sgd invscaling, binary, logistic units", MLPClassifier, lambda: _classification(2),
     dict(hidden_layer_sizes=(10,), solver="sgd", learning_rate="invscaling",
          learning_rate_init=0.1, max_iter=6, activation="logistic")),
    ("sgd adaptive, plain momentum, regression", MLPRegressor, _regression,
     dict(hidden_layer_sizes=(10,), solver="sgd", learning_rate="adaptive", tol=0.5,
          n_iter_no_change=1, momentum=0.5, nesterovs_momentum=False, max_iter=8,
          batch_size=40)),
    ("multilabel, tanh", MLPClassifier, _multilabel,
     dict(hidden_layer_sizes=(8,), activation="tanh", max_iter=5)),
    ("early stopping, 2 outputs", MLPRegressor, lambda: _regression(2),
     dict(hidden_layer_sizes=(8,), early_stopping=True, n_iter_no_change=2, max_iter=8,
          shuffle=False)),
    ("identity hidden units, momentum 1", MLPRegressor, _regression,
     dict(hidden_layer_sizes=(4,), activation="identity", solver="sgd", momentum=1.0,
          learning_rate_init=1e-4, max_iter=3)),
]


@pytest.mark.parametrize("name, Estimator, data, params", SAME_AS_SKLEARN,
                         ids=[case[0] for case in SAME_AS_SKLEARN])
@pytest.mark.parametrize("weighted", [False, True])
def test_float64_training_is_scikit_learns(name, Estimator, data, params, weighted):
    """Same initialisation, shuffling, loss, penalty and updates: the same numbers."""
    X, y = data()
    w = np.random.default_rng(0).uniform(0.2, 2.0, len(X)) if weighted else None
    Sklearn = getattr(neural_network, Estimator.__name__)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = Estimator(random_state=3, dtype=np.float64, **params).fit(X, y, sample_weight=w)
        theirs = Sklearn(random_state=3, **params).fit(X, y, sample_weight=w)
    assert ours.n_iter_ == theirs.n_iter_ and ours.t_ == theirs.t_
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-10)
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    if theirs.validation_scores_ is not None:
        np.testing.assert_allclose(ours.validation_scores_, theirs.validation_scores_,
                                   rtol=1e-9)
    method = "predict_proba" if Estimator is MLPClassifier else "predict"
    np.testing.assert_allclose(getattr(ours, method)(X), getattr(theirs, method)(X),
                               rtol=1e-9, atol=1e-12)


def _kind(value):
    """A value's type and shape, with scikit-learn's float64 where ckpt has float32."""
    if isinstance(value, np.ndarray):
        return ("array", value.shape, "f" if value.dtype.kind == "f" else value.dtype.kind)
    if isinstance(value, list):
        return ("list", [_kind(v) for v in value])
    if isinstance(value, (bool, np.bool_, str, type(None))):
        return type(value).__name__
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "real"
    return type(value).__name__


ATTRIBUTE_CASES = [
    ("binary", MLPClassifier, lambda: _classification(2), {}),
    ("multiclass", MLPClassifier, _classification, {}),
    ("multilabel", MLPClassifier, _multilabel, {}),
    ("string labels, early stopping", MLPClassifier,
     lambda: (_classification()[0], np.array(["a", "b", "c"])[_classification()[1]]),
     dict(early_stopping=True)),
    ("regression", MLPRegressor, _regression, {}),
    ("2 targets, early stopping", MLPRegressor, lambda: _regression(2),
     dict(early_stopping=True)),
]


@pytest.mark.parametrize("name, Estimator, data, params", ATTRIBUTE_CASES,
                         ids=[case[0] for case in ATTRIBUTE_CASES])
def test_fitted_attributes_match_scikit_learns(name, Estimator, data, params):
    X, y = data()
    Sklearn = getattr(neural_network, Estimator.__name__)
    kwargs = dict(hidden_layer_sizes=(7, 5), max_iter=4, random_state=0, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = Estimator(**kwargs).fit(X, y)
        theirs = Sklearn(**kwargs).fit(X, y)
    public = sorted(k for k in vars(theirs) if k.endswith("_") and not k.startswith("_"))
    assert "coefs_" in public and "n_iter_" in public
    for key in public:
        assert _kind(getattr(ours, key)) == _kind(getattr(theirs, key)), key
    for key in ("classes_", "n_outputs_", "n_layers_", "out_activation_", "n_features_in_"):
        if hasattr(theirs, key):
            np.testing.assert_array_equal(getattr(ours, key), getattr(theirs, key))
    assert all(c.dtype == np.float32 for c in ours.coefs_ + ours.intercepts_)
    assert set(ours.memory_report_) >= {"peak_activation_bytes", "peak_activation_bytes_plain",
                                        "recomputed_layer_forwards", "recompute_flops_fraction"}


# ---------------------------------------------------------------------------- round trips
def _joblib(obj):
    buf = io.BytesIO()
    joblib.dump(obj, buf)
    buf.seek(0)
    return joblib.load(buf)


ROUND_TRIPS = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "deepcopy": copy.deepcopy,
               "joblib": _joblib}


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("Estimator, data", [(MLPClassifier, _classification),
                                             (MLPRegressor, _regression)])
def test_round_trip_predicts_and_trains_identically(how, Estimator, data):
    X, y = data()
    model = Estimator(hidden_layer_sizes=(16,) * 4, max_iter=3, random_state=0,
                      checkpoint_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y)
    clone = ROUND_TRIPS[how](model)
    np.testing.assert_array_equal(clone.predict(X), model.predict(X))
    # coefs_ are the copied network's own arrays again.
    assert all(c is layer.W for c, layer in zip(clone.coefs_, clone._model.layers))
    assert clone.memory_report_ == model.memory_report_
    for estimator in (model, clone):
        estimator.partial_fit(X, y)
        estimator.partial_fit(X, y)
    for a, b in zip(model.coefs_ + model.intercepts_, clone.coefs_ + clone.intercepts_):
        np.testing.assert_array_equal(a, b)
    assert clone.t_ == model.t_ and clone.loss_ == model.loss_


def _same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and (a == b or (a != a and b != b))


NEW_PARAMETER_CASES = [
    ("lbfgs, max_fun, dtype=None", MLPClassifier, _classification,
     dict(solver="lbfgs", max_fun=500, dtype=None, max_iter=5), {}),
    ("class_weight dict, validation_data", MLPClassifier, _classification,
     dict(class_weight={0: 2.0, 1: 0.5}, max_iter=3), dict(validation_data=True)),
    ("balanced, early stopping", MLPClassifier, _classification,
     dict(class_weight="balanced", early_stopping=True, max_iter=3), {}),
    ("poisson, validation_data", MLPRegressor, lambda: (_regression()[0], np.abs(_regression()[1])),
     dict(loss="poisson", max_iter=3), dict(validation_data=True)),
    ("sparse input", MLPRegressor, lambda: (__import__("scipy.sparse").sparse.csr_matrix(
        _regression()[0]), _regression()[1]), dict(max_iter=3, dtype=None), {}),
    ("sparse input, dropout", MLPClassifier, lambda: (__import__("scipy.sparse").sparse.csc_array(
        _classification()[0]), _classification()[1]), dict(max_iter=3, dropout=0.2), {}),
]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("name, Estimator, data, params, fit_kwargs", NEW_PARAMETER_CASES,
                         ids=[case[0] for case in NEW_PARAMETER_CASES])
def test_new_parameters_and_fitted_attributes_round_trip(name, Estimator, data, params,
                                                         fit_kwargs):
    """clone keeps every parameter (the new ones included); pickle, deepcopy and joblib keep
    every fitted attribute, and the copy predicts and trains on like the original."""
    X, y = data()
    model = Estimator(hidden_layer_sizes=(6,), random_state=0, **params)
    cloned = sklearn.base.clone(model)
    assert _same(cloned.get_params(), model.get_params())
    kwargs = {"validation_data": (X[:40], y[:40])} if fit_kwargs else {}
    model.fit(X, y, **kwargs)
    fitted = sorted(k for k in vars(model) if k.endswith("_") and not k.startswith("_"))
    assert {"coefs_", "n_iter_", "loss_", "memory_report_"} <= set(fitted)
    if fit_kwargs:
        assert len(model.validation_loss_curve_) == model.n_iter_
    for how, copy_of in sorted(ROUND_TRIPS.items()):
        copied = copy_of(model)
        for key in fitted:
            assert _same(getattr(copied, key), getattr(model, key)), (how, key)
        assert _same(copied.get_params(), model.get_params())
        np.testing.assert_array_equal(copied.predict(X), model.predict(X))
    if hasattr(model, "partial_fit") and not params.get("early_stopping"):
        for how, copy_of in sorted(ROUND_TRIPS.items()):
            copied = copy_of(model)
            if "_rest" in vars(model) and model._rest is not None:
                # The sparse path's chain shares the copy's layers, not the original's.
                assert copied._rest.layers[0] is copied._model.layers[1]
            for estimator in (model, copied):
                estimator.partial_fit(X, y)
            np.testing.assert_array_equal(copied.coefs_[0], model.coefs_[0])


def test_grid_search_with_two_jobs_in_a_pipeline():
    X, y = _classification(n=150)
    pipe = make_pipeline(StandardScaler(),
                         MLPClassifier(max_iter=40, random_state=0, learning_rate_init=0.01))
    grid = GridSearchCV(pipe, {"mlpclassifier__hidden_layer_sizes": [(8,), (16, 16)],
                               "mlpclassifier__alpha": [1e-4, 1e-2]}, cv=2, n_jobs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        grid.fit(X, y)
    assert len(grid.cv_results_["mean_test_score"]) == 4
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()
    assert grid.best_estimator_.score(X, y) > 0.8


# ---------------------------------------------------------------------------- bad input
def test_unfitted_estimators_raise_not_fitted_error():
    X, _ = _classification()
    for method in ("predict", "predict_proba", "predict_log_proba"):
        with pytest.raises(NotFittedError):
            getattr(MLPClassifier(), method)(X)
    with pytest.raises(NotFittedError):
        MLPRegressor().predict(X)


def test_bad_data_gives_scikit_learns_errors():
    X, y = _classification()
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        MLPClassifier(max_iter=2).fit(bad, y)
    model = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2)
    with pytest.warns(ConvergenceWarning):
        model.fit(X, y)
    with pytest.raises(ValueError, match="NaN"):
        model.predict(bad)
    with pytest.raises(ValueError, match="5 features, but MLPClassifier is expecting 6"):
        model.predict(X[:, :5])
    with pytest.raises(ValueError, match="Unknown label type"):
        MLPClassifier(max_iter=2).fit(X, np.linspace(0, 1, len(X)))
    with pytest.raises(ValueError, match="5 features"):
        model.partial_fit(X[:, :5], y)


@pytest.mark.parametrize("params, error, match", [
    (dict(solver="newton"), ValueError, "solver"),
    (dict(max_fun=0), ValueError, "max_fun"),
    (dict(solver="lbfgs", dropout=0.5), ValueError, "stochastic solver"),
    (dict(class_weight="uniform"), ValueError, "class_weight"),
    (dict(class_weight={0: -1.0}), ValueError, "class_weight"),
    (dict(residual=True, hidden_layer_sizes=(8, 16)), ValueError, "hidden_layer_sizes"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(hidden_layer_sizes=(4, 0)), ValueError, "hidden_layer_sizes"),
    (dict(activation="swish"), ValueError, "activation"),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(learning_rate="cyclic"), ValueError, "learning_rate"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(beta_2=1.0), ValueError, "beta_2"),
    (dict(validation_fraction=1.0), ValueError, "validation_fraction"),
    (dict(n_iter_no_change=0), ValueError, "n_iter_no_change"),
    (dict(shuffle="yes"), TypeError, "shuffle"),
    (dict(checkpoint_every=2, memory_budget="1MiB"), ValueError, "at most one"),
    (dict(memory_budget="lots"), ValueError, "memory_budget"),
    (dict(dtype=np.float16), ValueError, "dtype"),
    (dict(n_threads=0), ValueError, "n_threads"),
])
def test_bad_parameters_are_refused_and_change_nothing(params, error, match):
    X, y = _classification()
    model = MLPClassifier(**params)
    with pytest.raises(error, match=match):
        model.fit(X, y)
    assert not hasattr(model, "coefs_") and not hasattr(model, "n_iter_")


def test_negative_or_misshapen_sample_weights_are_refused():
    X, y = _regression()
    for w, match in [(-np.ones(len(X)), "non-negative"), (np.ones(3), "shape"),
                     (np.zeros(len(X)), "zero for every sample")]:
        with pytest.raises(ValueError, match=match):
            MLPRegressor(max_iter=1).fit(X, y, sample_weight=w)


# ---------------------------------------------------------------------------- behaviour
def test_inputs_are_cast_to_the_estimators_dtype():
    X, y = _classification()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for X_in in (X, X.astype(np.float32), np.round(10 * X).astype(np.int64), X.tolist()):
            model = MLPClassifier(hidden_layer_sizes=(5,), max_iter=2).fit(X_in, y)
            assert model.coefs_[0].dtype == np.float32
            assert model.predict_proba(X_in).dtype == np.float32
        model = MLPRegressor(hidden_layer_sizes=(5,), max_iter=2, dtype="float64").fit(X, y)
        assert model.coefs_[0].dtype == np.float64


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("X_dtype, trained", [(np.float32, np.float32), (np.float64, np.float64),
                                              (np.int64, np.float64), (np.float16, np.float64)])
def test_dtype_none_follows_scikit_learn(X_dtype, trained):
    """float32 input trains in float32, anything else in float64; the fitted arrays and
    the outputs come back in that dtype, as scikit-learn's."""
    X, y = _regression()
    X = (X * 10).astype(X_dtype)
    theirs = neural_network.MLPRegressor(hidden_layer_sizes=(5,), max_iter=2).fit(X, y)
    for solver in ("adam", "lbfgs"):
        ours = MLPRegressor(hidden_layer_sizes=(5,), max_iter=2, dtype=None,
                            solver=solver).fit(X, y)
        assert theirs.coefs_[0].dtype == trained
        assert {a.dtype for a in ours.coefs_ + ours.intercepts_} == {np.dtype(trained)}
        assert ours.predict(X).dtype == trained
        Xc, yc = _classification()
        clf = MLPClassifier(hidden_layer_sizes=(5,), max_iter=2, dtype=None,
                            solver=solver).fit(Xc.astype(X_dtype), yc)
        assert clf.predict_proba(Xc.astype(X_dtype)).dtype == trained
        assert clf.coefs_[0].dtype == trained


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("assigned", [np.float64, np.float32])
def test_assigned_coefs_are_cast_into_the_network(assigned):
    """coefs_ assigned (in either dtype) before partial_fit, warm_start or predict are what
    the network continues from, cast to its dtype; coefs_ are its arrays again after."""
    X, y = _regression()
    reference = neural_network.MLPRegressor(hidden_layer_sizes=(5,), max_iter=3,
                                            random_state=1).fit(X, y)
    for how in ("partial_fit", "warm_start", "predict"):
        ours = MLPRegressor(hidden_layer_sizes=(5,), max_iter=1, random_state=0,
                            warm_start=how == "warm_start").fit(X, y)
        ours.coefs_ = [c.astype(assigned) for c in reference.coefs_]
        ours.intercepts_ = [b.astype(assigned) for b in reference.intercepts_]
        if how == "predict":
            np.testing.assert_allclose(ours.predict(X), reference.predict(X), rtol=1e-4,
                                       atol=1e-5)
        else:
            start = [c.astype(np.float32) for c in reference.coefs_]
            getattr(ours, "fit" if how == "warm_start" else how)(X, y)
            # One epoch from the assigned weights: close to them, not to the old ones.
            assert np.abs(ours.coefs_[0] - start[0]).max() < 0.05
        assert all(c.dtype == np.float32 for c in ours.coefs_ + ours.intercepts_)
        assert all(c is layer.W for c, layer in zip(ours.coefs_, ours._model.layers))
    ours.coefs_ = [np.zeros((3, 3))] + ours.coefs_[1:]
    with pytest.raises(ValueError, match=r"layer 0 has coefs_ of shape \(6, 5\)"):
        ours.partial_fit(X, y)


def test_alpha_is_part_of_the_loss():
    X, y = _regression()
    losses = {}
    for alpha in (0.0, 10.0):
        model = MLPRegressor(hidden_layer_sizes=(6,), max_iter=1, alpha=alpha, random_state=0,
                             batch_size=len(X), shuffle=False, dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X, y)
        losses[alpha] = model.loss_
    # One full batch: the penalty is 0.5 alpha ||W||^2 / n, with the initial weights.
    init = MLPRegressor(hidden_layer_sizes=(6,), random_state=0, dtype=np.float64)
    init._initialize(init._check_params(), [X.shape[1], 6, 1], np.random.RandomState(0))
    penalty = 0.5 * 10.0 * sum((c ** 2).sum() for c in init.coefs_) / len(X)
    assert losses[10.0] - losses[0.0] == pytest.approx(penalty, rel=1e-9)


def test_convergence_warning_only_when_max_iter_stops_training():
    X, y = _classification()
    with pytest.warns(ConvergenceWarning, match="Maximum iterations"):
        MLPClassifier(hidden_layer_sizes=(4,), max_iter=2).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = MLPClassifier(hidden_layer_sizes=(4,), max_iter=50, tol=10.0,
                              n_iter_no_change=2).fit(X, y)
    # The first epoch improves on inf; the next three do not by tol: stop after epoch 4.
    assert model.n_iter_ == 4


def test_partial_fit_and_warm_start():
    X, y = _classification()
    model = MLPClassifier(hidden_layer_sizes=(6,), random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        model.partial_fit(X, y)
    model = MLPClassifier(hidden_layer_sizes=(6,), random_state=0)
    model.partial_fit(X[:60], y[:60], classes=[0, 1, 2])
    model.partial_fit(X[60:], y[60:])
    assert model.n_iter_ == 1 and model.t_ == len(X)
    with pytest.raises(ValueError, match="not the same as on last call"):
        model.partial_fit(X, y, classes=[0, 1])
    with pytest.raises(ValueError, match="early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X, y, classes=[0, 1, 2])
    # warm_start continues from the fitted weights, as scikit-learn's does.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = MLPClassifier((6,), max_iter=2, warm_start=True, random_state=1,
                             dtype=np.float64)
        theirs = neural_network.MLPClassifier((6,), max_iter=2, warm_start=True,
                                              random_state=1)
        for _ in range(2):
            ours.fit(X, y)
            theirs.fit(X, y)
    np.testing.assert_allclose(ours.coefs_[0], theirs.coefs_[0], rtol=1e-9, atol=1e-12)
    ours.set_params(hidden_layer_sizes=(7,))
    with pytest.raises(ValueError, match="continue the fitted network"):
        ours.fit(X, y)


def test_memory_budget_and_report():
    X, y = _classification(n=200)
    params = dict(hidden_layer_sizes=(32,) * 8, max_iter=2, batch_size=64, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = MLPClassifier(checkpoint_every=1, **params).fit(X, y)
        sqrt = MLPClassifier(**params).fit(X, y)
        budget = MLPClassifier(memory_budget="40KiB", **params).fit(X, y)
    # Checkpointing changes memory and compute, not the arithmetic.
    np.testing.assert_array_equal(sqrt.coefs_[3], plain.coefs_[3])
    np.testing.assert_array_equal(budget.coefs_[3], plain.coefs_[3])
    rp, rs, rb = plain.memory_report_, sqrt.memory_report_, budget.memory_report_
    assert rp["recomputed_layer_forwards"] == 0
    assert rp["peak_activation_bytes"] == rp["peak_activation_bytes_plain"]
    assert rs["checkpoint_every"] == 3 and rs["recomputed_layer_forwards"] > 0
    assert rs["peak_activation_bytes"] < rs["peak_activation_bytes_plain"]
    assert rb["memory_budget"] == 40 * 1024
    assert rb["peak_activation_bytes"] + 2 * 64 * 32 * 4 <= 40 * 1024
    assert rs["measured_peak_bytes"] < rp["measured_peak_bytes"]


def test_verbose_prints_progress(capsys):
    X, y = _regression()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        MLPRegressor(hidden_layer_sizes=(4,), max_iter=2, verbose=True).fit(X, y)
    out = capsys.readouterr().out
    assert "Iteration 1, loss = " in out and "Iteration 2, loss = " in out


def test_n_threads_is_restored():
    X, y = _regression()
    before = ckpt.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MLPRegressor(hidden_layer_sizes=(4,), max_iter=1, n_threads=1).fit(X, y)
    model.predict(X)
    assert ckpt.get_num_threads() == before


def _blas_threads_by_library():
    """{"ckpt": ckpt's OpenBLAS threads, "others": [every other BLAS library's]}."""
    from threadpoolctl import threadpool_info
    import scipy_openblas32
    ours = os.path.realpath(scipy_openblas32.get_lib_dir()) + os.sep
    infos = [info for info in threadpool_info() if info["user_api"] == "blas"]
    return {"ckpt": ckpt.get_num_threads(),
            "others": [info["num_threads"] for info in infos
                       if not os.path.realpath(info["filepath"]).startswith(ours)]}


@pytest.mark.parametrize("Estimator, data", [(MLPClassifier, _classification),
                                             (MLPRegressor, _regression)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fit_holds_numpys_blas_at_one_thread_and_restores_it(Estimator, data, dtype,
                                                            monkeypatch):
    # NumPy's OpenBLAS threads spin after a threaded call and fought ckpt's for the cores:
    # during fit every BLAS but ckpt's runs on one thread, and gets its count back after.
    from threadpoolctl import threadpool_limits
    from ckpt.checkpoint import SegmentCheckpointer
    seen = []
    forward = SegmentCheckpointer.forward

    def observed_forward(self, *args, **kwargs):
        seen.append(_blas_threads_by_library())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(SegmentCheckpointer, "forward", observed_forward)
    X, y = data()
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads_by_library()
        if not before["others"] or max(before["others"]) < 2:
            pytest.skip("NumPy's BLAS cannot run 2 threads here (one CPU?)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = Estimator(hidden_layer_sizes=(8,), max_iter=2, batch_size=40, dtype=dtype,
                              n_threads=2).fit(X, y)
        assert _blas_threads_by_library() == before
        model.predict(X)
        assert _blas_threads_by_library() == before
    assert len(seen) >= 2
    for during in seen:
        assert during["others"] == [1] * len(before["others"])
        assert during["ckpt"] == 2


def test_overlapping_fits_restore_the_blas_settings_from_before_the_first(restore_num_threads):
    """Fits in two threads share the process-wide BLAS settings: whatever order they end in,
    the settings from before the first come back (each restoring what it saw on entry left
    NumPy's BLAS at one thread when the first fit ended first)."""
    from threadpoolctl import threadpool_limits
    from ckpt.estimators import _OTHER_BLAS_AT_ONE, _blas_threads
    with threadpool_limits(limits=2, user_api="blas"):
        ckpt.set_num_threads(2)
        before = _blas_threads_by_library()
        # A enters, B enters, A leaves, B leaves: not nested.
        a_others, a_ckpt = _OTHER_BLAS_AT_ONE.held(), _blas_threads(1)
        a_others.__enter__(), a_ckpt.__enter__()
        b_others, b_ckpt = _OTHER_BLAS_AT_ONE.held(), _blas_threads(2)
        b_others.__enter__(), b_ckpt.__enter__()
        a_ckpt.__exit__(None, None, None), a_others.__exit__(None, None, None)
        during = _blas_threads_by_library()
        assert during["others"] == [1] * len(before["others"]) and during["ckpt"] == 2
        b_ckpt.__exit__(None, None, None), b_others.__exit__(None, None, None)
        assert _blas_threads_by_library() == before
        # Two real fits in threads, the first much shorter.
        X, y = _classification()
        errors = []

        def fit(max_iter):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    MLPClassifier(hidden_layer_sizes=(8,), max_iter=max_iter, batch_size=40,
                                  n_threads=1).fit(X, y)
            except BaseException as error:      # pragma: no cover - reported below
                errors.append(error)

        threads = [threading.Thread(target=fit, args=(n,)) for n in (1, 20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert _blas_threads_by_library() == before


def test_importing_ckpt_does_not_import_scikit_learn():
    code = "import sys, ckpt; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_estimators_load_lazily_and_name_the_extra(monkeypatch):
    assert "MLPClassifier" not in ckpt.__all__
    assert ckpt.MLPClassifier is MLPClassifier and ckpt.MLPRegressor is MLPRegressor
    with pytest.raises(AttributeError):
        ckpt.MLPPerceptron
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.delitem(sys.modules, "ckpt.estimators")
    monkeypatch.delattr(ckpt, "estimators")
    with pytest.raises(ImportError, match=r"ckpt-cpu\[sklearn\]"):
        ckpt.MLPClassifier
    monkeypatch.undo()
    importlib.import_module("ckpt.estimators")


def test_an_old_scikit_learn_is_named(monkeypatch):
    monkeypatch.setattr(sklearn, "__version__", "1.5.2")
    monkeypatch.delitem(sys.modules, "ckpt.estimators")
    monkeypatch.delattr(ckpt, "estimators")
    with pytest.raises(ImportError, match=r"found 1\.5\.2.*ckpt-cpu\[sklearn\]"):
        ckpt.MLPRegressor
    monkeypatch.undo()
    assert importlib.import_module("ckpt.estimators").MLPRegressor is MLPRegressor


@pytest.mark.parametrize("params", [dict(residual=True, hidden_layer_sizes=(16, 16, 16)),
                                    dict(dropout=0.2, hidden_layer_sizes=(16, 16)),
                                    dict(residual=True, dropout=0.1, hidden_layer_sizes=(16,))])
def test_residual_and_dropout_networks_train_and_predict_deterministically(params):
    import warnings
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = X[:300] / 16
    y = y[:300]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # ConvergenceWarning at max_iter
        a = ckpt.MLPClassifier(max_iter=5, random_state=0, **params).fit(X, y)
        b = ckpt.MLPClassifier(max_iter=5, random_state=0, **params).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))   # seeded, eval mode
    np.testing.assert_array_equal(a.predict_proba(X), a.predict_proba(X))
    assert a.loss_curve_[-1] < a.loss_curve_[0]                # it learns
    dense = 2 * len(params["hidden_layer_sizes"]) + 2 if params.get("residual") \
        else len(params["hidden_layer_sizes"]) + 1
    assert len(a.coefs_) == dense and a.coefs_[-1].shape == (16, 10)
    if params.get("residual"):
        assert any(type(layer).__name__ == "Residual" for layer in a._model.layers)
