"""The Dense kind: y = act(x @ W + b), W of shape (in_features, out_features).

Its Layer class, its cost, its config, its NumPy twin and its executor record; its kernels are
in ``_dense.pxi``.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import numpy as np

from ckpt import _core
from ckpt.activations import ACTIVATIONS, get_activation
from ckpt.costs import ChainCosts, ElementCost
from ckpt.elements._checks import (DTypeLike, ActivationName, _as_generator, _check_in_width,
                                   _scratch, as_batch, check_allocation, check_blas_size,
                                   check_float_dtype)
from ckpt.elements.base import ElementKind, ExecutorRecord, Layer, RowContext, Twin


def dense_chain(widths: Sequence[int]) -> ChainCosts:
    """The descriptions of a chain of Dense layers (with an activation) of these activation
    widths a_0 .. a_N."""
    return ChainCosts(tuple(dense_cost(widths[i], widths[i + 1])
                            for i in range(len(widths) - 1)))


# Values of the float64 draw made at once when initialising weights (1 MiB).
_DRAW_BLOCK = 1 << 17


def dense_cost(n_in: int, n_out: int, *, needs_preactivation: bool = False,
               identity: bool = False, params: Sequence[np.ndarray] = (),
               gradients: Sequence[np.ndarray] = ()) -> ElementCost:
    """A Dense layer: one GEMM forward, two backward (an activation that needs its
    pre-activation recomputes it into a buffer of its output's size: one more GEMM). Without
    activation its backward never reads its output."""
    gemm = 2 * n_in * n_out
    return ElementCost("dense", n_in, n_out, stored=n_out, forward_flops=gemm,
                       backward_flops=(3 if needs_preactivation else 2) * gemm,
                       parameter_count=n_in * n_out + n_out, reads_output=not identity,
                       params=tuple(params), gradients=tuple(gradients))


class Dense(Layer):
    """A fully-connected layer, y = act(x @ W + b), with W of shape (in_features, out_features).

    Activations (:mod:`ckpt.activations`): None (identity), "relu", "leaky_relu" (slope
    ``negative_slope`` below zero), "tanh", "sigmoid", "gelu" (the exact form x * Phi(x) with
    the normal CDF, as PyTorch's default), "softplus", "silu" (x * sigmoid(x)).

    Initialisation, as the activation table says: He-normal, std = sqrt(gain / in_features),
    for relu, gelu and silu (gain 2; for leaky_relu 2 / (1 + slope^2)); Glorot-uniform, limit
    sqrt(6 / (in + out)), for the others. Biases start at zero. ``rng`` is a numpy Generator or
    an int seed.

    Inputs must have the layer's dtype (no silent casts; TypeError otherwise); arrays that are
    not C-contiguous are copied once. The layer stores no activation: ``backward`` recomputes the
    output from ``x`` unless it is passed as ``output=`` (GELU always recomputes its
    pre-activation, since its derivative is not a function of its output; so do the other
    activations whose table entry says ``needs_preactivation``).
    """

    def __init__(self, in_features: int, out_features: int, activation: ActivationName = None, *,
                 dtype: DTypeLike = np.float32, rng: Union[None, int, np.random.Generator] = None,
                 negative_slope: float = 0.01) -> None:
        self.in_features = check_blas_size(in_features, "in_features")
        self.out_features = check_blas_size(out_features, "out_features")
        act = get_activation(activation)
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real) \
                or not 0 <= negative_slope < 1:
            raise ValueError(f"negative_slope must be a number in [0, 1), got {negative_slope!r}")
        self.dtype = check_float_dtype(dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self._act_code = act.code
        # W and grad_W in the layer's dtype, and one block of the float64 draw they start from.
        size = self.in_features * self.out_features
        check_allocation(size * 2 * self.dtype.itemsize + min(size, _DRAW_BLOCK) * 8,
                         f"Dense({self.in_features} -> {self.out_features}, {self.dtype.name})")
        rng = _as_generator(rng)
        self.W = self._initial_weights(rng)
        self.b = np.zeros(self.out_features, self.dtype)
        self.grad_W = np.zeros_like(self.W)
        self.grad_b = np.zeros_like(self.b)

    _array_attributes = ("W", "b", "grad_W", "grad_b")

    @property
    def _act(self):
        """The activation's entry in the table (looked up, so that a Dense pickles as data)."""
        return ACTIVATIONS[self.activation]

    def config(self) -> dict:
        return {"kind": "Dense", "in_features": self.in_features,
                "out_features": self.out_features, "activation": self.activation,
                "negative_slope": self.negative_slope, "dtype": self.dtype.name}

    def describe(self, in_width: Optional[int] = None) -> ElementCost:
        _check_in_width(self, in_width, self.in_features)
        return dense_cost(self.in_features, self.out_features,
                          needs_preactivation=self._act.needs_preactivation,
                          identity=self.activation is None, params=self.params(),
                          gradients=self.gradients())

    def _initial_weights(self, rng: np.random.Generator) -> np.ndarray:
        """The weights, drawn in float64 and rounded to the layer's dtype block by block: the
        same values as one draw of the whole matrix (a Generator's stream does not depend on
        how it is cut), without a float64 copy of it."""
        w = np.empty((self.in_features, self.out_features), self.dtype)
        flat = w.reshape(-1)
        if self._act.he_gain is not None:
            std = np.sqrt(self._act.he_gain(self.negative_slope) / self.in_features)
            draw = lambda n: rng.normal(0.0, std, n)  # noqa: E731
        else:
            limit = np.sqrt(6.0 / (self.in_features + self.out_features))
            draw = lambda n: rng.uniform(-limit, limit, n)  # noqa: E731
        for start in range(0, flat.size, _DRAW_BLOCK):
            flat[start:start + _DRAW_BLOCK] = draw(min(_DRAW_BLOCK, flat.size - start))
        return w

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = as_batch(x, self.in_features, self.dtype, "the input", self._name)
        y = np.empty((x.shape[0], self.out_features), self.dtype)
        _core.dense_forward(x, self.W, self.b, y, self._act_code, self.negative_slope)
        return y

    def backward(self, x: np.ndarray, grad_output: np.ndarray, *,
                 output: Optional[np.ndarray] = None) -> np.ndarray:
        x = as_batch(x, self.in_features, self.dtype, "the input", self._name)
        g = as_batch(grad_output, self.out_features, self.dtype, "grad_output", self._name)
        if g.shape[0] != x.shape[0]:
            raise ValueError(f"{self._name}: grad_output has {g.shape[0]} rows but the input "
                             f"has {x.shape[0]}")
        shape = (x.shape[0], self.out_features)
        if output is not None:
            output = as_batch(output, self.out_features, self.dtype, "output", self._name)
            if output.shape[0] != x.shape[0]:
                raise ValueError(f"{self._name}: output has {output.shape[0]} rows but the input "
                                 f"has {x.shape[0]}")
        v = d = None
        if self.activation is not None:
            d = _scratch.get(shape, self.dtype)
            if self._act.needs_preactivation:
                _core.dense_forward(x, self.W, self.b, d, 0, 0.0)
                v = d
            elif output is not None:
                v = output
            else:
                _core.dense_forward(x, self.W, self.b, d, self._act_code, self.negative_slope)
                v = d
        grad_input = np.empty_like(x)
        _core.dense_backward(x, self.W, g, v, d, self.grad_W, self.grad_b, grad_input,
                             self._act_code, self.negative_slope)
        return grad_input

    def params(self) -> list:
        return [self.W, self.b]

    def gradients(self) -> list:
        return [self.grad_W, self.grad_b]

    @property
    def _name(self) -> str:
        return f"Dense({self.in_features}->{self.out_features})"

    @property
    def layer_description(self) -> str:
        act = self.activation or "identity"
        return (f"Dense({self.in_features} -> {self.out_features}, activation={act}, "
                f"dtype={self.dtype.name}, parameters={self.parameter_count})")


# ---------------------------------------------------------------------------------------------
# The NumPy twin (derivatives as functions of the pre-activation z)
# ---------------------------------------------------------------------------------------------

def dense_forward(x, w, b, activation=None, alpha=0.01):
    """y = act(x @ W + b)"""
    z = x @ w + b
    return ACTIVATIONS[activation].f(z, alpha).astype(x.dtype)


def dense_backward(x, w, b, grad_output, activation=None, alpha=0.01):
    """Returns (grad_input, grad_W, grad_b) for y = act(x @ W + b)."""
    z = x @ w + b
    d = (grad_output * ACTIVATIONS[activation].df(z, alpha)).astype(x.dtype)
    return d @ w.T, x.T @ d, d.sum(axis=0)


def _twin_backward(layer: Dense, x, g, step):
    gx, gw, gb = dense_backward(x, layer.W, layer.b, g, layer.activation, layer.negative_slope)
    return gx, [gw, gb]


def _row(layer: Dense, cost: ElementCost, ctx: RowContext) -> dict:
    return {"param": ctx.add_parameters(layer), "act": layer._act_code,
            "needs_preactivation": int(layer._act.needs_preactivation),
            "alpha": layer.negative_slope}


def _from_config(args: dict, build) -> Dense:
    return Dense(**args, rng=0)


KIND = ElementKind(
    "Dense", Dense, _from_config,
    Twin(lambda layer, x, step: dense_forward(x, layer.W, layer.b, layer.activation,
                                              layer.negative_slope),
         _twin_backward),
    example=lambda dtype, rng: Dense(5, 4, "tanh", dtype=dtype, rng=rng),
    executor=ExecutorRecord("dense", _row))
