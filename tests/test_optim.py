"""Optimizers: fused kernels against the NumPy reference over several steps, state, validation."""
import tracemalloc

import numpy as np
import pytest

from ckpt import _reference_train as ref
from ckpt.checkpoint import SegmentCheckpointer
from ckpt.layers import Dense
from ckpt.optim import SGD, Adam, AdamW

TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}
DTYPES = [np.float32, np.float64]


def _layers(dtype, seed=0):
    return [Dense(5, 4, "relu", dtype=dtype, rng=seed), Dense(4, 3, dtype=dtype, rng=seed + 1)]


def _set_random_gradients(model, rng):
    grads = []
    for g in model.gradients() if hasattr(model, "gradients") else \
            [g for layer in model for g in layer.gradients()]:
        g[...] = rng.standard_normal(g.shape)
        grads.append(g.astype(np.float64))
    return grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum, nesterov, weight_decay", [
    (0.0, False, 0.0), (0.0, False, 0.1), (0.9, False, 0.0), (0.9, True, 0.0), (0.5, True, 0.05),
])
def test_sgd_matches_reference(dtype, momentum, nesterov, weight_decay):
    model = SegmentCheckpointer(_layers(dtype))
    opt = SGD(model, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    expected = [p.astype(np.float64) for p in model.params()]
    bufs = [None] * len(expected)
    rng = np.random.default_rng(0)
    for _ in range(5):
        grads = _set_random_gradients(model, rng)
        opt.step()
        for i, g in enumerate(grads):
            expected[i], bufs[i] = ref.sgd_step(expected[i], g, bufs[i], 0.1, momentum, nesterov,
                                                weight_decay)
    for p, e in zip(model.params(), expected):
        assert p.dtype == dtype
        np.testing.assert_allclose(p, e, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls, weight_decay", [(Adam, 0.0), (Adam, 0.1), (AdamW, 0.0),
                                               (AdamW, 0.1)])
def test_adam_matches_reference(dtype, cls, weight_decay):
    layers = _layers(dtype)
    opt = cls(layers, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    params = [p for layer in layers for p in layer.params()]
    expected = [p.astype(np.float64) for p in params]
    m = [np.zeros_like(e) for e in expected]
    v = [np.zeros_like(e) for e in expected]
    rng = np.random.default_rng(1)
    for t in range(1, 7):
        grads = _set_random_gradients(layers, rng)
        opt.step()
        for i, g in enumerate(grads):
            expected[i], m[i], v[i] = ref.adam_step(expected[i], g, m[i], v[i], t, 0.01,
                                                    (0.8, 0.99), 1e-6, weight_decay,
                                                    decoupled=cls is AdamW)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p, e, **TOL[dtype])
    assert opt.step_count == 6


def test_adam_first_step_is_bias_corrected():
    # With bias correction, the first step moves every weight by lr * sign(g), whatever |g|.
    layer = Dense(3, 2, dtype=np.float64, rng=0)
    before = layer.W.copy()
    layer.grad_W[...] = [[1e-3, -5.0], [2.0, -1e-2], [7.0, 0.5]]
    Adam(layer, lr=0.01, eps=1e-12).step()
    np.testing.assert_allclose(before - layer.W, 0.01 * np.sign(layer.grad_W), rtol=1e-6)


def test_adamw_decays_weights_without_gradient():
    layer = Dense(3, 2, dtype=np.float64, rng=0)
    before = layer.W.copy()
    AdamW(layer, lr=0.1, weight_decay=0.5).step()   # zero gradients: only the decay acts
    np.testing.assert_allclose(layer.W, before * (1 - 0.1 * 0.5))


def test_state_bytes_and_no_allocation_per_step():
    layers = [Dense(64, 128, "relu", rng=0), Dense(128, 10, rng=1)]
    param_bytes = sum(p.nbytes for layer in layers for p in layer.params())
    assert SGD(layers, lr=0.1).state_bytes == 0
    assert SGD(layers, lr=0.1, momentum=0.9).state_bytes == param_bytes
    opt = Adam(layers)
    assert opt.state_bytes == 2 * param_bytes
    opt.step()
    tracemalloc.start()
    for _ in range(3):
        opt.step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < param_bytes / 20
    assert opt.state_bytes == 2 * param_bytes


def test_zero_grad():
    layers = _layers(np.float32)
    opt = SGD(layers, lr=0.1)
    _set_random_gradients(layers, np.random.default_rng(0))
    opt.zero_grad()
    assert all(not g.any() for layer in layers for g in layer.gradients())


@pytest.mark.parametrize("make", [
    lambda m: SGD(m, lr=0.1, momentum=0.9, nesterov=True),
    lambda m: Adam(m, lr=0.01),
    lambda m: AdamW(m, lr=0.01),
])
def test_state_dict_round_trip_continues_identically(make):
    rng = np.random.default_rng(0)
    a = _layers(np.float64)
    b = _layers(np.float64)
    opt_a, opt_b = make(a), make(b)
    for _ in range(3):
        _set_random_gradients(a, rng)
        opt_a.step()
    for la, lb in zip(a, b):
        lb.set_params(la.params())
    opt_b.load_state_dict(opt_a.state_dict())
    assert opt_b.step_count == 3
    for _ in range(2):
        grads = _set_random_gradients(a, rng)
        for lb, start in zip(b, range(0, len(grads), 2)):
            lb.set_gradients(grads[start:start + 2])
        opt_a.step()
        opt_b.step()
    for la, lb in zip(a, b):
        for pa, pb in zip(la.params(), lb.params()):
            np.testing.assert_array_equal(pa, pb)


def test_load_state_dict_rejects_mismatch_and_changes_nothing():
    opt = Adam(_layers(np.float32))
    opt.step()
    before = opt.state_dict()
    other = Adam([Dense(5, 4, dtype=np.float32, rng=0)]).state_dict()
    with pytest.raises(ValueError, match="2 buffers for 4 parameters"):
        opt.load_state_dict(other)
    with pytest.raises(ValueError, match="state is of a SGD optimizer"):
        opt.load_state_dict(SGD(_layers(np.float32), lr=0.1).state_dict())
    bad = opt.state_dict()
    bad["hyperparameters"]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["step"] == before["step"] == 1
    for name in before["buffers"]:
        for x, y in zip(before["buffers"][name], after["buffers"][name]):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("make, error, match", [
    (lambda m: SGD(m, lr=-0.1), ValueError, "lr must be in"),
    (lambda m: SGD(m, lr=0.1, momentum=1.0), ValueError, "momentum must be in"),
    (lambda m: SGD(m, lr=0.1, nesterov=True), ValueError, "Nesterov momentum needs"),
    (lambda m: SGD(m, lr=0.1, weight_decay=-1), ValueError, "weight_decay must be in"),
    (lambda m: SGD(m, lr="fast"), TypeError, "lr must be a number"),
    (lambda m: SGD(m, lr=float("nan")), ValueError, "lr must be in"),
    (lambda m: Adam(m, betas=(0.9,)), ValueError, "betas must be a pair"),
    (lambda m: Adam(m, betas=(0.9, 1.0)), ValueError, "beta2 must be in"),
    (lambda m: Adam(m, eps=-1e-8), ValueError, "eps must be in"),
    (lambda m: Adam(object()), TypeError, "needs params"),
    (lambda m: Adam([]), ValueError, "no parameters"),
])
def test_hyperparameters_are_validated(make, error, match):
    with pytest.raises(error, match=match):
        make(_layers(np.float32))


def test_repr():
    assert repr(SGD(_layers(np.float32), lr=0.5)).startswith("SGD(lr=0.5, momentum=0.0")


def test_a_layer_given_twice_is_refused():
    layer = Dense(3, 2, rng=0)
    with pytest.raises(ValueError, match="appears twice"):
        SGD([layer, layer], lr=0.1)


@pytest.mark.parametrize("make, match", [
    (lambda m: Adam(m, eps=0), r"eps must be in \(0.0, inf\)"),
    (lambda m: AdamW(m, eps=0.0), r"eps must be in \(0.0, inf\)"),
    (lambda m: Adam(m, eps=1e-50), "eps = 1e-50 rounds to 0 in the parameters' float32"),
    (lambda m: Adam(m, lr=1e39), "lr = 1e[+]39 overflows the parameters' float32"),
    (lambda m: SGD(m, lr=1e-50), "lr = 1e-50 rounds to 0"),
    (lambda m: Adam(m, betas=(0.9, 0.99999999)), "beta2 = 0.99999999 rounds to 1"),
    (lambda m: SGD(m, lr=0.1, momentum=0.999999999), "momentum = 0.999999999 rounds to 1"),
    (lambda m: AdamW(m, lr=10.0, weight_decay=0.5), "lr [*] weight_decay must be at most 1"),
])
def test_hyperparameters_that_would_give_nan_or_nothing_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make(_layers(np.float32))


def test_adam_with_a_zero_gradient_keeps_the_parameters_finite():
    layers = _layers(np.float32)
    opt = Adam(layers)
    opt.step()
    assert all(np.isfinite(p).all() for layer in layers for p in layer.params())


def test_a_state_with_eps_zero_is_refused_and_changes_nothing():
    layers = _layers(np.float32)
    opt = Adam(layers)
    state = opt.state_dict()
    state["hyperparameters"]["eps"] = 0.0
    with pytest.raises(ValueError, match="eps must be in"):
        opt.load_state_dict(state)
    assert opt.eps == 1e-8


def test_parameters_sharing_memory_with_gradients_are_refused():
    class Aliased:
        def __init__(self):
            self.buffer = np.zeros(10)

        def params(self):
            return [self.buffer[:6]]

        def gradients(self):
            return [self.buffer[4:]]     # overlaps the parameter: a step would read what it wrote

    with pytest.raises(ValueError, match="parameter 0 and gradient 0 share memory"):
        SGD(Aliased(), lr=0.1)
    assert SGD(_layers(np.float64), lr=0.1).parameters[0].shape == (5, 4)
