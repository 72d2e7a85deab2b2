"""fit / predict / evaluate / build_mlp on small synthetic problems."""
import copy

import numpy as np
import pytest

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
