"""Loss functions: each returns ``(loss, grad)``, grad being d loss / d output.

The gradient is already averaged over the batch, has the dtype of the model output, and goes
straight into ``backward``. Both losses run as one fused Cython pass (ckpt._core).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ckpt import _core

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _refuse_masked(x: object, name: str) -> None:
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, whose mask the loss would ignore; fill or "
                        f"drop the masked values first")


def _check_output(x: object, name: str, ndim: Optional[int] = None) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    _refuse_masked(x, name)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    return np.ascontiguousarray(x)


def _grad_buffer(out: Optional[np.ndarray], like: np.ndarray,
                 *inputs: Tuple[str, np.ndarray]) -> np.ndarray:
    """``out`` checked (or a new array): the kernel writes it while reading ``inputs``."""
    if out is None:
        return np.empty_like(like)
    if (not isinstance(out, np.ndarray) or isinstance(out, np.ma.MaskedArray)
            or out.dtype != like.dtype or out.shape != like.shape
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"out must be a writable C-contiguous {like.dtype} array of shape "
                         f"{like.shape}")
    for name, value in inputs:
        if np.shares_memory(out, value):
            raise ValueError(f"out shares memory with {name}: the gradient would overwrite "
                             f"{name} while the loss reads it; pass a separate buffer")
    return out


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray, *,
                          out: Optional[np.ndarray] = None) -> Tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer class labels.

    ``logits`` is (batch, classes) float32/float64, ``labels`` (batch,) integers in
    [0, classes). Returns ``(loss, grad)`` with grad = (softmax(logits) - onehot(labels)) / batch,
    computed stably (log-sum-exp) in one pass per row; ``out`` receives grad if given.
    An empty batch has loss 0 and an empty gradient.
    """
    logits = _check_output(logits, "logits", ndim=2)
    _refuse_masked(labels, "labels")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (batch,), got shape {labels.shape}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} rows but there are "
                         f"{labels.shape[0]} labels")
    if logits.shape[1] == 0:
        raise ValueError("logits need at least one class column")
    if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
        raise ValueError(f"label {labels.max()} is outside the {logits.shape[1]} classes")
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    grad = _grad_buffer(out, logits, ("logits", logits), ("labels", labels))
    loss = _core.softmax_cross_entropy_kernel(logits, labels, grad)
    return float(loss), grad


def mse_loss(pred: np.ndarray, target: np.ndarray, *,
             out: Optional[np.ndarray] = None) -> Tuple[float, np.ndarray]:
    """Mean squared error over all elements, as PyTorch's ``MSELoss(reduction="mean")``.

    loss = mean((pred - target)^2) over batch *and* features, so grad = 2 (pred - target) / size.
    ``pred`` is (batch, features) float32/float64; ``target`` has the same shape, or is 1-D when
    there is one feature, and is converted to pred's dtype. An empty batch has loss 0.
    """
    pred = _check_output(pred, "pred", ndim=2)
    _refuse_masked(target, "target")
    target = np.asarray(target)
    if not (np.issubdtype(target.dtype, np.floating) or np.issubdtype(target.dtype, np.integer)):
        raise TypeError(f"target must hold real numbers, got dtype {target.dtype}")
    if target.ndim == 1 and pred.shape[1] == 1:
        target = target.reshape(-1, 1)
    if target.shape != pred.shape:
        raise ValueError(f"target has shape {target.shape}, expected {pred.shape} like pred")
    target = np.ascontiguousarray(target, dtype=pred.dtype)
    grad = _grad_buffer(out, pred, ("pred", pred), ("target", target))
    loss = _core.mse_kernel(pred.reshape(-1), target.reshape(-1), grad.reshape(-1))
    return float(loss), grad


LOSSES = {
    "cross_entropy": softmax_cross_entropy,
    "mse": mse_loss,
}


def get_loss(name: str):
    """The loss function called ``name`` ("cross_entropy" or "mse")."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; choose one of "
                         f"{', '.join(map(repr, LOSSES))}") from None
