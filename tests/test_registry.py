"""The registry of element kinds: every kind has what a kind must have, and a kind registered
from outside (a fake one here) shows up everywhere the registry is read, on the Python path."""
from __future__ import annotations

import numpy as np
import pytest

import ckpt
from ckpt import _core, _reference
from ckpt.costs import ElementCost
from ckpt.elements import (ElementKind, Layer, Twin, kind_of, kinds, layer_config,
                           layer_from_config, register, unregister)
from ckpt.executor import compilable
from conftest import numeric_gradient


class Scale(Layer):
    """A fake kind: y = x * s, with s a learnable vector; Python path only."""

    preserves_width = True
    _array_attributes = ("s", "grad_s")

    def __init__(self, features, *, dtype=np.float64):
        self.features = features
        self.dtype = np.dtype(dtype)
        self.s = np.linspace(0.5, 1.5, features).astype(self.dtype)
        self.grad_s = np.zeros_like(self.s)

    in_features = property(lambda self: self.features)
    out_features = property(lambda self: self.features)

    def describe(self, in_width=None):
        n = self.features
        return ElementCost("scale", n, n, stored=n, forward_flops=n, backward_flops=2 * n,
                           parameter_count=n, params=(self.s,), gradients=(self.grad_s,))

    def config(self):
        return {"kind": "Scale", "features": self.features, "dtype": self.dtype.name}

    def forward(self, x):
        return x * self.s

    def backward(self, x, grad_output, *, output=None):
        self.grad_s += (grad_output * x).sum(axis=0)
        return grad_output * self.s

    def params(self):
        return [self.s]

    def gradients(self):
        return [self.grad_s]


SCALE = ElementKind(
    "Scale", Scale, lambda args, build: Scale(**args),
    Twin(lambda layer, x, step: x * layer.s,
         lambda layer, x, g, step: (g * layer.s, [(g * x).sum(axis=0)])),
    example=lambda dtype, rng: Scale(5, dtype=dtype))


@pytest.fixture
def with_scale():
    register(SCALE)
    yield SCALE
    unregister("Scale")


def _check_kind(kind: ElementKind):
    """What every kind must have: a twin the layer agrees with, a cost, a config that
    round-trips, an executor record whose code the compiled executor knows (or none: the
    Python path), and gradients that finite differences confirm."""
    rng = np.random.default_rng(7)
    layer = kind.example(np.dtype(np.float64), rng)
    assert isinstance(layer, kind.layer) and kind_of(layer) is kind
    x = rng.standard_normal((6, layer.describe(5).in_width))
    cost = layer.describe(x.shape[1])
    assert isinstance(cost, ElementCost) and cost.in_width == x.shape[1]

    rebuilt = layer_from_config(layer_config(layer))
    assert type(rebuilt) is type(layer) and rebuilt.config() == layer.config()

    if kind.executor is None:
        assert not compilable([layer])
    else:
        assert kind.executor.code in _core.ELEMENT_KINDS
        assert compilable([layer])

    step = ckpt.elements.Step(seed=3)
    y = layer.forward_step(x, step)
    np.testing.assert_allclose(y, kind.twin.forward(layer, x, step), rtol=1e-12, atol=1e-12)
    weights = rng.standard_normal(y.shape)
    layer.zero_grad()
    gx = layer.backward_step(x, weights, step)
    twin_gx, twin_grads = kind.twin.backward(layer, x, weights, step)
    np.testing.assert_allclose(gx, twin_gx, rtol=1e-10, atol=1e-12)
    for got, want in zip(layer.gradients(), twin_grads):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)

    # Finite differences, in evaluation mode where a kind is stochastic (Dropout's mask), each
    # evaluation a step of its own (BatchNorm recomputes its batch statistics for a new step).
    for training in ((False,) if layer.uses_stream else (True, False)):
        layer.set_training(training)
        loss = lambda: float((layer.forward_step(x, ckpt.elements.Step(3)) * weights).sum())  # noqa: E731
        step = ckpt.elements.Step(3)
        layer.forward_step(x, step)
        layer.zero_grad()
        gx = layer.backward_step(x, weights, step)
        np.testing.assert_allclose(gx, numeric_gradient(loss, x), rtol=1e-6, atol=1e-7)
        for p, g in zip(layer.params(), layer.gradients()):
            np.testing.assert_allclose(g, numeric_gradient(loss, p), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [kind.name for kind in kinds()])
def test_every_built_in_kind_has_what_a_kind_needs(name):
    _check_kind(next(kind for kind in kinds() if kind.name == name))


def test_the_built_in_kinds_are_the_documented_ones():
    assert [kind.name for kind in kinds()] == ["Dense", "LayerNorm", "Dropout", "Residual",
                                               "Activation", "BatchNorm"]
    assert {kind.name for kind in kinds() if kind.executor is None} == {"Activation",
                                                                          "BatchNorm"}


def test_a_registered_kind_shows_up_everywhere_and_runs_on_the_python_path(with_scale):
    assert with_scale in kinds()
    _check_kind(with_scale)
    layer = Scale(4)
    assert _reference.twin(layer) is with_scale.twin
    assert layer_from_config({"kind": "Scale", "features": 4, "dtype": "float64"}).features == 4
    layers = [ckpt.Dense(3, 4, "relu", dtype=np.float64, rng=0), layer,
              ckpt.Dense(4, 2, dtype=np.float64, rng=1)]
    model = ckpt.SegmentCheckpointer(layers, checkpoint_every=2)
    assert model.executor == "python"
    x = np.random.default_rng(0).standard_normal((5, 3))
    y = model.forward(x)
    model.backward(np.ones_like(y), accumulate=False)
    assert np.any(layer.grad_s != 0)


def test_unregistered_layers_are_refused_by_save_and_load(with_scale):
    unregister("Scale")
    try:
        with pytest.raises(TypeError, match="not one of ckpt's built-in layers"):
            layer_config(Scale(3))
        with pytest.raises(ValueError, match="unknown layer kind 'Scale'"):
            layer_from_config({"kind": "Scale", "features": 3})
    finally:
        register(SCALE)


def test_registering_twice_or_an_unknown_executor_code_is_refused(with_scale):
    with pytest.raises(ValueError, match="already registered"):
        register(SCALE)
    with pytest.raises(TypeError, match="ElementKind"):
        register("Scale")
    bogus = ElementKind("Bogus", type("Bogus", (Scale,), {}), SCALE.from_config, SCALE.twin,
                        SCALE.example, ckpt.elements.ExecutorRecord("no-such-kind", None))
    with pytest.raises(ValueError, match="no kind 'no-such-kind'"):
        register(bogus)
