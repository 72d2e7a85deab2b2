"""Pure-NumPy twins of ckpt's kernels, written to be read.

The tests compare every compiled kernel with these; the benchmarks race against them.
Derivatives are written as functions of the pre-activation z, as in the textbook.
"""
from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(z):
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


def _gelu(z):
    return 0.5 * z * (1 + _erf(z / math.sqrt(2)))


def _gelu_derivative(z):
    return 0.5 * (1 + _erf(z / math.sqrt(2))) + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


ACTIVATIONS = {
    None: lambda z, a: z,
    "relu": lambda z, a: np.maximum(z, 0),
    "leaky_relu": lambda z, a: np.where(z > 0, z, a * z),
    "tanh": lambda z, a: np.tanh(z),
    "sigmoid": lambda z, a: _sigmoid(z),
    "gelu": lambda z, a: _gelu(z),
    "softplus": lambda z, a: np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z))),
}

DERIVATIVES = {
    None: lambda z, a: np.ones_like(z),
    "relu": lambda z, a: (z > 0).astype(z.dtype),
    "leaky_relu": lambda z, a: np.where(z > 0, 1, a).astype(z.dtype),
    "tanh": lambda z, a: 1 - np.tanh(z) ** 2,
    "sigmoid": lambda z, a: _sigmoid(z) * (1 - _sigmoid(z)),
    "gelu": lambda z, a: _gelu_derivative(z),
    "softplus": lambda z, a: _sigmoid(z),
}


def dense_forward(x, w, b, activation=None, alpha=0.01):
    """y = act(x @ W + b)"""
    z = x @ w + b
    return ACTIVATIONS[activation](z, alpha).astype(x.dtype)


def dense_backward(x, w, b, grad_output, activation=None, alpha=0.01):
    """Returns (grad_input, grad_W, grad_b) for y = act(x @ W + b)."""
    z = x @ w + b
    d = (grad_output * DERIVATIVES[activation](z, alpha)).astype(x.dtype)
    return d @ w.T, x.T @ d, d.sum(axis=0)
