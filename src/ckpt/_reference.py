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


def layernorm_forward(x, weight, bias, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, per row (biased variance)."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=1, keepdims=True)
    return ((x64 - mean) / np.sqrt(var + eps) * weight + bias).astype(x.dtype)


def layernorm_backward(x, weight, grad_output, eps=1e-5):
    """Returns (grad_input, grad_weight, grad_bias) for y = layernorm(x) * weight + bias."""
    x64, g = x.astype(np.float64), grad_output.astype(np.float64)
    n = x.shape[1]
    mean = x64.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(((x64 - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    xhat = (x64 - mean) * rstd
    dxhat = g * weight
    gx = rstd * (dxhat - dxhat.sum(axis=1, keepdims=True) / n
                 - xhat * (dxhat * xhat).sum(axis=1, keepdims=True) / n)
    return (gx.astype(x.dtype), (g * xhat).sum(axis=0).astype(x.dtype),
            g.sum(axis=0).astype(x.dtype))


_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z):
    """SplitMix64's finalizer on uint64 arrays (wrapping arithmetic), as in ckpt/_rng.h."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):   # 0-d arrays warn on the wrap that is meant here
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_mask(shape, p, seed, stream=0, row0=0):
    """The keep mask of ckpt's Dropout: bits(key, row, column) >= floor(p * 2^32), with
    key = mix64(seed ^ mix64(stream)) and bits = mix64(key + ((row << 32) | column) * GAMMA) >> 32."""
    rows, cols = shape
    key = _mix64(np.uint64(seed) ^ _mix64(np.uint64(stream)))
    row = (np.arange(rows, dtype=np.uint64) + np.uint64(row0))[:, None]
    col = np.arange(cols, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        bits = _mix64(key + ((row << np.uint64(32)) | col) * _GAMMA) >> np.uint64(32)
    return bits >= np.uint64(int(p * 2**32))


def dropout(x, p, seed, stream=0, row0=0):
    """x * mask / (1 - p), as ckpt's Dropout in training (also its backward, on the gradient)."""
    scale = x.dtype.type(1.0 / (1.0 - p))
    return x * np.where(dropout_mask(x.shape, p, seed, stream, row0), scale, x.dtype.type(0))


def residual_forward(x, layers):
    """y = x + f(x), f = the layers' forwards in order (each a callable)."""
    h = x
    for layer in layers:
        h = layer(h)
    return x + h
