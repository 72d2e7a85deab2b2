"""The Layer protocol and ckpt's layers: Dense, LayerNorm, Dropout and Residual blocks.

A layer keeps no copy of its activations: ``backward`` takes the input again, so whoever stores
activations (a checkpointer, or plain backprop) decides what is held, and can really free it.
Every layer describes its costs once (``describe``, see :mod:`ckpt.costs`).

Stochastic layers (Dropout) draw their masks from a counter-based generator keyed by a
:class:`Step`: a per-step seed, the layer's stream id in its chain, and the global row index.
The first forward, every recomputation and the backward of one step share the Step, so they
see the same mask, and nothing is stored.
"""
from __future__ import annotations

import numbers
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from ckpt import _core
from ckpt.costs import (ElementCost, _Undescribable, dense_cost, dropout_cost, layernorm_cost,
                        residual_cost, residual_layout)

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


@dataclass(frozen=True)
class Step:
    """What the forward, the recomputations and the backward of one training step share.

    ``seed`` keys the step's Dropout masks; ``row0`` is the global index of the batch's first
    row (a slice of a larger batch, on another thread or MPI rank, passes its offset, so masks
    do not depend on how a batch is split); ``streams`` maps each Dropout layer (by id) to its
    stream, its rank among the chain's Dropout layers.
    """

    seed: int
    row0: int = 0
    streams: Dict[int, int] = field(default_factory=dict)

    def stream(self, layer: "Layer") -> int:
        return self.streams.get(id(layer), 0)


def walk(layers: Sequence["Layer"]) -> Iterator["Layer"]:
    """Every layer of a chain, depth first, blocks before their insides."""
    for layer in layers:
        yield layer
        yield from walk(layer.children())


def dropout_streams(layers: Sequence["Layer"]) -> Dict[int, int]:
    """Stream ids of a chain's Dropout layers: their rank in depth-first order."""
    drops = [layer for layer in walk(layers) if isinstance(layer, Dropout)]
    return {id(layer): index for index, layer in enumerate(drops)}


def new_step(rng: np.random.Generator, layers: Sequence["Layer"], row0: int = 0) -> Step:
    """A Step with a fresh 64-bit seed drawn from ``rng``."""
    return Step(int(rng.integers(0, 2**64, dtype=np.uint64)), row0, dropout_streams(layers))


class Layer(ABC):
    """What every ckpt layer implements.

    ``forward(x)`` returns the output; ``backward(x, grad_output, output=None)`` returns the
    gradient of the input and *accumulates* the parameter gradients, given the same ``x`` that
    went into ``forward`` (and optionally its output, to skip recomputing it).
    """

    _training = True
    # Attributes holding parameter or gradient arrays: assigning to one copies into the array
    # (so optimizers and compiled chains keep valid references) instead of rebinding it.
    _array_attributes: tuple = ()
    # Whether the layer's output always has its input's width (it then needs no width of its own).
    preserves_width = False

    @abstractmethod
    def forward(self, x: np.ndarray) -> np.ndarray:
        """The layer's output for a batch x."""

    @abstractmethod
    def backward(self, x: np.ndarray, grad_output: np.ndarray, *,
                 output: Optional[np.ndarray] = None) -> np.ndarray:
        """Gradient of the input; parameter gradients are accumulated."""

    def forward_step(self, x: np.ndarray, step: Step) -> np.ndarray:
        """forward within a training step (stochastic layers key their randomness on it)."""
        return self.forward(x)

    def backward_step(self, x: np.ndarray, grad_output: np.ndarray, step: Step, *,
                      output: Optional[np.ndarray] = None) -> np.ndarray:
        """backward within the step whose forward_step produced ``output``."""
        return self.backward(x, grad_output, output=output)

    def children(self) -> list:
        """Layers inside this one (a block's body), in order."""
        return []

    def describe(self, in_width: Optional[int] = None) -> ElementCost:
        """This layer's costs as a chain element (see ckpt.costs), given its input width.

        The default suits a layer with ``in_features`` and ``out_features``: it stores its
        output, needs no scratch, and is assumed to do two FLOPs per parameter per row forward
        and four backward. Override it when that is wrong.
        """
        n_in = getattr(self, "in_features", None) or in_width
        n_out = getattr(self, "out_features", None)
        if n_out is None and self.preserves_width:
            n_out = n_in
        if n_in is None or n_out is None:
            raise _Undescribable(self.layer_type)
        count = self.parameter_count
        return ElementCost(self.layer_type, int(n_in), int(n_out), stored=int(n_out),
                           forward_flops=2 * count, backward_flops=4 * count,
                           parameter_count=count, params=tuple(self.params()),
                           gradients=tuple(self.gradients()))

    def __setattr__(self, name: str, value: object) -> None:
        if name in self._array_attributes and name in self.__dict__:
            _assign_into(self.__dict__[name], value, f"{self.layer_type}.{name}")
        else:
            object.__setattr__(self, name, value)

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


def _assign_into(target: np.ndarray, value: object, name: str) -> None:
    """``layer.W = value`` copies value into the existing array: same shape and dtype."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be assigned a numpy array of shape {target.shape} and "
                        f"dtype {target.dtype}, got {type(value).__name__}")
    if value.dtype != target.dtype:
        raise TypeError(f"{name} has dtype {target.dtype}; cannot assign an array of dtype "
                        f"{value.dtype} (convert with .astype(np.{target.dtype.name}))")
    if value.shape != target.shape:
        raise ValueError(f"{name} has shape {target.shape}; cannot assign an array of shape "
                         f"{value.shape}")
    if value is not target:
        np.copyto(target, value)


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

    _array_attributes = ("W", "b", "grad_W", "grad_b")

    def config(self) -> dict:
        return {"kind": "Dense", "in_features": self.in_features,
                "out_features": self.out_features, "activation": self.activation,
                "negative_slope": self.negative_slope, "dtype": self.dtype.name}

    def describe(self, in_width: Optional[int] = None) -> ElementCost:
        _check_in_width(self, in_width, self.in_features)
        return dense_cost(self.in_features, self.out_features, gelu=self.activation == "gelu",
                          identity=self.activation is None, params=self.params(),
                          gradients=self.gradients())

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


def _check_in_width(layer: Layer, in_width: Optional[int], expected: Optional[int]) -> None:
    if in_width is not None and expected is not None and in_width != expected:
        raise ValueError(f"{layer.layer_type} expects {expected} input features, got {in_width}")


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not np.isfinite(eps) \
            or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return float(eps)


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


def _float_batch(x: object, name: str, owner: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{owner}: {name} must be a numpy array, got {type(x).__name__}")
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{owner}: {name} is a masked array, whose mask ckpt would ignore; "
                        f"fill or drop the masked values first")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{owner}: {name} must be float32 or float64, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{owner}: {name} must be 2-D (batch, features), got shape {x.shape}")
    return np.ascontiguousarray(x)


class Residual(Layer):
    """A residual block, y = x + f(x), f being the chain of ``layers`` (its output width must
    equal its input width).

    Inside a checkpointer the block is one element: it stores at most its output. Its internals
    are kept beside the output when it goes straight into the backward sweep (plain backprop,
    a recomputed segment); otherwise its backward recomputes them from its input (they count as
    the element's backward scratch). ``params()`` are the inner layers' parameters in order.

    Initialisation is the inner layers' own; :func:`ckpt.build_mlp` scales the last Dense of
    each branch down (see there) so that deep stacks start close to the identity.
    Used on its own, ``forward`` draws a step seed for inner Dropout layers from ``seed``.
    """

    preserves_width = True

    def __init__(self, *layers: Layer,
                 seed: Union[None, int, np.random.Generator] = None) -> None:
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("a Residual block needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Residual layer {i} must be a ckpt Layer, got "
                                f"{type(layer).__name__}")
        inside = list(walk(layers))
        if len({id(layer) for layer in inside}) != len(inside):
            raise ValueError("a layer appears twice in the Residual block")
        self.layers = list(layers)
        self._rng = _as_generator(seed)
        self._last_step: Optional[Step] = None
        width = self.in_features
        if width is not None:
            self._body_costs(width)   # the widths must connect and come back to the input's

    def children(self) -> list:
        return list(self.layers)

    @property
    def in_features(self) -> Optional[int]:
        from ckpt.costs import infer_input_width
        return infer_input_width(self.layers)

    @property
    def out_features(self) -> Optional[int]:
        return self.in_features

    @property
    def dtype(self) -> Optional[np.dtype]:
        for layer in walk(self.layers):
            dt = getattr(layer, "dtype", None)
            if dt is not None:
                return np.dtype(dt)
        return None

    def _body_costs(self, width: int) -> List[ElementCost]:
        costs = []
        for i, layer in enumerate(self.layers):
            try:
                cost = layer.describe(width)
            except ValueError as exc:
                raise ValueError(f"Residual layer {i}: {exc}") from None
            if cost.in_width != width:
                raise ValueError(f"Residual layer {i} ({layer.layer_type}) expects "
                                 f"{cost.in_width} input features, but gets {width}")
            costs.append(cost)
            width = cost.out_width
        if width != costs[0].in_width:
            raise ValueError(f"a Residual block must keep its width: its layers map "
                             f"{costs[0].in_width} features to {width}")
        return costs

    def layout(self, in_width: Optional[int] = None) -> tuple:
        """(body costs, inner width, ping-pong buffers): how the executor lays out the body."""
        width = in_width if in_width is not None else self.in_features
        if width is None:
            raise _Undescribable(self.layer_type)
        body = self._body_costs(width)
        return (body,) + residual_layout(body)

    def describe(self, in_width: Optional[int] = None) -> ElementCost:
        _check_in_width(self, in_width, self.in_features)
        return residual_cost(self.layout(in_width)[0])

    def config(self) -> dict:
        return {"kind": "Residual", "layers": [layer_config(layer) for layer in self.layers]}

    def forward(self, x: np.ndarray) -> np.ndarray:
        # A refused input must not draw a step: the next backward uses the last good forward's.
        x = _float_batch(x, "the input", "Residual")
        # An inner layer may still refuse x (its width): then the generator is rewound too.
        rng_state = self._rng.bit_generator.state
        step = new_step(self._rng, self.layers)
        try:
            out = self.forward_step(x, step)
        except BaseException:
            self._rng.bit_generator.state = rng_state
            raise
        self._last_step = step
        return out

    def backward(self, x: np.ndarray, grad_output: np.ndarray, *,
                 output: Optional[np.ndarray] = None) -> np.ndarray:
        if self._last_step is None:
            raise ValueError("Residual.backward needs a forward first")
        return self.backward_step(x, grad_output, self._last_step)

    def forward_step(self, x: np.ndarray, step: Step) -> np.ndarray:
        x = _float_batch(x, "the input", "Residual")
        h = x
        for layer in self.layers:
            h = layer.forward_step(h, step)
        if h.shape != x.shape:
            raise ValueError(f"a Residual block must keep its shape: {x.shape} became {h.shape}")
        return x + h

    def backward_step(self, x: np.ndarray, grad_output: np.ndarray, step: Step, *,
                      output: Optional[np.ndarray] = None) -> np.ndarray:
        """Recompute f's internals from x, back-propagate through them, add the skip path."""
        x = _float_batch(x, "the input", "Residual")
        g = _float_batch(grad_output, "grad_output", "Residual")
        if g.shape != x.shape:
            raise ValueError(f"Residual: grad_output has shape {g.shape} but the input {x.shape}")
        inside = [x]
        for layer in self.layers:
            inside.append(layer.forward_step(inside[-1], step))
        grad = g
        for j in reversed(range(len(self.layers))):
            grad = self.layers[j].backward_step(inside[j], grad, step, output=inside[j + 1])
        return grad + g

    def params(self) -> list:
        return [p for layer in self.layers for p in layer.params()]

    def gradients(self) -> list:
        return [g for layer in self.layers for g in layer.gradients()]

    def zero_grad(self) -> None:
        for layer in self.layers:
            layer.zero_grad()

    def set_training(self, training: bool) -> None:
        super().set_training(training)
        for layer in self.layers:
            layer.set_training(training)

    @property
    def layer_description(self) -> str:
        inner = ", ".join(layer.layer_description for layer in self.layers)
        return f"Residual({inner})"


# Built-in layers by the "kind" of their config(): what a saved architecture can rebuild.
BUILTIN_LAYERS = {"Dense": Dense, "LayerNorm": LayerNorm, "Dropout": Dropout,
                  "Residual": Residual}


def layer_config(layer: Layer) -> dict:
    """A built-in layer's kind and hyper-parameters (JSON-ready); TypeError for other layers."""
    if type(layer) not in BUILTIN_LAYERS.values():
        raise TypeError(f"{layer.layer_type} is not one of ckpt's built-in layers "
                        f"({', '.join(BUILTIN_LAYERS)}): its architecture cannot be recorded")
    return layer.config()


def layer_from_config(config: object, where: str = "layer") -> Layer:
    """A new built-in layer from ``layer_config``'s dict (fresh parameters); ValueError naming
    ``where`` for anything malformed."""
    if not isinstance(config, dict) or config.get("kind") not in BUILTIN_LAYERS:
        kind = config.get("kind") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{where}: unknown layer kind {kind!r} (expected one of "
                         f"{', '.join(BUILTIN_LAYERS)})")
    args = {key: value for key, value in config.items() if key != "kind"}
    try:
        if config["kind"] == "Residual":
            inner = args.pop("layers", None)
            if not isinstance(inner, list) or args:
                raise ValueError("a Residual needs exactly a list 'layers'")
            return Residual(*[layer_from_config(c, f"{where}.layers[{i}]")
                              for i, c in enumerate(inner)], seed=0)
        if config["kind"] == "Dense":
            args["rng"] = 0
        return BUILTIN_LAYERS[config["kind"]](**args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot rebuild {config['kind']} from {args}: {exc}") from None
