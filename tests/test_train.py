"""fit / predict / evaluate / build_mlp on small synthetic problems."""
import copy

import numpy as np
import pytest

from ckpt import losses
from ckpt.checkpoint import SegmentCheckpointer
from ckpt.layers import Dense
from ckpt.optim import SGD, Adam
from ckpt.train import build_mlp, evaluate, fit, predict


def _blobs(n=120, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = 3 * rng.standard_normal((classes, features))
    y = rng.integers(0, classes, n)
    return centers[y] + rng.standard_normal((n, features)), y


def test_build_mlp():
    layers = build_mlp(6, 4, 16, 3, "tanh", np.float64, seed=0)
    assert [(l.in_features, l.out_features) for l in layers] == [(6, 16), (16, 16), (16, 16),
                                                                 (16, 3)]
    assert [l.activation for l in layers] == ["tanh", "tanh", "tanh", None]
    assert all(l.dtype == np.float64 for l in layers)
    again = build_mlp(6, 4, 16, 3, "tanh", np.float64, seed=0)
    assert all(np.array_equal(a.W, b.W) for a, b in zip(layers, again))
    assert len(build_mlp(6, 1, 16, 3)) == 1
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        build_mlp(6, 0, 16, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fit_decreases_the_loss_and_reports_every_epoch(dtype):
    X, y = _blobs()
    model = SegmentCheckpointer(build_mlp(6, 4, 16, 3, "relu", dtype, seed=0))
    seen = []
    history = fit(model, X, y, optimizer=Adam(model, lr=0.01), epochs=5, batch_size=16, seed=0,
                  validation_data=(X[:30], y[:30]), callback=seen.append)
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4, 5]
    assert set(history) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"}
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["accuracy"][-1] > 0.9
    assert evaluate(model, X, y)["accuracy"] > 0.9


def test_fit_mse_regression():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((100, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.3
    layers = build_mlp(3, 2, 8, 1, "tanh", np.float64, seed=1)
    history = fit(layers, X, y, loss="mse", optimizer=Adam(layers, lr=0.02), epochs=20,
                  batch_size=10)
    assert "accuracy" not in history
    assert history["loss"][-1] < 0.1 * history["loss"][0]
    assert evaluate(layers, X, y, loss="mse")["loss"] == pytest.approx(history["loss"][-1],
                                                                      rel=0.5)


def test_fit_is_reproducible_with_a_seed():
    X, y = _blobs()
    results = []
    for _ in range(2):
        layers = build_mlp(6, 3, 8, 3, "relu", np.float64, seed=0)
        fit(layers, X, y, optimizer=Adam(layers), epochs=2, batch_size=8, seed=42)
        results.append(layers[0].W.copy())
    np.testing.assert_array_equal(*results)


class _RecordingSGD(SGD):
    """SGD that keeps a copy of the gradients of each step."""

    def step(self):
        self.seen = [g.copy() for g in self._grads]
        super().step()


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("accumulation_steps", [2, 3, 5])
def test_gradient_accumulation_equals_the_full_batch(dtype, rtol, accumulation_steps):
    X, y = _blobs(n=13)
    base = build_mlp(6, 4, 16, 3, "gelu", dtype, seed=3)
    grads = {}
    for steps in (1, accumulation_steps):
        model = SegmentCheckpointer(copy.deepcopy(base))
        opt = _RecordingSGD(model, lr=0.1)
        fit(model, X, y, optimizer=opt, epochs=1, batch_size=13, seed=0,
            accumulation_steps=steps)
        grads[steps] = opt.seen
    for full, accumulated in zip(grads[1], grads[accumulation_steps]):
        np.testing.assert_allclose(accumulated, full, rtol=rtol, atol=rtol * np.abs(full).max())


def test_predict_stores_nothing_and_matches_the_layers():
    X, y = _blobs(n=50)
    layers = build_mlp(6, 3, 8, 3, "relu", np.float32, seed=0)
    model = SegmentCheckpointer(layers)
    out = predict(model, X, batch_size=7)           # float64 X is cast to the model's dtype
    assert out.shape == (50, 3) and out.dtype == np.float32
    assert model.memory_tracker.stored_activation_bytes == 0
    # Same slices as predict: BLAS may sum in another order for another number of rows.
    for start in range(0, 50, 7):
        expected = X[start:start + 7].astype(np.float32)
        for layer in layers:
            expected = layer.forward(expected)
        np.testing.assert_array_equal(out[start:start + 7], expected)
    assert predict(model, X[:0]).shape == (0, 3)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(epochs=-1), ValueError, "epochs must be non-negative"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive integer"),
    (dict(accumulation_steps=20, batch_size=4), ValueError, "cannot exceed batch_size"),
    (dict(loss="hinge"), ValueError, "unknown loss"),
    (dict(optimizer="adam"), TypeError, "optimizer must be a ckpt optimizer"),
    (dict(validation_data=np.zeros(3)), TypeError, "validation_data must be a pair"),
])
def test_fit_validates_its_arguments(kwargs, error, match):
    X, y = _blobs(n=20)
    with pytest.raises(error, match=match):
        fit(build_mlp(6, 2, 4, 3, seed=0), X, y, **kwargs)


def test_fit_validates_the_data():
    X, y = _blobs(n=20)
    layers = build_mlp(6, 2, 4, 3, seed=0)
    with pytest.raises(ValueError, match="X has 20 rows but its targets have 19"):
        fit(layers, X, y[:-1])
    with pytest.raises(TypeError, match="integer labels"):
        fit(layers, X, y.astype(float))
    with pytest.raises(ValueError, match="X must be 2-D"):
        fit(layers, X[0], y)
    with pytest.raises(TypeError, match="needs forward, backward"):
        fit(object(), X, y)


def test_zero_epochs_changes_nothing():
    X, y = _blobs(n=20)
    layers = build_mlp(6, 2, 4, 3, seed=0)
    before = layers[0].W.copy()
    assert fit(layers, X, y, epochs=0) == {}
    np.testing.assert_array_equal(layers[0].W, before)


def test_fit_accepts_any_model_with_the_protocol():
    class Plain:
        """Backprop through one Dense layer, keeping its input."""

        def __init__(self):
            self.layer = Dense(6, 3, dtype=np.float64, rng=0)

        def forward(self, x):
            self.x = x
            return self.layer.forward(x)

        def backward(self, g):
            return self.layer.backward(self.x, g)

        def params(self):
            return self.layer.params()

        def gradients(self):
            return self.layer.gradients()

    X, y = _blobs()
    model = Plain()
    history = fit(model, X, y, optimizer=Adam(model, lr=0.05), epochs=5, batch_size=16)
    assert history["loss"][-1] < history["loss"][0]
    assert predict(model, X).shape == (120, 3)


def test_fit_switches_an_evaluating_checkpointer_back_to_training():
    X, y = _blobs(n=40)
    model = SegmentCheckpointer(build_mlp(6, 4, 8, 3, "relu", np.float64, seed=0))
    model.set_training(False)
    history = fit(model, X, y, epochs=2, batch_size=8)
    assert len(history["loss"]) == 2 and model.is_training


# ---------------------------------------------------------------- hardening: validate up front

def _state(model, opt):
    """Everything fit may change: parameters, gradients, optimizer state, tracker figures."""
    tracker = model.memory_tracker
    return ([p.copy() for p in model.params()], [g.copy() for g in model.gradients()],
            opt.state_dict(), (tracker.stored_activation_bytes, tracker.gradient_bytes,
                               tracker.recomputed_bytes, tracker.peak_bytes))


def _assert_same_state(before, after):
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        np.testing.assert_array_equal(a, b)
    assert before[2]["step"] == after[2]["step"]
    for name, bufs in before[2]["buffers"].items():
        for a, b in zip(bufs, after[2]["buffers"][name]):
            np.testing.assert_array_equal(a, b)
    assert before[3] == after[3]


def _bad_X(kind):
    X, y = _blobs(n=30)
    if kind == "nan":
        X[17, 2] = np.nan
    elif kind == "inf":
        X[17, 0] = -np.inf
    elif kind == "overflow":        # finite in float64, infinite once cast to float32
        X[17, 5] = 1e300
    return X, y


@pytest.mark.parametrize("kind", ["nan", "inf", "overflow"])
def test_fit_refuses_non_finite_X_naming_the_row_and_changes_nothing(kind):
    X, y = _bad_X(kind)
    model = SegmentCheckpointer(build_mlp(6, 3, 8, 3, seed=0))
    opt = Adam(model)
    before = _state(model, opt)
    with pytest.raises(ValueError, match="row 17 of X holds a NaN or infinite value"):
        fit(model, X, y, optimizer=opt, epochs=1, batch_size=4)
    _assert_same_state(before, _state(model, opt))
    assert model._state is None


def test_fit_refuses_non_finite_targets_and_bad_validation_data_before_any_step():
    X, y = _blobs(n=30)
    model = SegmentCheckpointer(build_mlp(6, 3, 8, 2, seed=0))
    opt = Adam(model)
    before = _state(model, opt)
    targets = np.zeros((30, 2))
    targets[4, 1] = np.nan
    with pytest.raises(ValueError, match="row 4 of the targets of X"):
        fit(model, X, targets, loss="mse", optimizer=opt, epochs=1)
    with pytest.raises(ValueError, match="targets of X have 3 columns but the model has 2"):
        fit(model, X, np.zeros((30, 3)), loss="mse", optimizer=opt, epochs=1)
    X_val = X.copy()
    X_val[9, 0] = np.inf
    with pytest.raises(ValueError, match="row 9 of X_val"):
        fit(model, X, y % 2, optimizer=opt, epochs=1, validation_data=(X_val, y % 2))
    with pytest.raises(ValueError, match="X_val has 5 features but the model expects 6"):
        fit(model, X, y % 2, optimizer=opt, epochs=1, validation_data=(X[:, :5], y % 2))
    with pytest.raises(ValueError, match="X has 7 features but the model expects 6"):
        fit(model, np.zeros((30, 7)), y % 2, optimizer=opt, epochs=1)
    _assert_same_state(before, _state(model, opt))


def test_fit_checks_every_label_against_the_classes_before_training():
    X, y = _blobs(n=30)          # labels 0..2
    model = SegmentCheckpointer(build_mlp(6, 3, 8, 3, seed=0))
    opt = Adam(model)
    before = _state(model, opt)
    late = y.copy()
    late[29] = 3                 # the last row: reached only late in an epoch
    with pytest.raises(ValueError, match="label 3 in row 29 of the targets of X is outside the "
                                         r"model's 3 classes \[0, 3\)"):
        fit(model, X, late, optimizer=opt, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="label -1 in row 0 of the targets of X_val"):
        fit(model, X, y, optimizer=opt, epochs=1, validation_data=(X[:2], np.array([-1, 0])))
    _assert_same_state(before, _state(model, opt))


def test_fit_refuses_an_optimizer_of_another_model():
    X, y = _blobs(n=30)
    model = SegmentCheckpointer(build_mlp(6, 3, 8, 3, seed=0))
    other = SegmentCheckpointer(build_mlp(6, 3, 8, 3, seed=1))
    opt = Adam(other)
    before = _state(model, opt)
    with pytest.raises(ValueError, match="updates 6 of its 6 parameters outside this model"):
        fit(model, X, y, optimizer=opt, epochs=1)
    _assert_same_state(before, _state(model, opt))
    # An optimizer over part of the model (the rest frozen) is the model's own.
    frozen = build_mlp(6, 3, 8, 3, seed=0)
    first = frozen[0].W.copy()
    fit(frozen, X, y, optimizer=Adam(frozen[1:]), epochs=1)
    np.testing.assert_array_equal(frozen[0].W, first)


def test_fit_refuses_masked_arrays():
    X, y = _blobs(n=30)
    layers = build_mlp(6, 2, 4, 3, seed=0)
    masked = np.ma.masked_array(X, mask=np.zeros_like(X, dtype=bool))
    with pytest.raises(TypeError, match="X is a masked array"):
        fit(layers, masked, y)
    with pytest.raises(TypeError, match="targets of X is a masked array"):
        fit(layers, X, np.ma.masked_array(y))
    with pytest.raises(TypeError, match="X is a masked array"):
        predict(layers, masked)
    with pytest.raises(TypeError, match="X is a masked array"):
        evaluate(layers, masked, y)


def test_a_nan_loss_names_epoch_and_batch_and_leaves_nothing_pending():
    X, y = _blobs(n=40)
    model = SegmentCheckpointer(build_mlp(6, 3, 8, 3, "relu", np.float64, seed=0))
    opt = SGD(model, lr=0.1)

    def poison(info):
        if info["epoch"] == 2 and info["step"] == 3:
            model.layers[-1].b[0] = np.nan    # the next batch's loss is NaN
    with pytest.raises(ValueError, match=r"the loss is nan at epoch 2, batch 4 of 5"):
        fit(model, X, y, optimizer=opt, epochs=3, batch_size=8, step_callback=poison)
    assert model._state is None
    assert model.memory_tracker.stored_activation_bytes == 0
    with pytest.raises(Exception, match="backward needs a forward first"):
        model.backward(np.zeros((8, 3)))


class _InterruptingLoss:
    """Cross-entropy that raises KeyboardInterrupt on its n-th call (between forward and backward)."""

    def __init__(self, n):
        self.n, self.calls, self.loss = n, 0, losses.softmax_cross_entropy

    def __call__(self, output, labels):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.loss(output, labels)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_ctrl_c_inside_fit_discards_the_interrupted_step(monkeypatch, accumulation_steps):
    X, y = _blobs(n=40)
    model = SegmentCheckpointer(build_mlp(6, 4, 8, 3, "relu", np.float64, seed=0))
    opt = SGD(model, lr=0.1, momentum=0.9)
    snapshots = []
    # The last micro-batch of the fourth step: with two, the first has added its gradient.
    monkeypatch.setitem(losses.LOSSES, "cross_entropy", _InterruptingLoss(4 * accumulation_steps))
    with pytest.raises(KeyboardInterrupt):
        fit(model, X, y, optimizer=opt, epochs=1, batch_size=8, seed=0,
            accumulation_steps=accumulation_steps,
            step_callback=lambda info: snapshots.append([p.copy() for p in model.params()]))
    assert len(snapshots) == 3
    # Consistent: nothing pending, nothing held, no partial gradient, parameters as after step 3.
    assert model._state is None
    assert model.memory_tracker.stored_activation_bytes == 0
    assert all(not g.any() for g in model.gradients())
    for a, b in zip(model.params(), snapshots[-1]):
        np.testing.assert_array_equal(a, b)
    assert opt.step_count == 3
    # And it trains on.
    monkeypatch.undo()
    fit(model, X, y, optimizer=opt, epochs=1, batch_size=8)
    assert opt.step_count == 8


def test_ctrl_c_during_the_optimizer_step_waits_for_the_whole_update():
    import os
    import signal

    class SignalledSGD(SGD):
        """Sends itself SIGINT half-way through its update."""

        def step(self):
            first, rest = self._flat_params[:1], self._flat_params[1:]
            for p, g in zip(first, self._flat_grads):
                p -= self.lr * g
            os.kill(os.getpid(), signal.SIGINT)
            for p, g in zip(rest, self._flat_grads[1:]):
                p -= self.lr * g
            self.step_count += 1

    X, y = _blobs(n=16)
    model = SegmentCheckpointer(build_mlp(6, 2, 4, 3, "relu", np.float64, seed=0))
    opt = SignalledSGD(model, lr=0.1)
    reference = SegmentCheckpointer(build_mlp(6, 2, 4, 3, "relu", np.float64, seed=0))
    fit(reference, X, y, optimizer=SGD(reference, lr=0.1), epochs=1, batch_size=16)
    with pytest.raises(KeyboardInterrupt):
        fit(model, X, y, optimizer=opt, epochs=1, batch_size=16)
    assert opt.step_count == 1
    for a, b in zip(model.params(), reference.params()):   # every parameter was updated
        np.testing.assert_array_equal(a, b)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("when", [3, 5])      # in a forward phase, in a recompute of backward
def test_ctrl_c_in_a_python_layer_releases_what_the_step_held(when):
    class Slow(Dense):
        """A Dense run through the layers' Python methods (not the typed executor)."""

        calls = 0

        def forward(self, x):
            Slow.calls += 1
            if Slow.calls == when:
                raise KeyboardInterrupt
            return super().forward(x)

    X, y = _blobs(n=16)
    rng = np.random.default_rng(0)
    model = SegmentCheckpointer([Slow(6, 8, "relu", rng=rng), Slow(8, 8, "relu", rng=rng),
                                 Slow(8, 8, "relu", rng=rng), Slow(8, 3, rng=rng)],
                                checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        fit(model, X, y, epochs=1, batch_size=16)
    tracker = model.memory_tracker
    assert model._state is None
    assert tracker.stored_activation_bytes == tracker.gradient_bytes == 0
