"""Deep networks: LayerNorm, Dropout and Residual blocks, alone and in checkpointed chains.

Kernels against their NumPy twins, finite differences for each layer, bit equality of every
schedule with plain backprop (dropout included), the compiled path, one source of costs, the
tracker against tracemalloc, and bad input that changes nothing.
"""
from __future__ import annotations

import copy
import gc
import sys
import tracemalloc

import numpy as np
import pytest

import ckpt
from ckpt import (CheckpointedLayer, Dense, Dropout, ElementCost, Layer, LayerNorm, Residual,
                  SegmentCheckpointer, _core, _reference)
from conftest import numeric_gradient
from ckpt.cli import recompute_cost
from ckpt.layers import Step
from ckpt.train import build_mlp

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}
DTYPES = [np.float32, np.float64]


def batch(m, n, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal((m, n)).astype(dtype)


def layernorm(n, dtype=np.float64, seed=0, eps=1e-5):
    ln = LayerNorm(n, eps, dtype=dtype)
    rng = np.random.default_rng(seed)
    ln.weight = rng.uniform(0.5, 1.5, n).astype(dtype)      # assignment copies into the array
    ln.bias = (0.1 * rng.standard_normal(n)).astype(dtype)
    return ln


def mixed_chain(dtype=np.float64, p=0.25, seed=0):
    """Dense, LayerNorm, Dropout and nested Residual blocks, 9 elements."""
    rng = np.random.default_rng(seed)
    w = 10
    return [
        Dense(6, w, "relu", dtype=dtype, rng=rng),
        Residual(LayerNorm(w, dtype=dtype), Dense(w, 14, "gelu", dtype=dtype, rng=rng),
                 Dropout(p), Dense(14, w, dtype=dtype, rng=rng)),
        Dropout(p),
        LayerNorm(w, dtype=dtype),
        Residual(Dense(w, w, "tanh", dtype=dtype, rng=rng),
                 Residual(LayerNorm(w, dtype=dtype), Dropout(p),
                          Dense(w, w, "leaky_relu", dtype=dtype, rng=rng))),
        Dense(w, 8, "sigmoid", dtype=dtype, rng=rng),
        Residual(Dropout(p)),
        Dense(8, w, "softplus", dtype=dtype, rng=rng),
        Dense(w, 3, dtype=dtype, rng=rng),
    ]


def run(layers, x, g, k=None, seed=7, **kwargs):
    s = SegmentCheckpointer(layers, k, seed=seed, **kwargs)
    y = s.forward(x).copy()
    gx = s.backward(g)
    return s, y, gx, [a.copy() for a in s.gradients()]


# --------------------------------------------------------------------------------------------
# Kernels against the NumPy twins
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n", [(1, 3), (7, 13), (0, 4), (33, 64)])
def test_layernorm_kernels_match_the_twin(dtype, m, n):
    x, g = batch(m, n, dtype), batch(m, n, dtype, seed=1)
    ln = layernorm(n, dtype)
    y = ln.forward(x)
    np.testing.assert_allclose(y, _reference.layernorm_forward(x, ln.weight, ln.bias),
                               **TOL[dtype])
    gx = ln.backward(x, g)
    rgx, rgw, rgb = _reference.layernorm_backward(x, ln.weight, g)
    np.testing.assert_allclose(gx, rgx, **TOL[dtype])
    np.testing.assert_allclose(ln.grad_weight, rgw, **TOL[dtype])
    np.testing.assert_allclose(ln.grad_bias, rgb, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout_kernel_is_the_twin_bit_for_bit(dtype, p):
    x = batch(37, 29, dtype)
    for seed, stream, row0 in [(0, 0, 0), (2**64 - 1, 3, 5), (123456789, 1, 10**6)]:
        out = np.empty_like(x)
        _core.dropout_apply(x, out, p, seed, stream, row0)
        np.testing.assert_array_equal(out, _reference.dropout(x, p, seed, stream, row0))
    keep = _reference.dropout_mask((400, 250), p, 42)
    assert abs(keep.mean() - (1 - p)) < 0.01        # the generator keeps 1 - p of the values


def test_dropout_masks_differ_between_rows_streams_and_seeds_and_shift_with_row0():
    mask = _reference.dropout_mask((64, 64), 0.5, 1)
    assert len({row.tobytes() for row in mask}) == 64
    assert not np.array_equal(mask, _reference.dropout_mask((64, 64), 0.5, 1, stream=1))
    assert not np.array_equal(mask, _reference.dropout_mask((64, 64), 0.5, 2))
    # a slice of the batch with its global row offset sees the same mask as the whole batch
    np.testing.assert_array_equal(mask[20:30], _reference.dropout_mask((10, 64), 0.5, 1, row0=20))


def test_dropout_is_a_product_so_nan_propagates():
    x = np.full((4, 4), np.nan)
    out = np.empty_like(x)
    _core.dropout_apply(x, out, 0.5, 3)
    assert np.isnan(out).all()


# --------------------------------------------------------------------------------------------
# Finite differences (float64)
# --------------------------------------------------------------------------------------------

def check_layer_gradients(layer, x, forward, backward):
    """forward(x) -> y, backward(x, g) -> gx; loss = sum(y * g) with a fixed random g."""
    g = batch(*forward(x).shape, seed=9)
    layer.zero_grad()
    gx = backward(x, g)
    analytic = [a.copy() for a in layer.gradients()]

    def loss():
        return float(np.sum(forward(x) * g))
    np.testing.assert_allclose(gx, numeric_gradient(loss, x), rtol=1e-6, atol=1e-7)
    for p, a in zip(layer.params(), analytic):
        np.testing.assert_allclose(a, numeric_gradient(loss, p), rtol=1e-6, atol=1e-7)


def test_layernorm_finite_differences():
    ln = layernorm(7, seed=3)
    check_layer_gradients(ln, batch(5, 7), ln.forward, ln.backward)


def test_dropout_finite_differences_with_a_fixed_step():
    drop = Dropout(0.4)
    step = Step(seed=11)
    check_layer_gradients(drop, batch(5, 7), lambda x: drop.forward_step(x, step),
                          lambda x, g: drop.backward_step(x, g, step))


def test_residual_finite_differences():
    rng = np.random.default_rng(0)
    block = Residual(layernorm(6, seed=1), Dense(6, 9, "gelu", dtype=np.float64, rng=rng),
                     Dropout(0.3), Dense(9, 6, "tanh", dtype=np.float64, rng=rng))
    step = Step(seed=5, streams={id(block.layers[2]): 0})
    check_layer_gradients(block, batch(4, 6), lambda x: block.forward_step(x, step),
                          lambda x, g: block.backward_step(x, g, step))


def test_standalone_dropout_and_residual_replay_their_forward_in_backward():
    x, g = batch(6, 5), batch(6, 5, seed=1)
    drop = Dropout(0.5, seed=3)
    y = drop.forward(x)
    gx = drop.backward(x, g)
    np.testing.assert_array_equal((y != 0), (gx != 0))      # the same mask
    assert not np.array_equal(drop.forward(x), y)           # a new step, a new mask
    assert np.array_equal(Dropout(0.5, seed=3).forward(x), y)   # reproducible from the seed
    drop.set_training(False)
    np.testing.assert_array_equal(drop.forward(x), x)       # identity in evaluation mode
    with pytest.raises(ValueError, match="needs a forward first"):
        Dropout(0.2).backward(x, g)


def test_checkpointed_layer_replays_the_dropout_mask():
    x, g = batch(6, 5), batch(6, 5, seed=1)
    block = Residual(Dense(5, 5, "relu", dtype=np.float64, rng=0), Dropout(0.5))
    wrapped = CheckpointedLayer(copy.deepcopy(block), seed=4)
    y = wrapped.forward(x)
    gx = wrapped.backward(x, g)
    # the same step on the plain block gives the same output and gradient
    step = wrapped._step
    plain = copy.deepcopy(block)
    plain_step = Step(step.seed, 0, {id(plain.layers[1]): step.streams[id(wrapped.inner.layers[1])]})
    np.testing.assert_array_equal(y, plain.forward_step(x, plain_step))
    np.testing.assert_array_equal(gx, plain.backward_step(x, g, plain_step))


# --------------------------------------------------------------------------------------------
# Checkpointed mixed chains: bit equality with plain backprop, under every schedule
# --------------------------------------------------------------------------------------------

class Identity(Layer):
    """A Python-written layer: a chain holding it runs through the layers' own methods."""

    def __init__(self, n, dtype):
        self.in_features = self.out_features = n
        self.dtype = np.dtype(dtype)

    def forward(self, x):
        return x.copy()

    def backward(self, x, grad_output, *, output=None):
        return grad_output.copy()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_schedule_is_bit_equal_to_plain_backprop_dropout_included(dtype):
    base = mixed_chain(dtype)
    x, g = batch(11, 6, dtype), batch(11, 3, dtype, seed=1)
    plain = run(copy.deepcopy(base), x, g, 1)
    assert plain[0].executor == "compiled" and plain[0].schedule(11).keep_internals
    assert plain[0].memory_tracker.recomputed_bytes == 0      # plain: nothing recomputed
    schedules = [dict(k=k) for k in (0, 2, 3, 4, 9)]
    widths = plain[0].widths
    for kwargs in schedules:
        s, y, gx, grads = run(copy.deepcopy(base), x, g, **kwargs)
        assert s.memory_tracker.recomputed_bytes > 0
        assert np.array_equal(y, plain[1]) and np.array_equal(gx, plain[2]), kwargs
        assert all(np.array_equal(a, b) for a, b in zip(grads, plain[3])), kwargs
    # planned schedules, from the layers' own descriptions, at budgets between the extremes
    from ckpt.plan import plan
    costs = plain[0].costs
    low, high = (plan(costs, 11, 10**9, dtype).min_budget_bytes,
                 plan(costs, 11, 10**9, dtype).plain_peak_bytes)
    for fraction in (0.0, 0.3, 0.7):
        chosen = plan(costs, 11, int(low + fraction * (high - low)), dtype)
        s, y, gx, grads = run(copy.deepcopy(base), x, g, plan=chosen)
        assert s.memory_tracker.peak_bytes <= chosen.peak_bytes + 2 * 11 * 14 * np.dtype(dtype).itemsize
        assert np.array_equal(y, plain[1]) and np.array_equal(gx, plain[2]), fraction
        assert all(np.array_equal(a, b) for a, b in zip(grads, plain[3])), fraction
    # the Python path (a Python-written layer in the chain) computes the same bits
    for k in (1, 3):
        s, y, gx, grads = run(copy.deepcopy(base) + [Identity(3, dtype)], x, g, k)
        assert s.executor == "python"
        assert np.array_equal(y, plain[1]) and np.array_equal(gx, plain[2])
        assert all(np.array_equal(a, b) for a, b in zip(grads, plain[3]))
    assert widths == (6, 10, 10, 10, 10, 10, 8, 8, 10, 3)


def test_dropout_masks_differ_between_steps_and_rows_inside_a_checkpointer():
    layers = [Dense(4, 64, dtype=np.float64, rng=0), Dropout(0.5)]
    s = SegmentCheckpointer(layers, 1, seed=0)
    x = np.ones((8, 4))
    first = s.forward(x).copy()
    s.backward(np.ones((8, 64)))
    second = s.forward(x).copy()
    s.backward(np.ones((8, 64)))
    assert not np.array_equal(first == 0, second == 0)                 # between steps
    assert len({row.tobytes() for row in (first == 0)}) == 8           # between rows
    # the same seed gives the same run
    again = SegmentCheckpointer(copy.deepcopy(layers), 1, seed=0)
    assert np.array_equal(again.forward(x), first)
    # row_offset: rows 4.. of the batch, given as their own batch, get the same masks
    split = SegmentCheckpointer(copy.deepcopy(layers), 1, seed=0)
    np.testing.assert_array_equal(split.forward(x[4:], row_offset=4), first[4:])


def test_evaluation_mode_turns_dropout_off():
    layers = [Dense(4, 16, dtype=np.float64, rng=0), Dropout(0.5), Residual(Dropout(0.9))]
    s = SegmentCheckpointer(layers, 2, seed=0)
    x = batch(5, 4)
    s.set_training(False)
    expected = 2 * layers[0].forward(x)          # Residual(identity): x + x
    np.testing.assert_array_equal(s.forward(x), expected)


# --------------------------------------------------------------------------------------------
# The compiled path
# --------------------------------------------------------------------------------------------

def test_mixed_chains_run_in_the_compiled_executor_with_no_python_call_per_element():
    layers = mixed_chain(np.float32)
    s = SegmentCheckpointer(layers, 3, seed=0)
    assert s.executor == "compiled"
    x, g = batch(16, 6, np.float32), batch(16, 3, np.float32, seed=1)
    s.forward(x)
    s.backward(g)                                   # warm-up: schedules compiled
    calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith(("layers.py", "executor.py")):
            calls.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        s.forward(x)
        s.backward(g)
    finally:
        sys.setprofile(None)
    assert calls.count("forward") == calls.count("backward") == 0
    assert "forward_step" not in calls and "backward_step" not in calls
    assert len(calls) < 20, calls         # a few helpers per phase, not one per element


def test_the_chain_refuses_an_understated_scratch():
    block = Residual(LayerNorm(4), Dense(4, 8, "relu", rng=0), Dense(8, 4, rng=1))
    from ckpt.executor import build_chain
    from ckpt.costs import ChainCosts
    honest = block.describe()
    build_chain([block], ChainCosts((honest,)))             # as described: accepted
    short = ElementCost("residual", 4, 4, stored=4, forward_flops=0, backward_flops=0,
                        tape=honest.tape, forward_scratch=honest.forward_scratch,
                        backward_scratch=honest.backward_scratch - 1)
    with pytest.raises(ValueError, match="declared scratch"):
        build_chain([block], ChainCosts((short,)))


# --------------------------------------------------------------------------------------------
# One source of costs
# --------------------------------------------------------------------------------------------

class Hungry(Layer):
    """Identity maths, but declares a large scratch and odd FLOPs: every report must show them."""

    SCRATCH, FLOPS = 1000, 123456

    def __init__(self, n):
        self.in_features = self.out_features = n
        self.dtype = np.dtype(np.float64)

    def describe(self, in_width=None):
        n = self.in_features
        return ElementCost("hungry", n, n, stored=n, forward_flops=self.FLOPS,
                           backward_flops=self.FLOPS, forward_scratch=self.SCRATCH,
                           backward_scratch=2 * self.SCRATCH)

    def forward(self, x):
        return x.copy()

    def backward(self, x, grad_output, *, output=None):
        return grad_output.copy()


def test_one_cost_source_reaches_the_compiler_tracker_and_report():
    n, rows = 5, 4
    layers = [Dense(n, n, "relu", dtype=np.float64, rng=0), Hungry(n),
              Dense(n, n, dtype=np.float64, rng=1)]
    s = SegmentCheckpointer(layers, 0)
    costs = s.costs
    assert costs.elements[1].backward_scratch == 2 * Hungry.SCRATCH
    # the schedule compiler: the arena has room for the declared scratch, the peak counts it
    compiled = s.schedule(rows)
    assert compiled.arena_units >= 2 * Hungry.SCRATCH
    assert compiled.peak_units >= 2 * Hungry.SCRATCH + n
    # the tracker: the Python path records the declared scratch while the element runs
    s.forward(batch(rows, n))
    s.backward(batch(rows, n, seed=1))
    assert s.memory_tracker.peak_bytes >= 2 * Hungry.SCRATCH * rows * 8
    # the CLI's recompute report: Hungry is recomputed (k=0), its declared FLOPs count
    recomputed, fraction = recompute_cost(s, rows)
    assert recomputed == 2
    assert fraction == pytest.approx((Hungry.FLOPS + 2 * n * n) / costs.step_flops())
    # the planner's smallest budget includes the scratch, and its plan's peak counts it
    from ckpt.plan import plan
    assert costs.min_units() >= 2 * Hungry.SCRATCH
    chosen = plan(costs, rows, 10**9, np.float64)
    assert chosen.min_budget_bytes == costs.min_units() * rows * 8
    assert chosen.peak_bytes >= 2 * Hungry.SCRATCH * rows * 8
    with pytest.raises(ValueError, match="below the smallest feasible budget"):
        plan(costs, rows, chosen.min_budget_bytes - 1, np.float64)


# --------------------------------------------------------------------------------------------
# Memory: the tracker against tracemalloc on a deep residual chain
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5])
def test_tracker_peak_agrees_with_tracemalloc_on_a_deep_residual_chain(k):
    layers = build_mlp(64, 24, 128, 10, "relu", np.float32, seed=0, residual=True, dropout=0.1)
    s = SegmentCheckpointer(layers, k, seed=0)
    x, g = batch(64, 64, np.float32), batch(64, 10, np.float32, seed=1)
    s.forward(x)
    s.backward(g)                                  # warm-up: workspace and schedule
    gc.collect()
    tracemalloc.start()
    try:
        s.memory_tracker.reset()
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        y = s.forward(x)
        gx = s.backward(g)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del y, gx
    # tracemalloc sees the arena, the output and grad_input on top of what was kept; the
    # tracker counts the input instead of grad_input, and the gradient buffers (kept, so in
    # base) as held while backward runs.
    measured = peak - base + s.gradient_workspace_bytes(64)
    tracked = s.memory_tracker.peak_bytes
    assert abs(tracked - measured) <= 0.10 * measured, (tracked, measured)


# --------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing changed
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_dropout_refuses_p_outside_0_1(p):
    with pytest.raises(ValueError, match="dropout probability p must be a number in"):
        Dropout(p)


@pytest.mark.parametrize("eps", [0, -1e-5, float("nan"), float("inf"), "1e-5"])
def test_layernorm_refuses_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a positive number"):
        LayerNorm(4, eps)


def test_residual_refuses_mismatched_widths_and_a_width_change():
    with pytest.raises(ValueError, match=r"Residual layer 1: Dense expects 5 input features, got 4"):
        Residual(Dense(4, 4, rng=0), Dense(5, 4, rng=1))
    with pytest.raises(ValueError, match=r"must keep its width: its layers map 4 features to 6"):
        Residual(Dense(4, 6, rng=0))
    with pytest.raises(ValueError, match="at least one layer"):
        Residual()
    with pytest.raises(TypeError, match="must be a ckpt Layer"):
        Residual(Dense(4, 4, rng=0), "relu")
    d = Dense(4, 4, rng=0)
    with pytest.raises(ValueError, match="appears twice"):
        Residual(d, d)


def test_parameter_assignment_copies_and_checks_shape_and_dtype():
    layers = [Dense(3, 4, rng=0), LayerNorm(4)]
    s = SegmentCheckpointer(layers, 1)
    x = batch(2, 3, np.float32)
    s.forward(x)
    s.backward(batch(2, 4, np.float32))
    W = layers[0].W
    layers[0].W = np.zeros((3, 4), np.float32)
    assert layers[0].W is W and not W.any()          # copied into the same array
    np.testing.assert_array_equal(s.forward(x), np.zeros((2, 4), np.float32))  # the chain sees it
    with pytest.raises(ValueError, match=r"Dense.W has shape \(3, 4\); cannot assign .* \(4, 3\)"):
        layers[0].W = np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError, match=r"Dense.W has dtype float32; cannot assign .* float64"):
        layers[0].W = np.zeros((3, 4))
    with pytest.raises(TypeError, match="LayerNorm.weight must be assigned a numpy array"):
        layers[1].weight = [1.0] * 4
    assert not W.any()


# --------------------------------------------------------------------------------------------
# Building, saving, the main job
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(residual=True, dropout=0.1), dict(residual=True),
                                    dict(norm="layernorm", dropout=0.2), {},
                                    dict(norm="batch", dropout=0.2),
                                    dict(residual=True, norm="batch", dropout=0.1),
                                    dict(residual=True, norm="batch")])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mlp_costs_are_the_built_layers_descriptions(kwargs, activation):
    from ckpt.costs import describe_chain
    from ckpt.train import mlp_costs
    built = describe_chain(build_mlp(10, 4, 16, 3, activation, seed=0, **kwargs))
    assert [e.costs for e in mlp_costs(10, 4, 16, 3, activation, **kwargs).elements] == \
        [e.costs for e in built.elements]


def test_residual_mlp_structure_and_branch_scaling():
    layers = build_mlp(64, 4, 32, 10, "relu", seed=0, residual=True, dropout=0.1)
    assert [type(layer).__name__ for layer in layers] == \
        ["Dense", "Residual", "Residual", "Residual", "Residual", "LayerNorm", "Dense"]
    assert [type(layer).__name__ for layer in layers[1].layers] == \
        ["LayerNorm", "Dense", "Dropout", "Dense"]
    first, last = layers[1].layers[1], layers[1].layers[3]
    # the branch's last Dense starts scaled down by 1 / depth from He-normal
    assert np.std(last.W) < 0.5 * np.std(first.W)
    s = SegmentCheckpointer(layers)
    assert s.checkpoint_every == 2 and s.executor == "compiled"     # floor(sqrt(7))
    with pytest.raises(ValueError, match="dropout must be a probability"):
        build_mlp(4, 2, 8, 2, dropout=1.0)
    with pytest.raises(ValueError, match="norm must be None, 'layer' or 'batch'"):
        build_mlp(4, 2, 8, 2, norm="batchnorm")


def test_load_model_rebuilds_every_layer_without_user_code(tmp_path):
    layers = build_mlp(8, 3, 16, 4, "gelu", np.float64, seed=0, residual=True, dropout=0.2)
    model = SegmentCheckpointer(layers, 2, seed=0)
    X, y = batch(40, 8), np.arange(40) % 4
    ckpt.fit(model, X, y, epochs=1, batch_size=8)
    path = tmp_path / "model.npz"
    ckpt.save(path, model)
    again = ckpt.load_model(path)
    assert again.checkpoint_every == 2 and again.dtype == np.float64
    assert [layer.layer_description for layer in again.layers] == \
        [layer.layer_description for layer in layers]
    np.testing.assert_array_equal(ckpt.predict(again, X), ckpt.predict(model, X))
    # load(path, model) still fills a model built in code
    other = SegmentCheckpointer(build_mlp(8, 3, 16, 4, "gelu", np.float64, seed=1,
                                          residual=True, dropout=0.2))
    ckpt.load(path, other)
    np.testing.assert_array_equal(ckpt.predict(other, X), ckpt.predict(model, X))
    # a model of custom layers records no architecture
    custom = tmp_path / "custom.npz"
    ckpt.save(custom, [Hungry(4), Dense(4, 2, dtype=np.float64, rng=0)])
    with pytest.raises(ValueError, match="records no architecture"):
        ckpt.load_model(custom)


def test_predict_and_evaluate_run_in_evaluation_mode_and_restore_it():
    layers = build_mlp(8, 2, 32, 3, "relu", np.float64, seed=0, residual=True, dropout=0.5)
    model = SegmentCheckpointer(layers, seed=0)
    X = batch(20, 8)
    first = ckpt.predict(model, X)
    np.testing.assert_array_equal(ckpt.predict(model, X), first)      # no dropout: repeatable
    assert model.is_training and layers[1].layers[2].is_training      # restored
    model.set_training(False)
    ckpt.evaluate(model, X, np.zeros(20, np.int64))
    assert not model.is_training


def test_cli_trains_a_residual_network(capsys):
    import json
    from ckpt.cli import main
    assert main(["train", "--residual", "--depth", "3", "--width", "16", "--epochs", "2",
                 "--dropout", "0.1", "--json"]) == 0
    out = capsys.readouterr().out
    results = json.loads(out.strip().splitlines()[-1])
    assert results["architecture"] == "pre-norm residual MLP, 3 blocks (8 Dense layers, dropout 0.1)"
    assert results["elements"] == 6 and results["checkpoint_every"] == 2
    assert "model: pre-norm residual MLP, 3 blocks" in out
    assert results["peak_activation_bytes"] < results["peak_activation_bytes_plain"]
    assert results["test_accuracy"] > 0.5
