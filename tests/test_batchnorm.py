"""ckpt.BatchNorm: PyTorch's BatchNorm1d semantics, and correct under recomputation.

The running statistics are updated once per training forward of each batch, whatever the
schedule (a recomputation reuses the step's batch statistics and never updates them again), so
training under any checkpointing gives bit for bit what plain backprop gives; they match
PyTorch's (tests/data/torch_batchnorm.npz, written by tests/make_batchnorm_fixture.py), where
PyTorch's own checkpoint updates them twice per step.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

import ckpt
import ckpt.plan
from ckpt import BatchNorm, CheckpointedLayer, Dense, SegmentCheckpointer
from ckpt.elements.batchnorm import batch_statistics, batchnorm_apply

FIXTURE = Path(__file__).resolve().parent / "data" / "torch_batchnorm.npz"


def chain(seed=0, dropout=0.0):
    """Dense -> BatchNorm -> Activation blocks, a tabular-ResNet block, a head: BatchNorm in the
    chain and inside a Residual block."""
    layers = ckpt.build_mlp(6, 3, 8, 3, "relu", np.float64, seed=seed, norm="batch",
                            dropout=dropout)
    layers += ckpt.build_mlp(3, 2, 8, 3, "relu", np.float64, seed=seed + 1, residual=True,
                             norm="batch", dropout=dropout)
    return layers


def batches(n=5, rows=9, seed=3):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((rows, 6)), rng.standard_normal((rows, 3))) for _ in range(n)]


def train(model, data, lr=0.05):
    for x, t in data:
        y = model.forward(x)
        model.backward(2 * (y - t) / y.size, accumulate=False)
        model.update(lr)


def norms(layers):
    return [layer for layer in ckpt.elements.walk(layers) if isinstance(layer, BatchNorm)]


def state(layers):
    return ([p.copy() for layer in layers for p in layer.params()],
            [(b.running_mean.copy(), b.running_var.copy(), b.num_batches_tracked)
             for b in norms(layers)])


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        np.testing.assert_array_equal(x, y)
    for (m1, v1, n1), (m2, v2, n2) in zip(a[1], b[1]):
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_array_equal(v1, v2)
        assert n1 == n2


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("schedule", [dict(checkpoint_every=2), dict(checkpoint_every=0),
                                      "planned", "wrapped"])
def test_recomputation_never_updates_the_running_statistics(schedule, dropout):
    data = batches()
    plain_layers = chain(dropout=dropout)
    plain = SegmentCheckpointer(plain_layers, checkpoint_every=1, seed=11)
    train(plain, data)
    layers = chain(dropout=dropout)
    if schedule == "wrapped":
        model = SegmentCheckpointer([CheckpointedLayer(layer) for layer in layers],
                                    checkpoint_every=1, seed=11)
    elif schedule == "planned":
        # A budget halfway between the least feasible and plain backprop's peak.
        rows = data[0][0].shape[0]
        plain_plan = ckpt.plan.plan(plain.costs, rows, 2**40, dtype=np.float64)
        budget = ((plain_plan.min_budget_bytes + plain_plan.plain_peak_bytes) // 2
                  + plain.gradient_workspace_bytes(rows))
        model = SegmentCheckpointer(layers, budget_bytes=budget, seed=11)
    else:
        model = SegmentCheckpointer(layers, seed=11, **schedule)
    tracker = model.memory_tracker
    train(model, data)
    assert tracker.recomputed_bytes > 0
    assert_same(state(layers), state(plain_layers))
    assert all(b.num_batches_tracked == len(data) for b in norms(layers))


def test_the_running_statistics_follow_pytorchs_momentum_rule():
    layer = BatchNorm(4, momentum=0.25, dtype=np.float64)
    rng = np.random.default_rng(0)
    mean, var = np.zeros(4), np.ones(4)
    for _ in range(3):
        x = rng.standard_normal((6, 4)) * 3 + 1
        y = layer.forward(x)
        m, v = batch_statistics(x)
        np.testing.assert_allclose(y, batchnorm_apply(x, layer.weight, layer.bias, m, v, 1e-5),
                                   rtol=1e-14)
        mean = 0.75 * mean + 0.25 * m
        var = 0.75 * var + 0.25 * v * 6 / 5        # the unbiased variance
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-14)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-14)
    assert layer.num_batches_tracked == 3
    layer.set_training(False)
    x = rng.standard_normal((1, 4))     # one row is fine in evaluation mode
    np.testing.assert_allclose(layer.forward(x),
                               (x - mean) / np.sqrt(var + 1e-5), rtol=1e-12)
    assert layer.num_batches_tracked == 3


def test_training_matches_pytorch_batchnorm1d():
    with np.load(FIXTURE) as f:
        ref = {key: f[key] for key in f.files}
    for k in (1, 2, 0):
        fc1 = Dense(6, 8, dtype=np.float64)
        norm = BatchNorm(8, momentum=0.1, dtype=np.float64)
        fc2 = Dense(8, 3, dtype=np.float64)
        fc1.W[...], fc1.b[...] = ref["init__0_weight"].T, ref["init__0_bias"]
        norm.weight[...], norm.bias[...] = ref["init__1_weight"], ref["init__1_bias"]
        fc2.W[...], fc2.b[...] = ref["init__3_weight"].T, ref["init__3_bias"]
        model = SegmentCheckpointer([fc1, norm, ckpt.Activation("relu"), fc2], checkpoint_every=k)
        train(model, zip(ref["x"], ref["t"]), lr=0.1)
        np.testing.assert_allclose(norm.running_mean, ref["plain__running_mean"], rtol=1e-10)
        np.testing.assert_allclose(norm.running_var, ref["plain__running_var"], rtol=1e-10)
        assert norm.num_batches_tracked == int(ref["plain__num_batches_tracked"]) == 5
        np.testing.assert_allclose(fc1.W, ref["final__0_weight"].T, rtol=1e-10)
        np.testing.assert_allclose(norm.weight, ref["final__1_weight"], rtol=1e-10)
        np.testing.assert_allclose(fc2.b, ref["final__3_bias"], rtol=1e-10)
    # What PyTorch's checkpoint gives instead: every step's recomputation updates again.
    assert int(ref["checkpoint__num_batches_tracked"]) == 10
    assert not np.allclose(ref["checkpoint__running_mean"], ref["plain__running_mean"])


def test_buffers_are_pickled_saved_and_loaded_but_are_not_parameters(tmp_path):
    layers = chain()
    model = SegmentCheckpointer(layers, checkpoint_every=2)
    train(model, batches(3))
    first = norms(layers)[0]
    assert len(first.params()) == 2 and all(p is not first.running_mean for p in first.params())
    optimizer = ckpt.SGD(model, lr=0.1, weight_decay=0.5)
    before = first.running_var.copy()
    optimizer.step()
    np.testing.assert_array_equal(first.running_var, before)    # weight decay never touches it
    copy = pickle.loads(pickle.dumps(model))
    assert_same(state(copy.layers), state(layers))
    path = tmp_path / "bn.npz"
    ckpt.save(path, model)
    loaded = ckpt.load_model(path)
    assert_same(state(loaded.layers), state(layers))
    x = batches(1)[0][0]
    model.set_training(False)
    loaded.set_training(False)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    # ckpt.load into a model built in code restores the buffers too.
    fresh_layers = chain(seed=5)
    ckpt.load(path, SegmentCheckpointer(fresh_layers))
    assert_same(state(fresh_layers), state(layers))


def test_bad_input_is_refused_and_changes_nothing():
    for momentum in (-0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="momentum must be a number in \\[0, 1\\]"):
            BatchNorm(4, momentum=momentum)
    for eps in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="eps must be a positive number"):
            BatchNorm(4, eps=eps)
    layers = chain()
    model = SegmentCheckpointer(layers, checkpoint_every=2)
    train(model, batches(1))
    before = state(layers)
    with pytest.raises(ValueError, match=r"BatchNorm\(8\) needs more than one row per batch "
                                         r"in training mode .*got 1"):
        model.forward(np.ones((1, 6)))
    assert_same(state(layers), before)
    assert model.memory_tracker.stored_activation_bytes == 0
    config = ckpt.elements.layer_config(norms(layers)[0])
    for key, value in (("running_mean", [0.0] * 7), ("running_var", [1.0] * 9),
                       ("running_var", [-1.0] * 8), ("running_mean", "zeros"),
                       ("num_batches_tracked", -2)):
        bad = dict(config, **{key: value})
        with pytest.raises(ValueError, match=key):
            ckpt.elements.layer_from_config(bad)


def test_fit_refuses_a_one_row_training_batch_before_the_first_step():
    layers = ckpt.build_mlp(6, 3, 8, 3, "relu", np.float64, seed=0, norm="batch")
    model = SegmentCheckpointer(layers)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((33, 6)), rng.integers(0, 3, 33)
    before = state(layers)
    with pytest.raises(ValueError, match=r"with 33 rows, batch_size 8, accumulation_steps 1, a "
                                         r"batch of 1 rows .*1 row"):
        ckpt.fit(model, X, y, epochs=1, batch_size=8)
    with pytest.raises(ValueError, match=r"batch_size 6, accumulation_steps 4, a batch of 6 "
                                         r"rows split into 4 micro-batch\(es\) of as few as 1"):
        ckpt.fit(model, X[:30], y[:30], epochs=1, batch_size=6, accumulation_steps=4)
    assert_same(state(layers), before)
    ckpt.fit(model, X[:32], y[:32], epochs=1, batch_size=8, accumulation_steps=4)
    assert all(b.num_batches_tracked == 4 * 4 for b in norms(layers))   # per micro-batch


@pytest.mark.parametrize("residual", [False, True])
def test_ckpt_train_and_plan_take_norm_batch(capsys, residual):
    import json
    from ckpt.cli import main
    extra = ["--residual"] if residual else []
    assert main(["train", "--norm", "batch", "--depth", "3", "--width", "16", "--epochs", "4",
                 "--json"] + extra) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["test_accuracy"] > 0.5
    assert main(["plan", "--norm", "batch", "--depth", "3", "--width", "16", "--json"]
                + extra) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    built = ckpt.costs.describe_chain(ckpt.build_mlp(16, 3, 16, 16, residual=residual,
                                                     norm="batch"))
    assert plan["widths"] == list(built.widths)


@pytest.mark.parametrize("residual", [False, True])
def test_the_estimators_take_norm(residual):
    pytest.importorskip("sklearn")
    from sklearn.base import clone
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 5)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    for norm in ("layer", "batch"):
        est = ckpt.MLPClassifier((16, 16), norm=norm, residual=residual, max_iter=80,
                                 learning_rate_init=0.02, batch_size=32, random_state=0,
                                 early_stopping=True, n_iter_no_change=80)
        est.fit(X, y)
        assert est.score(X, y) > 0.8
        assert clone(est).get_params()["norm"] == norm
        again = pickle.loads(pickle.dumps(est))
        np.testing.assert_array_equal(again.predict_proba(X), est.predict_proba(X))
        kinds = {type(layer).__name__ for layer in ckpt.elements.walk(est._model.layers)}
        assert ("BatchNorm" in kinds) == (norm == "batch")
    with pytest.raises(ValueError, match="norm must be None, 'layer' or 'batch'"):
        ckpt.MLPClassifier(norm="batchnorm").fit(X, y)
    with pytest.raises(ValueError, match="norm='batch' needs at least 2 rows .* 121 samples in "
                                         "batches of 10 leave a batch of 1 row"):
        ckpt.MLPRegressor(norm="batch", batch_size=10, max_iter=2).fit(
            np.vstack([X, X[:1]]), np.r_[y, 0].astype(float))
