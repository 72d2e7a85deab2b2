"""The Dropout kind: inverted dropout whose mask is recomputed, never stored.

Its Layer class, its cost, its config, its NumPy twin and its executor record; its kernel is in
``_dropout.pxi``.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import numpy as np

from ckpt import _core
from ckpt.costs import ElementCost, _Undescribable
from ckpt.elements._checks import _as_generator, _float_batch
from ckpt.elements.base import ElementKind, ExecutorRecord, Layer, RowContext, Step, Twin, new_step


def dropout_cost(n: int) -> ElementCost:
    """A Dropout: one multiply per value each way; its mask is recomputed, never stored."""
    return ElementCost("dropout", n, n, stored=n, forward_flops=n, backward_flops=n,
                       reads_output=False)


class Dropout(Layer):
    """Inverted dropout: in training, each value is zeroed with probability ``p`` and the kept
    ones are scaled by 1 / (1 - p); in evaluation mode it is the identity.

    No mask is stored: it is a pure function of (the step's seed, this layer's stream id in its
    chain, the global row, the column), from a counter-based generator (ckpt/_rng.h), so every
    recomputation and the backward replay it exactly. Inside a checkpointer the checkpointer's
    seed governs; used on its own, each ``forward`` draws a new step seed from ``seed`` (an int
    or a Generator; None: unpredictable) and ``backward`` reuses the last one.

    It has no width or dtype of its own: it takes its input's.
    """

    preserves_width = True
    uses_stream = True

    def __init__(self, p: float = 0.5, *,
                 seed: Union[None, int, np.random.Generator] = None) -> None:
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
            raise ValueError(f"the dropout probability p must be a number in [0, 1), got {p!r}")
        self.p = float(p)
        self._rng = _as_generator(seed)
        self._last_step: Optional[Step] = None

    def describe(self, in_width: Optional[int] = None) -> ElementCost:
        if in_width is None:
            raise _Undescribable(self.layer_type)
        return dropout_cost(in_width)

    def config(self) -> dict:
        return {"kind": "Dropout", "p": self.p}

    def forward(self, x: np.ndarray) -> np.ndarray:
        # A refused input must not draw a step: the next backward uses the last good forward's.
        x = _float_batch(x, "the input", self.layer_type)
        step = new_step(self._rng, [])
        out = self.forward_step(x, step)
        self._last_step = step
        return out

    def backward(self, x: np.ndarray, grad_output: np.ndarray, *,
                 output: Optional[np.ndarray] = None) -> np.ndarray:
        if self._last_step is None:
            raise ValueError("Dropout.backward needs a forward first (its mask is keyed by the "
                             "forward's step)")
        return self.backward_step(x, grad_output, self._last_step)

    def forward_step(self, x: np.ndarray, step: Step) -> np.ndarray:
        x = _float_batch(x, "the input", self.layer_type)
        return self._apply(x, step)

    def backward_step(self, x: np.ndarray, grad_output: np.ndarray, step: Step, *,
                      output: Optional[np.ndarray] = None) -> np.ndarray:
        g = _float_batch(grad_output, "grad_output", self.layer_type)
        if isinstance(x, np.ndarray) and x.shape != g.shape:
            raise ValueError(f"Dropout: grad_output has shape {g.shape} but the input "
                             f"{x.shape}")
        return self._apply(g, step)

    def _apply(self, a: np.ndarray, step: Step) -> np.ndarray:
        out = np.empty_like(a)
        if not self.is_training or self.p == 0:
            np.copyto(out, a)
        else:
            _core.dropout_apply(a, out, self.p, step.seed, step.stream(self), step.row0)
        return out

    @property
    def layer_description(self) -> str:
        return f"Dropout(p={self.p:g})"


# ---------------------------------------------------------------------------------------------
# The NumPy twin
# ---------------------------------------------------------------------------------------------

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


def _twin_apply(layer: Dropout, a, step):
    if not layer.is_training or layer.p == 0:
        return a.copy()
    return dropout(a, layer.p, step.seed, step.stream(layer), step.row0)


def _row(layer: Dropout, cost: ElementCost, ctx: RowContext) -> dict:
    return {"p": layer.p, "stream": ctx.stream(layer)}


KIND = ElementKind(
    "Dropout", Dropout, lambda args, build: Dropout(**args),
    Twin(_twin_apply, lambda layer, x, g, step: (_twin_apply(layer, g, step), [])),
    example=lambda dtype, rng: Dropout(0.3),
    executor=ExecutorRecord("dropout", _row))
