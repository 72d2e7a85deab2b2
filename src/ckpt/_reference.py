"""Pure-NumPy twins of ckpt's kernels, written to be read, gathered in one place.

Each twin lives beside what it mirrors -- an element kind's in its module of
:mod:`ckpt.elements`, an activation's in :mod:`ckpt.activations` -- and this module selects
them for the tests (which compare every compiled kernel with them) and the benchmarks (which
race against them). Derivatives are written as functions of the pre-activation z.
"""
from __future__ import annotations

from ckpt.activations import ACTIVATIONS as _TABLE
from ckpt.elements import kind_of
from ckpt.elements.activation import activation_backward, activation_forward  # noqa: F401
from ckpt.elements.dense import dense_backward, dense_forward  # noqa: F401
from ckpt.elements.dropout import dropout, dropout_mask  # noqa: F401
from ckpt.elements.layernorm import layernorm_backward, layernorm_forward  # noqa: F401
from ckpt.elements.residual import residual_forward  # noqa: F401

ACTIVATIONS = {name: entry.f for name, entry in _TABLE.items()}
DERIVATIVES = {name: entry.df for name, entry in _TABLE.items()}


def twin(layer):
    """The NumPy twin of a layer's kind (ckpt.elements.base.Twin), from the registry."""
    kind = kind_of(layer)
    if kind is None:
        raise TypeError(f"{type(layer).__name__} is not a registered element kind")
    return kind.twin
