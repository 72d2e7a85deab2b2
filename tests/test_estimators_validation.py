"""fit(validation_data=), the validation curves, early stopping on them, class_weight, and
scikit-learn's messages for a diverging fit and a too-small stratified split."""

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from sklearn import neural_network  # noqa: E402
from sklearn.datasets import make_classification, make_multilabel_classification, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.utils.class_weight import compute_sample_weight  # noqa: E402

from ckpt.estimators import MLPClassifier, MLPRegressor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _classification(n=240, n_classes=3, seed=0, weights=None):
    return make_classification(n, 6, n_informative=4, n_classes=n_classes, random_state=seed,
                               weights=weights)


def test_validation_curves_have_one_entry_per_epoch():
    X, y = _classification()
    Xv, yv = _classification(seed=1)
    model = MLPClassifier(hidden_layer_sizes=(8,), max_iter=7, random_state=0)
    model.fit(X, y, validation_data=(Xv, yv))
    assert model.n_iter_ == 7
    assert len(model.validation_scores_) == len(model.validation_loss_curve_) == 7
    assert model.validation_scores_[-1] == model.score(Xv, yv)
    assert model.best_validation_score_ is None   # no early stopping: no best weights kept
    # Without a validation set scikit-learn's None stays; the split fills both curves.
    plain = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3).fit(X, y)
    assert plain.validation_scores_ is None and plain.validation_loss_curve_ is None
    split = MLPClassifier(hidden_layer_sizes=(8,), max_iter=4, early_stopping=True,
                          n_iter_no_change=50).fit(X, y)
    assert len(split.validation_scores_) == len(split.validation_loss_curve_) == 4


def test_validation_loss_is_the_loss_of_the_validation_set():
    X, y = make_regression(200, 5, noise=0.5, random_state=0)
    Xv, yv = make_regression(80, 5, noise=0.5, random_state=1)
    model = MLPRegressor(hidden_layer_sizes=(8,), max_iter=5, random_state=0,
                         dtype=np.float64).fit(X, y / 100, validation_data=(Xv, yv / 100))
    expected = 0.5 * np.mean((model.predict(Xv) - yv / 100) ** 2)
    assert model.validation_loss_curve_[-1] == pytest.approx(expected, rel=1e-12)
    Xc, yc = _classification()
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0,
                        dtype=np.float64).fit(Xc, yc, validation_data=(Xc[:50], yc[:50]))
    proba = clf.predict_proba(Xc[:50])
    cross_entropy = -np.mean(np.log(proba[np.arange(50), yc[:50]]))
    assert clf.validation_loss_curve_[-1] == pytest.approx(cross_entropy, rel=1e-12)


@pytest.mark.parametrize("Estimator, data, extra", [
    (MLPClassifier, lambda s: _classification(seed=s), {}),
    (MLPClassifier, lambda s: _classification(seed=s), dict(residual=True)),
    (MLPRegressor, lambda s: (lambda X, y: (X, y / 100))(*make_regression(240, 6, noise=5.0,
                                                                           random_state=s)), {})])
def test_early_stopping_on_validation_data_restores_the_best_epoch(Estimator, data, extra):
    X, y = data(0)
    Xv, yv = data(1)
    kwargs = dict(hidden_layer_sizes=(16,), random_state=0, learning_rate_init=0.05,
                  dtype=np.float64, **extra)
    stopped = Estimator(early_stopping=True, n_iter_no_change=3, max_iter=200, **kwargs)
    stopped.fit(X, y, validation_data=(Xv, yv))
    best = int(np.argmax(stopped.validation_scores_)) + 1
    assert best < stopped.n_iter_ < 200
    assert stopped.best_validation_score_ == max(stopped.validation_scores_)
    # The same training stopped by hand after the best epoch: its weights, bit for bit.
    saved = Estimator(max_iter=best, **kwargs).fit(X, y, validation_data=(Xv, yv))
    # Every parameter: with residual=True the LayerNorms' too.
    from ckpt.optim import collect_parameters
    ours, theirs = (collect_parameters(m._model)[0] for m in (stopped, saved))
    n_dense = 2 * len(stopped.coefs_)
    assert (len(ours) > n_dense) if extra else (len(ours) == n_dense)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    assert stopped.validation_scores_[:best] == saved.validation_scores_
    assert stopped.score(Xv, yv) == stopped.best_validation_score_


def test_bad_validation_data_is_refused_and_changes_nothing():
    X, y = _classification()
    for validation, error, match in [
            ((X[:, :5], y), ValueError, "X has 5 features, but MLPClassifier is expecting 6"),
            ((X, y + 7), ValueError, "`y` has classes not in `self.classes_`"),
            ((X,), ValueError, "validation_data must be a pair"),
            ((X[:10], y[:9]), ValueError, "inconsistent numbers of samples")]:
        model = MLPClassifier(max_iter=2)
        with pytest.raises(error, match=match):
            model.fit(X, y, validation_data=validation)
        assert not hasattr(model, "coefs_")
    with pytest.raises(ValueError, match="stochastic solver"):
        MLPClassifier(solver="lbfgs").fit(X, y, validation_data=(X, y))
    # A fitted classifier refused a refit keeps its classes, features and predictions.
    fitted = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2).fit(X, y)
    before = fitted.predict_proba(X)
    with pytest.raises(ValueError, match="X has 6 features, but MLPClassifier is expecting 5"):
        fitted.fit(X[:, :5], np.where(y == 2, 9, y), validation_data=(X, y))
    np.testing.assert_array_equal(fitted.classes_, [0, 1, 2])
    assert fitted.n_features_in_ == 6
    np.testing.assert_array_equal(fitted.predict_proba(X), before)
    with pytest.raises(ValueError, match="X has 4 features, but MLPRegressor is expecting 6"):
        MLPRegressor(max_iter=2).fit(X, y, validation_data=(X[:, :4], y))


def test_multiclass_early_stopping_split_is_scikit_learns():
    """scikit-learn stratifies the split for binary targets only: the same split, the same
    training, for multiclass targets too."""
    X, y = _classification()
    kwargs = dict(hidden_layer_sizes=(8,), early_stopping=True, max_iter=6, random_state=0,
                  n_iter_no_change=2)
    ours = MLPClassifier(dtype=np.float64, **kwargs).fit(X, y)
    theirs = neural_network.MLPClassifier(**kwargs).fit(X, y)
    np.testing.assert_allclose(ours.validation_scores_, theirs.validation_scores_)
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-10)
    np.testing.assert_allclose(ours.coefs_[0], theirs.coefs_[0], rtol=1e-9, atol=1e-12)


def test_too_small_class_in_the_stratified_split_gives_scikit_learns_message():
    X, _ = _classification(n=40)
    y = np.r_[np.zeros(39, int), 1]
    for Estimator in (MLPClassifier, neural_network.MLPClassifier):
        with pytest.raises(ValueError, match="The least populated classes in y have only 1 "
                                             "member, which is too few"):
            Estimator(early_stopping=True).fit(X, y)
    with pytest.raises(ValueError, match=r"split of 40 samples, validation_fraction=0.1\)"):
        MLPClassifier(early_stopping=True).fit(X, y)
    with pytest.raises(ValueError, match="The validation set is too small.*gives 1"):
        MLPRegressor(early_stopping=True).fit(X[:9], np.arange(9.0))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # scikit-learn's overflow in its loss
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_diverging_fit_gives_scikit_learns_message(dtype):
    X, y = make_regression(100, 5, random_state=0)
    X, y = X * 1e3, y * 1e3
    kwargs = dict(solver="sgd", learning_rate_init=10.0, max_iter=30)
    with pytest.raises(ValueError, match="Solver produced non-finite parameter weights"):
        neural_network.MLPRegressor(**kwargs).fit(X, y)
    model = MLPRegressor(dtype=dtype, **kwargs)
    with pytest.raises(ValueError, match=r"Solver produced non-finite parameter weights. The "
                                         r"input data may contain large values and need to be "
                                         r"preprocessed. \(epoch \d+, 100 samples in batches "
                                         r"of 100"):
        model.fit(X, y)
    assert len(model.loss_curve_) < 30   # stopped at the first non-finite epoch


def test_unseen_classes_in_partial_fit_give_scikit_learns_message():
    X, y = _classification()
    model = MLPClassifier(max_iter=2).partial_fit(X, y, classes=[0, 1, 2])
    for Estimator in (MLPClassifier, neural_network.MLPClassifier):
        est = Estimator().partial_fit(X, y, classes=[0, 1, 2])
        with pytest.raises(ValueError, match=r"`y` has classes not in `self.classes_`. "
                                             r"`self.classes_` has \[0 1 2\]. 'y' has \[0 1 5\]"):
            est.partial_fit(X, np.where(y == 2, 5, y))
    assert model.n_iter_ == 1


# ---------------------------------------------------------------------------- class_weight
def test_balanced_class_weight_equals_the_matching_sample_weight():
    X, y = _classification(weights=[0.6, 0.3, 0.1])
    kwargs = dict(hidden_layer_sizes=(8,), max_iter=4, random_state=0, early_stopping=True,
                  n_iter_no_change=50)
    balanced = MLPClassifier(class_weight="balanced", **kwargs).fit(X, y)
    # From the y given to fit, before the validation split.
    matching = MLPClassifier(**kwargs).fit(X, y,
                                           sample_weight=compute_sample_weight("balanced", y))
    for a, b in zip(balanced.coefs_, matching.coefs_):
        np.testing.assert_array_equal(a, b)
    assert balanced.validation_scores_ == matching.validation_scores_
    unweighted = MLPClassifier(**kwargs).fit(X, y)
    assert not np.array_equal(unweighted.coefs_[0], balanced.coefs_[0])


def test_class_weight_dict_combines_with_sample_weight():
    X, y = _classification()
    w = np.random.default_rng(0).uniform(0.5, 2.0, len(y))
    kwargs = dict(hidden_layer_sizes=(8,), max_iter=3, random_state=0)
    ours = MLPClassifier(class_weight={0: 3.0, 2: 0.5}, **kwargs).fit(X, y, sample_weight=w)
    product = w * np.select([y == 0, y == 2], [3.0, 0.5], 1.0)
    matching = MLPClassifier(**kwargs).fit(X, y, sample_weight=product)
    np.testing.assert_array_equal(ours.coefs_[0], matching.coefs_[0])
    partial = MLPClassifier(class_weight={0: 3.0, 2: 0.5}, **kwargs)
    partial.partial_fit(X, y, classes=[0, 1, 2], sample_weight=w)
    first = MLPClassifier(**kwargs).partial_fit(X, y, classes=[0, 1, 2], sample_weight=product)
    np.testing.assert_array_equal(partial.coefs_[0], first.coefs_[0])


def test_bad_class_weight_is_refused_and_changes_nothing():
    X, y = _classification()
    Xm, ym = make_multilabel_classification(60, 6, n_classes=3, random_state=0)
    for model, data, match in [
            (MLPClassifier(class_weight={0: 1.0, 7: 2.0}), (X, y),
             r"names the classes \[7\], which are not among the 3 classes"),
            (MLPClassifier(class_weight="balanced"), (Xm, ym), "not supported for multilabel"),
            (MLPClassifier(class_weight={0: 1.0}), (Xm, ym), "not supported for multilabel")]:
        with pytest.raises(ValueError, match=match):
            model.fit(*data)
        assert not hasattr(model, "coefs_")
    with pytest.raises(ValueError, match="not supported for partial_fit"):
        MLPClassifier(class_weight="balanced").partial_fit(X, y, classes=[0, 1, 2])


# ---------------------------------------------------------------------------- cosine schedule
@pytest.mark.parametrize("solver", ["adam", "sgd"])
@pytest.mark.parametrize("warmup", [0.0, 0.25])
def test_cosine_learning_rate_is_ckpt_optim_schedules_per_batch(monkeypatch, solver, warmup):
    from ckpt import estimators
    from ckpt.optim.schedules import Cosine
    rates = []
    Optimizer = estimators._SklearnAdam if solver == "adam" else estimators._SklearnSGD
    original = Optimizer.set_rate
    monkeypatch.setattr(Optimizer, "set_rate",
                        lambda self, rate: (rates.append(rate), original(self, rate))[1])
    X, y = _classification(n=230)
    model = MLPClassifier(hidden_layer_sizes=(8,), solver=solver, learning_rate="cosine",
                          warmup_fraction=warmup, learning_rate_init=0.02, batch_size=50,
                          max_iter=6, random_state=0).fit(X, y)
    total = 6 * 5   # 5 batches of 50 rows (the last of 30) per epoch
    assert rates == [Cosine(0.02, warmup)(step, total) for step in range(total)]
    assert model._optimizer.learning_rate == rates[-1] < 0.02 * 0.01
    if warmup:
        assert rates[0] == pytest.approx(0.02 / 7) and rates[6] == 0.02
    constant = MLPClassifier(hidden_layer_sizes=(8,), solver=solver, learning_rate_init=0.02,
                             batch_size=50, max_iter=6, random_state=0).fit(X, y)
    assert not np.array_equal(constant.coefs_[0], model.coefs_[0])


def test_bad_warmup_fraction_is_refused():
    X, y = _classification()
    for value, error in [(1.0, ValueError), (-0.1, ValueError), ("a", TypeError)]:
        model = MLPClassifier(learning_rate="cosine", warmup_fraction=value)
        with pytest.raises(error, match="warmup_fraction"):
            model.fit(X, y)
        assert not hasattr(model, "coefs_")
