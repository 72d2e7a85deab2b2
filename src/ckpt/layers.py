"""The Layer protocol and the Dense layer.

A layer keeps no copy of its activations: ``backward`` takes the input again, so whoever stores
activations (a checkpointer, or plain backprop) decides what is held, and can really free it.
"""
from __future__ import annotations

import numbers
import os
import threading
from abc import ABC, abstractmethod
from typing import Optional, Sequence, Union

import numpy as np

from ckpt import _core

ActivationName = Optional[str]
DTypeLike = Union[type, np.dtype, str]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_float_dtype(dtype: DTypeLike) -> np.dtype:
    """The numpy dtype for float32/float64; TypeError for anything else."""
    if dtype is None:
        raise TypeError("dtype must be float32 or float64, got None")
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def check_size(value: object, name: str) -> int:
    """A positive integer size, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


BLAS_INT_MAX = 2**31 - 1
"""The largest dimension the 32-bit BLAS of scipy-openblas32 accepts (its blasint is an int)."""


def check_blas_size(value: object, name: str) -> int:
    """A positive integer size that a 32-bit BLAS index can hold, or a clear error."""
    value = check_size(value, name)
    if value > BLAS_INT_MAX:
        raise ValueError(f"{name} = {value} exceeds the 32-bit BLAS limit {BLAS_INT_MAX}")
    return value


def available_memory_bytes() -> Optional[int]:
    """Bytes that can still be allocated without exhausting RAM and swap, or None if unknown.

    Linux's MemAvailable plus SwapFree from /proc/meminfo; elsewhere the physical memory
    (sysconf SC_PHYS_PAGES), an upper bound that still catches the impossible sizes.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return sum(int(fields[key].split()[0]) * 1024 for key in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(nbytes: int, what: str) -> None:
    """MemoryError naming the sizes, before allocating, when ``nbytes`` cannot fit in memory."""
    available = available_memory_bytes()
    if available is not None and nbytes > available:
        raise MemoryError(f"{what} needs {_format_bytes(nbytes)}, but only "
                          f"{_format_bytes(available)} of memory is available")


def _format_bytes(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def as_batch(x: object, features: int, dtype: np.dtype, name: str, owner: str) -> np.ndarray:
    """Check a (batch, features) array of the layer's dtype; copy it only if not C-contiguous.

    The dtype is never cast: a float64 array given to a float32 layer is a TypeError, so no
    silent copy or precision change happens on the hot path.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{owner}: {name} must be a numpy array, got {type(x).__name__}")
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{owner}: {name} is a masked array, whose mask ckpt would ignore; "
                        f"fill or drop the masked values first")
    if x.dtype != dtype:
        raise TypeError(f"{owner}: {name} has dtype {x.dtype}, expected {dtype} "
                        f"(convert with .astype(np.{dtype.name}))")
    if x.ndim != 2:
        raise ValueError(f"{owner}: {name} must be 2-D (batch, features), got shape {x.shape}")
    if x.shape[1] != features:
        raise ValueError(f"{owner} expects {name} with {features} features, got {x.shape[1]}")
    return np.ascontiguousarray(x)


class _Scratch(threading.local):
    """One growable buffer per thread and dtype, for Dense.backward's delta.

    Shared by all layers so that standalone backward calls allocate nothing in steady state and
    the workspace is one buffer, not one per layer.
    """

    def __init__(self) -> None:
        self.buffers: dict = {}

    def get(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        size = shape[0] * shape[1]
        buf = self.buffers.get(dtype)
        if buf is None or buf.size < size:
            buf = self.buffers[dtype] = np.empty(size, dtype)
        return buf[:size].reshape(shape)


_scratch = _Scratch()


class Layer(ABC):
    """What every ckpt layer implements.

    ``forward(x)`` returns the output; ``backward(x, grad_output, output=None)`` returns the
    gradient of the input and *accumulates* the parameter gradients, given the same ``x`` that
    went into ``forward`` (and optionally its output, to skip recomputing it).
    """

    _training = True

    @abstractmethod
    def forward(self, x: np.ndarray) -> np.ndarray:
        """The layer's output for a batch x."""

    @abstractmethod
    def backward(self, x: np.ndarray, grad_output: np.ndarray, *,
                 output: Optional[np.ndarray] = None) -> np.ndarray:
        """Gradient of the input; parameter gradients are accumulated."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def params(self) -> list:
        """The parameter arrays (updated in place, never replaced)."""
        return []

    def gradients(self) -> list:
        """The gradient arrays, matching ``params()``."""
        return []

    def zero_grad(self) -> None:
        """Set every gradient to zero."""
        for g in self.gradients():
            g.fill(0)

    def update(self, learning_rate: float) -> None:
        """One plain SGD step: p -= learning_rate * grad."""
        lr = _check_learning_rate(learning_rate)
        pairs = list(zip(self.params(), self.gradients()))
        for i, (p, g) in enumerate(pairs):  # check all before changing any
            if p.shape != g.shape:
                raise ValueError(f"{self.layer_type}: parameter {i} has shape {p.shape} but its "
                                 f"gradient has shape {g.shape}")
        for p, g in pairs:
            if p.flags.c_contiguous and g.flags.c_contiguous and p.dtype == g.dtype \
                    and p.dtype in _FLOAT_DTYPES:
                _core.sgd_step(p.reshape(-1), g.reshape(-1), lr)
            else:
                p -= lr * g

    def set_params(self, params: Sequence[np.ndarray]) -> None:
        """Copy new values into the parameters (same count and shapes)."""
        _copy_into(self.params(), params, "parameter", self.layer_type)

    def set_gradients(self, gradients: Sequence[np.ndarray]) -> None:
        """Copy new values into the gradients (same count and shapes)."""
        _copy_into(self.gradients(), gradients, "gradient", self.layer_type)

    def set_training(self, training: bool) -> None:
        """Switch training mode on or off (layers with no such mode ignore it)."""
        if not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training must be a bool, got {type(training).__name__}")
        self._training = bool(training)

    @property
    def is_training(self) -> bool:
        return self._training

    @property
    def layer_type(self) -> str:
        return type(self).__name__

    @property
    def parameter_count(self) -> int:
        return sum(p.size for p in self.params())

    @property
    def layer_description(self) -> str:
        return f"{self.layer_type}(parameters={self.parameter_count})"

    def __repr__(self) -> str:
        return self.layer_description


def _check_learning_rate(learning_rate: object) -> float:
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real):
        raise TypeError(f"learning_rate must be a number, got {type(learning_rate).__name__}")
    if not np.isfinite(learning_rate):
        raise ValueError(f"learning_rate must be finite, got {learning_rate}")
    return float(learning_rate)


def _copy_into(targets: list, values: Sequence[np.ndarray], what: str, owner: str) -> None:
    """Check every value first, then copy: a bad list changes nothing."""
    if isinstance(values, np.ndarray) or not hasattr(values, "__iter__"):
        raise TypeError(f"{owner} needs a sequence of {len(targets)} {what} arrays, "
                        f"got {type(values).__name__}")
    values = list(values)
    if len(values) != len(targets):
        raise ValueError(f"{owner} has {len(targets)} {what} arrays, got {len(values)}")
    arrays = []
    for i, (target, value) in enumerate(zip(targets, values)):
        value = np.asarray(value)
        if value.shape != target.shape:
            raise ValueError(f"{owner} {what} {i} has shape {target.shape}, got {value.shape}")
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise TypeError(f"{owner} {what} {i} must be real numbers, got dtype {value.dtype}")
        arrays.append(value)
    for target, value in zip(targets, arrays):
        np.copyto(target, value, casting="unsafe")


class Dense(Layer):
    """A fully-connected layer, y = act(x @ W + b), with W of shape (in_features, out_features).

    Activations: None (identity), "relu", "leaky_relu" (slope ``negative_slope`` below zero),
    "tanh", "sigmoid", "gelu" (the exact form x * Phi(x) with the normal CDF, as PyTorch's
    default), "softplus".

    Initialisation: He-normal, std = sqrt(2 / in_features), for relu and gelu (for leaky_relu,
    sqrt(2 / ((1 + slope^2) in_features))); Glorot-uniform, limit sqrt(6 / (in + out)), for the
    others. Biases start at zero. ``rng`` is a numpy Generator or an int seed.

    Inputs must have the layer's dtype (no silent casts; TypeError otherwise); arrays that are
    not C-contiguous are copied once. The layer stores no activation: ``backward`` recomputes the
    output from ``x`` unless it is passed as ``output=`` (GELU always recomputes its
    pre-activation, since its derivative is not a function of its output).
    """

    def __init__(self, in_features: int, out_features: int, activation: ActivationName = None, *,
                 dtype: DTypeLike = np.float32, rng: Union[None, int, np.random.Generator] = None,
                 negative_slope: float = 0.01) -> None:
        self.in_features = check_blas_size(in_features, "in_features")
        self.out_features = check_blas_size(out_features, "out_features")
        if not isinstance(activation, (str, type(None))) or activation not in _core.ACTIVATION_CODES:
            names = ", ".join(repr(a) for a in _core.ACTIVATION_CODES)
            raise ValueError(f"unknown activation {activation!r}; choose one of {names}")
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real) \
                or not 0 <= negative_slope < 1:
            raise ValueError(f"negative_slope must be a number in [0, 1), got {negative_slope!r}")
        self.dtype = check_float_dtype(dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self._act_code = _core.ACTIVATION_CODES[activation]
        # W and grad_W in the layer's dtype, and the float64 draw they start from.
        check_allocation(self.in_features * self.out_features * (2 * self.dtype.itemsize + 8),
                         f"Dense({self.in_features} -> {self.out_features}, {self.dtype.name})")
        rng = _as_generator(rng)
        self.W = self._initial_weights(rng)
        self.b = np.zeros(self.out_features, self.dtype)
        self.grad_W = np.zeros_like(self.W)
        self.grad_b = np.zeros_like(self.b)

    def _initial_weights(self, rng: np.random.Generator) -> np.ndarray:
        shape = (self.in_features, self.out_features)
        if self.activation in ("relu", "gelu", "leaky_relu"):
            gain = 2.0 / (1.0 + self.negative_slope ** 2) if self.activation == "leaky_relu" else 2.0
            w = rng.normal(0.0, np.sqrt(gain / self.in_features), shape)
        else:
            limit = np.sqrt(6.0 / (self.in_features + self.out_features))
            w = rng.uniform(-limit, limit, shape)
        return w.astype(self.dtype)

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
            if self._act_code in _core.NEEDS_PREACTIVATION:
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


def _as_generator(rng: object) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"the seed must be non-negative, got {rng}")
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")
