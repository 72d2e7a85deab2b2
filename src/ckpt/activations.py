"""The activation table: every activation ckpt knows, in one place.

Each entry gives the activation's C code (the enum in ``_simd.h``, whose kernels compute it),
whether its derivative needs the pre-activation z (GELU's and SiLU's are not functions of
their output, so their backward recomputes z), the weight initialisation it calls for, and its
NumPy twin: f(z) and f'(z), written as functions of the pre-activation, as in the textbook.

Dense layers, the standalone Activation element, the executor, the cost model, the estimators,
the CLI's choices and the tests all read this table; adding an activation is its kernels in
``_simd_kernels.h``, its code in ``_simd.h``, and one entry here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np

from ckpt import _core

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(z):
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))),
                    np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


def _gelu(z):
    return 0.5 * z * (1 + _erf(z / math.sqrt(2)))


def _gelu_derivative(z):
    return 0.5 * (1 + _erf(z / math.sqrt(2))) + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _silu_derivative(z):
    s = _sigmoid(z)
    return s * (1 + z * (1 - s))


@dataclass(frozen=True)
class Activation:
    """One activation: ``name`` (None is the identity), its C ``code``, whether its backward
    needs the pre-activation, its He-normal gain as a function of the leaky slope (None:
    Glorot-uniform initialisation), and the NumPy twin ``f(z, alpha)`` / ``df(z, alpha)``."""

    name: Optional[str]
    code: int
    needs_preactivation: bool
    he_gain: Optional[Callable[[float], float]]
    f: Callable
    df: Callable

    @property
    def label(self) -> str:
        return "identity" if self.name is None else self.name


def _entries():
    codes = {name: code for code, name in enumerate(_core.activation_names())}
    def entry(name, preact, gain, f, df):
        return Activation(name, codes["identity" if name is None else name], preact, gain, f, df)
    return [
        entry(None, False, None, lambda z, a: z, lambda z, a: np.ones_like(z)),
        entry("relu", False, lambda slope: 2.0, lambda z, a: np.maximum(z, 0),
              lambda z, a: (z > 0).astype(z.dtype)),
        entry("leaky_relu", False, lambda slope: 2.0 / (1.0 + slope ** 2),
              lambda z, a: np.where(z > 0, z, a * z),
              lambda z, a: np.where(z > 0, 1, a).astype(z.dtype)),
        entry("tanh", False, None, lambda z, a: np.tanh(z), lambda z, a: 1 - np.tanh(z) ** 2),
        entry("sigmoid", False, None, lambda z, a: _sigmoid(z),
              lambda z, a: _sigmoid(z) * (1 - _sigmoid(z))),
        # The exact form z * Phi(z) with the normal CDF, as PyTorch's default.
        entry("gelu", True, lambda slope: 2.0, lambda z, a: _gelu(z),
              lambda z, a: _gelu_derivative(z)),
        entry("softplus", False, None,
              lambda z, a: np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z))),
              lambda z, a: _sigmoid(z)),
        # x * sigmoid(x) (Elfwing et al. 2018; "swish" with beta = 1), PyTorch's nn.SiLU. Like
        # ReLU it is unbounded above and near zero below, so it takes He initialisation.
        entry("silu", True, lambda slope: 2.0, lambda z, a: z * _sigmoid(z),
              lambda z, a: _silu_derivative(z)),
    ]


ACTIVATIONS: Dict[Optional[str], Activation] = {a.name: a for a in _entries()}
"""Every activation by name (None: the identity)."""

NAMES = tuple(name for name in ACTIVATIONS if name is not None)
"""The named activations, in code order (what the CLI and the estimators offer)."""


def get_activation(name: object) -> Activation:
    """The table entry of ``name``; ValueError naming the choices for anything else."""
    if not isinstance(name, (str, type(None))) or name not in ACTIVATIONS:
        choices = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"unknown activation {name!r}; choose one of {choices}")
    return ACTIVATIONS[name]
