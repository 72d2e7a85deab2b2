"""Validation shared by the element kinds: dtypes, sizes, batches, memory, seeds.

It sits below the kinds (they import it; it imports none of them), so that they share one
wording for each error and never import each other.
"""
from __future__ import annotations

import numbers
import os
import threading
from typing import Optional, Sequence, Union

import numpy as np


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


def _check_in_width(layer, in_width: Optional[int], expected: Optional[int]) -> None:
    if in_width is not None and expected is not None and in_width != expected:
        raise ValueError(f"{layer.layer_type} expects {expected} input features, got {in_width}")


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not np.isfinite(eps) \
            or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return float(eps)


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
