"""Pickle, copy.deepcopy and joblib round trips of layers, checkpointers, trackers, optimizers."""
import copy
import io
import pickle

import numpy as np
import pytest

import ckpt
from ckpt.checkpoint import CheckpointStateError

joblib = pytest.importorskip("joblib")


def _pickle(obj):
    return pickle.loads(pickle.dumps(obj))


def _joblib(obj):
    buf = io.BytesIO()
    joblib.dump(obj, buf)
    buf.seek(0)
    return joblib.load(buf)


ROUND_TRIPS = {"pickle": _pickle, "deepcopy": copy.deepcopy, "joblib": _joblib}


@pytest.fixture(params=sorted(ROUND_TRIPS))
def round_trip(request):
    return ROUND_TRIPS[request.param]


def _data(rows=16, features=6, outputs=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features), dtype=np.float32)
    target = rng.standard_normal((rows, outputs), dtype=np.float32)
    return x, target


def _dense_chain(sizes=(6, 8, 8, 8, 3), seed=0):
    return [ckpt.Dense(sizes[i], sizes[i + 1], "tanh" if i < len(sizes) - 2 else None, rng=seed + i)
            for i in range(len(sizes) - 1)]


def _train(model, optimizer, x, target, steps=3):
    """A few Adam steps on the MSE; returns the losses."""
    losses = []
    for _ in range(steps):
        y = model.forward(x)
        loss, grad = ckpt.mse_loss(y, target)
        optimizer.zero_grad()
        model.backward(grad)
        optimizer.step()
        losses.append(loss)
    return losses


def test_dense_round_trip_predicts_and_trains_identically(round_trip):
    x, _ = _data()
    layer = ckpt.Dense(6, 4, "gelu", rng=1)
    layer.grad_W += 1.0
    clone = round_trip(layer)
    assert clone is not layer and clone.W is not layer.W
    np.testing.assert_array_equal(clone.forward(x), layer.forward(x))
    np.testing.assert_array_equal(clone.grad_W, layer.grad_W)
    g = np.ones((len(x), 4), np.float32)
    np.testing.assert_array_equal(clone.backward(x, g), layer.backward(x, g))
    clone.update(0.1)
    layer.update(0.1)
    np.testing.assert_array_equal(clone.W, layer.W)
    assert clone.activation == "gelu" and clone.dtype == np.float32


def test_checkpointed_layer_round_trip(round_trip):
    x, _ = _data()
    layer = ckpt.CheckpointedLayer(ckpt.Dense(6, 4, "relu", rng=2))
    clone = round_trip(layer)
    np.testing.assert_array_equal(clone.forward(x), layer.forward(x))
    assert clone.in_features == 6 and clone.out_features == 4


def test_tracker_keeps_its_figures(round_trip):
    tracker = ckpt.MemoryUsageTracker()
    tracker.record_stored_activation(1000)
    tracker.record_gradient(300)
    tracker.release_stored_activation(400)
    tracker.record_recomputed(77)
    clone = round_trip(tracker)
    assert type(clone) is ckpt.MemoryUsageTracker
    assert (clone.stored_activation_bytes, clone.recomputed_bytes, clone.gradient_bytes,
            clone.peak_bytes) == (600, 77, 300, 1300)
    # The copy counts on by itself: its peak moves from the restored figures.
    clone.record_stored_activation(1000)
    assert clone.peak_bytes == 1900 and tracker.peak_bytes == 1300
    clone.release_stored_activation(1600)
    clone.release_gradient(300)
    assert clone.stored_activation_bytes == 0 and clone.gradient_bytes == 0


@pytest.mark.parametrize("state", [(1, 2, 3), (1, 2, 3, -4), ("a", 2, 3, 4), None])
def test_tracker_refuses_a_bad_state(state):
    tracker = ckpt.MemoryUsageTracker()
    with pytest.raises(ValueError, match="four byte counts"):
        tracker.__setstate__(state)


@pytest.mark.parametrize("typed", [True, False], ids=["dense-chain", "python-chain"])
def test_checkpointer_and_optimizer_pickled_together_train_identically(round_trip, typed):
    x, target = _data()
    layers = _dense_chain()
    if not typed:  # any non-Dense layer sends the chain through the Python executor
        layers[1] = ckpt.CheckpointedLayer(layers[1])
    model = ckpt.SegmentCheckpointer(layers, checkpoint_every=2)
    optimizer = ckpt.Adam(model, lr=0.01)
    _train(model, optimizer, x, target, steps=2)

    model2, optimizer2 = round_trip((model, optimizer))
    # One object graph: the optimizer's parameters are the copied model's own arrays.
    assert all(p is q for p, q in zip(optimizer2._params, model2.params()))
    assert optimizer2.step_count == optimizer.step_count
    np.testing.assert_array_equal(model2.forward(x), model.forward(x))
    model.set_training(True)
    assert _train(model2, optimizer2, x, target) == _train(model, optimizer, x, target)
    for p, q in zip(model.params(), model2.params()):
        np.testing.assert_array_equal(p, q)
    assert model2.memory_tracker.peak_bytes == model.memory_tracker.peak_bytes
    assert model2.memory_tracker.recomputed_bytes == model.memory_tracker.recomputed_bytes


def test_optimizer_pickled_alone_updates_its_own_copy():
    x, target = _data()
    model = ckpt.SegmentCheckpointer(_dense_chain(), checkpoint_every=2)
    optimizer = ckpt.SGD(model, lr=0.1, momentum=0.9, nesterov=True)
    _train(model, optimizer, x, target, steps=2)
    lone = _pickle(optimizer)
    # It brings a copy of its model along, and updates that copy.
    assert all(p is not q for p, q in zip(lone._params, model.params()))
    assert all(p is q for p, q in zip(lone._params, lone._model.params()))
    for g, g2 in zip(optimizer._grads, lone._grads):
        np.testing.assert_array_equal(g, g2)
    optimizer.step()
    lone.step()
    # Same arithmetic on equal copies; the flat views write into the copies' arrays.
    for p, p2 in zip(model.params(), lone._params):
        np.testing.assert_array_equal(p, p2)
    assert lone.state_dict()["step"] == optimizer.step_count


def test_pending_forward_is_dropped_from_the_copy(round_trip):
    x, target = _data()
    model = ckpt.SegmentCheckpointer(_dense_chain(), checkpoint_every=2)
    y = model.forward(x)
    held = model.memory_tracker.stored_activation_bytes
    assert held > 0
    clone = round_trip(model)
    assert clone.memory_tracker.stored_activation_bytes == 0
    assert clone.memory_tracker.peak_bytes == model.memory_tracker.peak_bytes
    with pytest.raises(CheckpointStateError):
        clone.backward(np.ones_like(y))
    # The original is untouched and still back-propagates.
    assert model.memory_tracker.stored_activation_bytes == held
    model.backward(np.ones_like(y))
    assert model.memory_tracker.stored_activation_bytes == 0
    # The copy trains after a new forward.
    np.testing.assert_array_equal(clone.forward(x), y)
    clone.backward(np.ones_like(y))
    for g, g2 in zip(model.gradients(), clone.gradients()):
        np.testing.assert_array_equal(g, g2)


def test_pending_forward_of_a_python_chain_is_dropped():
    x, _ = _data()
    layers = [ckpt.CheckpointedLayer(layer) for layer in _dense_chain()]
    model = ckpt.SegmentCheckpointer(layers, checkpoint_every=2)
    model.forward(x)
    clone = _pickle(model)
    # What the checkpointer stored is gone; the CheckpointedLayers keep their own inputs.
    inner = sum(layer._stored.nbytes for layer in clone.layers if layer.has_stored_input)
    assert clone.memory_tracker.stored_activation_bytes == 0
    assert all(layer.memory_tracker.stored_activation_bytes == layer._stored.nbytes
               for layer in clone.layers if layer.has_stored_input)
    assert inner > 0


def test_checkpointer_with_budget_round_trips():
    x, target = _data(rows=32)
    model = ckpt.SegmentCheckpointer(_dense_chain((6, 16, 16, 16, 16, 3)), budget_bytes="16KiB")
    model.forward(x)
    model.backward(np.ones((32, 3), np.float32))
    clone = copy.deepcopy(model)
    assert clone.budget_bytes == model.budget_bytes
    assert clone.schedule(32).ops == model.schedule(32).ops
    np.testing.assert_array_equal(clone.forward(x), model.forward(x))
