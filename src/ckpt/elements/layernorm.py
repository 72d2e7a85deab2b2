"""The LayerNorm kind: PyTorch's nn.LayerNorm over each row.

Its Layer class, its cost, its config, its NumPy twin and its executor record; its kernels are
in ``_layernorm.pxi``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ckpt import _core
from ckpt.costs import ElementCost
from ckpt.elements._checks import (DTypeLike, _check_eps, _check_in_width, as_batch,
                                   check_allocation, check_blas_size, check_float_dtype)
from ckpt.elements.base import ElementKind, ExecutorRecord, Layer, RowContext, Twin


def layernorm_cost(n: int, *, params: Sequence[np.ndarray] = (),
                   gradients: Sequence[np.ndarray] = ()) -> ElementCost:
    """A LayerNorm: a few passes per row; its backward recomputes the row statistics."""
    return ElementCost("layernorm", n, n, stored=n, forward_flops=8 * n, backward_flops=14 * n,
                       parameter_count=2 * n, reads_output=False, params=tuple(params),
                       gradients=tuple(gradients))


class LayerNorm(Layer):
    """Normalises each row to zero mean and unit variance, then scales and shifts it:
    y = (x - mean) / sqrt(var + eps) * weight + bias, as PyTorch's ``nn.LayerNorm`` (biased
    variance, eps inside the square root). ``weight`` starts at ones, ``bias`` at zeros.

    Its backward recomputes the row statistics from the input, so it stores nothing beyond its
    output and needs no scratch.
    """

    preserves_width = True
    _array_attributes = ("weight", "bias", "grad_weight", "grad_bias")

    def __init__(self, features: int, eps: float = 1e-5, *,
                 dtype: DTypeLike = np.float32) -> None:
        # Dense's 32-bit BLAS limit bounds every width a LayerNorm can meet in a chain; the four
        # parameter and gradient vectors are checked against memory before allocating.
        self.features = check_blas_size(features, "features")
        self.eps = _check_eps(eps)
        self.dtype = check_float_dtype(dtype)
        check_allocation(4 * self.features * self.dtype.itemsize,
                         f"LayerNorm({self.features}, {self.dtype.name})")
        self.weight = np.ones(self.features, self.dtype)
        self.bias = np.zeros(self.features, self.dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)

    @property
    def in_features(self) -> int:
        return self.features

    @property
    def out_features(self) -> int:
        return self.features

    def describe(self, in_width: Optional[int] = None) -> ElementCost:
        _check_in_width(self, in_width, self.features)
        return layernorm_cost(self.features, params=self.params(), gradients=self.gradients())

    def config(self) -> dict:
        return {"kind": "LayerNorm", "features": self.features, "eps": self.eps,
                "dtype": self.dtype.name}

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = as_batch(x, self.features, self.dtype, "the input", self._name)
        y = np.empty_like(x)
        _core.layernorm_forward(x, self.weight, self.bias, y, self.eps)
        return y

    def backward(self, x: np.ndarray, grad_output: np.ndarray, *,
                 output: Optional[np.ndarray] = None) -> np.ndarray:
        x = as_batch(x, self.features, self.dtype, "the input", self._name)
        g = as_batch(grad_output, self.features, self.dtype, "grad_output", self._name)
        if g.shape[0] != x.shape[0]:
            raise ValueError(f"{self._name}: grad_output has {g.shape[0]} rows but the input "
                             f"has {x.shape[0]}")
        grad_input = np.empty_like(x)
        _core.layernorm_backward(x, self.weight, g, grad_input, self.grad_weight,
                                 self.grad_bias, self.eps)
        return grad_input

    def params(self) -> list:
        return [self.weight, self.bias]

    def gradients(self) -> list:
        return [self.grad_weight, self.grad_bias]

    @property
    def _name(self) -> str:
        return f"LayerNorm({self.features})"

    @property
    def layer_description(self) -> str:
        return f"LayerNorm({self.features}, eps={self.eps:g}, dtype={self.dtype.name})"


# ---------------------------------------------------------------------------------------------
# The NumPy twin
# ---------------------------------------------------------------------------------------------

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


def _twin_backward(layer: LayerNorm, x, g, step):
    gx, gw, gb = layernorm_backward(x, layer.weight, g, layer.eps)
    return gx, [gw, gb]


def _row(layer: LayerNorm, cost: ElementCost, ctx: RowContext) -> dict:
    return {"param": ctx.add_parameters(layer), "eps": layer.eps}


KIND = ElementKind(
    "LayerNorm", LayerNorm, lambda args, build: LayerNorm(**args),
    Twin(lambda layer, x, step: layernorm_forward(x, layer.weight, layer.bias, layer.eps),
         _twin_backward),
    example=lambda dtype, rng: LayerNorm(5, dtype=dtype),
    executor=ExecutorRecord("layernorm", _row))
