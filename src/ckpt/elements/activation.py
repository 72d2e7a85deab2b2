"""The Activation kind: y = act(x) on its own, for blocks such as Dense -> BatchNorm ->
activation (a Dense keeps its fused activation).

It has no executor record: a chain holding one runs on the Python path, through these
methods, which compute with the activation table's NumPy functions in the input's dtype.
"""
from __future__ import annotations

import numbers
from typing import Optional

import numpy as np

from ckpt.activations import ACTIVATIONS, get_activation
from ckpt.costs import ElementCost, _Undescribable
from ckpt.elements._checks import _float_batch
from ckpt.elements.base import ElementKind, Layer, Twin


def activation_cost(n: int, *, needs_preactivation: bool) -> ElementCost:
    """An elementwise activation: a few FLOPs per value each way. Its backward reads its
    output, or its input when the derivative needs the pre-activation."""
    return ElementCost("activation", n, n, stored=n, forward_flops=n, backward_flops=2 * n,
                       reads_output=not needs_preactivation)


class Activation(Layer):
    """y = act(x), one of the activation table's names ("relu", "gelu", ...), elementwise;
    ``negative_slope`` is leaky_relu's slope. It has no parameters, and no width or dtype of
    its own: it takes its input's."""

    preserves_width = True

    def __init__(self, activation: str, *, negative_slope: float = 0.01) -> None:
        if activation is None:
            raise ValueError("Activation needs an activation name; the identity needs no layer")
        act = get_activation(activation)
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real) \
                or not 0 <= negative_slope < 1:
            raise ValueError(f"negative_slope must be a number in [0, 1), got {negative_slope!r}")
        self.activation = act.name
        self.negative_slope = float(negative_slope)

    def describe(self, in_width: Optional[int] = None) -> ElementCost:
        if in_width is None:
            raise _Undescribable(self.layer_type)
        return activation_cost(in_width,
                               needs_preactivation=ACTIVATIONS[self.activation].needs_preactivation)

    def config(self) -> dict:
        return {"kind": "Activation", "activation": self.activation,
                "negative_slope": self.negative_slope}

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _float_batch(x, "the input", self.layer_type)
        return activation_forward(x, self.activation, self.negative_slope)

    def backward(self, x: np.ndarray, grad_output: np.ndarray, *,
                 output: Optional[np.ndarray] = None) -> np.ndarray:
        x = _float_batch(x, "the input", self.layer_type)
        g = _float_batch(grad_output, "grad_output", self.layer_type)
        if g.shape != x.shape or g.dtype != x.dtype:
            raise ValueError(f"Activation: grad_output is {g.dtype} {g.shape} but the input "
                             f"{x.dtype} {x.shape}")
        return activation_backward(x, g, self.activation, self.negative_slope)

    @property
    def layer_description(self) -> str:
        return f"Activation({self.activation})"


def activation_forward(x, activation, alpha=0.01):
    """y = act(x), in x's dtype"""
    return ACTIVATIONS[activation].f(x, alpha).astype(x.dtype)


def activation_backward(x, grad_output, activation, alpha=0.01):
    """grad_input = grad_output * act'(x), in x's dtype"""
    return (grad_output * ACTIVATIONS[activation].df(x, alpha)).astype(x.dtype)


KIND = ElementKind(
    "Activation", Activation, lambda args, build: Activation(**args),
    Twin(lambda layer, x, step: activation_forward(x, layer.activation, layer.negative_slope),
         lambda layer, x, g, step: (activation_backward(x, g, layer.activation,
                                                        layer.negative_slope), [])),
    example=lambda dtype, rng: Activation("tanh"))
