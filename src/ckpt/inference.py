"""Running a model without training it: its dtype, the input checks, predict and evaluate.

Below both :mod:`ckpt.train` and :mod:`ckpt.distributed`, which share these: ``fit`` checks its
inputs here, and ``evaluate`` runs on one process or over the ranks of an mpi4py communicator.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ckpt.layers import check_float_dtype, check_size
from ckpt.losses import get_loss


def as_model(model: Any):
    """The model itself, or a SegmentCheckpointer around a list of layers."""
    if isinstance(model, (list, tuple)):
        from ckpt.checkpoint import SegmentCheckpointer
        return SegmentCheckpointer(model)
    for name in ("forward", "backward", "params", "gradients"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"a model needs forward, backward, params and gradients; "
                            f"{type(model).__name__} has no {name}()")
    return model


def model_dtype(model: Any) -> np.dtype:
    """The dtype of the model's parameters."""
    for part in (model if isinstance(model, (list, tuple)) else [model]):
        if not callable(getattr(part, "params", None)):
            raise TypeError(f"model must be a layer, a SegmentCheckpointer or a list of layers, "
                            f"got {type(part).__name__}")
    params = model.params() if not isinstance(model, (list, tuple)) else \
        [p for layer in model for p in layer.params()]
    if not params:
        raise ValueError("the model has no parameters")
    return check_float_dtype(params[0].dtype)


def check_inputs(X: object, y: object, dtype: np.dtype, loss: str, name: str = "X",
                 widths: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """X cast once to the model's dtype; y as int64 labels or float targets.

    ``widths`` (input features, outputs) are checked when the model declares them: X's width,
    the label range [0, outputs) or the targets' width. Every value of X and y must be finite
    in the model's dtype (a ValueError names the first bad row).
    """
    _refuse_masked(X, name)
    _refuse_masked(y, f"the targets of {name}")
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
    if widths is not None and X.shape[1] != widths[0]:
        raise ValueError(f"{name} has {X.shape[1]} features but the model expects {widths[0]}")
    with np.errstate(over="ignore"):   # overflow in the cast is reported below, by row
        X = np.ascontiguousarray(X, dtype=dtype)
    _check_finite(X, name, dtype)
    y = np.asarray(y)
    if y.shape[:1] != X.shape[:1]:
        raise ValueError(f"{name} has {X.shape[0]} rows but its targets have "
                         f"{y.shape[0] if y.ndim else 0}")
    if loss == "cross_entropy":
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy needs 1-D integer labels, got {y.dtype} {y.shape}")
        bad = np.flatnonzero((y < 0) | (y >= widths[1]) if widths is not None else y < 0)
        if len(bad):
            classes = f"the model's {widths[1]} classes [0, {widths[1]})" if widths is not None \
                else "the classes (labels start at 0)"
            raise ValueError(f"label {y[bad[0]]} in row {bad[0]} of the targets of {name} is "
                             f"outside {classes}")
        y = y.astype(np.int64, copy=False)
    else:
        if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
            raise TypeError(f"the targets of {name} must be real numbers, got dtype {y.dtype}")
        with np.errstate(over="ignore"):
            y = np.ascontiguousarray(y.reshape(len(y), -1), dtype=dtype)
        if widths is not None and y.shape[1] != widths[1]:
            raise ValueError(f"the targets of {name} have {y.shape[1]} columns but the model "
                             f"has {widths[1]} outputs")
        _check_finite(y, f"the targets of {name}", dtype)
    return X, y


def _refuse_masked(value: object, name: str) -> None:
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, whose mask ckpt would ignore; fill or drop "
                        f"the masked values first")


def _check_finite(values: np.ndarray, name: str, dtype: np.dtype) -> None:
    """ValueError naming the first row with a NaN or infinite value (after the cast to dtype)."""
    finite = np.isfinite(values)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise ValueError(f"row {row} of {name} holds a NaN or infinite value (or one too large "
                         f"for {np.dtype(dtype).name})")


def count_correct(output: np.ndarray, y: np.ndarray, loss: str) -> int:
    if loss != "cross_entropy":
        return 0
    return int(np.count_nonzero(output.argmax(axis=1) == y))


def _forward_layers(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A forward pass that stores nothing: through the layers one by one when there are any."""
    layers: Optional[Sequence] = model if isinstance(model, (list, tuple)) else \
        getattr(model, "layers", None)
    if layers:
        def run(x: np.ndarray) -> np.ndarray:
            for layer in layers:
                x = layer.forward(x)
            return x
        return run
    return as_model(model).forward


@contextlib.contextmanager
def evaluation_mode(model: Any):
    """Run the model in evaluation mode (Dropout off), then restore each part's previous mode."""
    parts = list(model) if isinstance(model, (list, tuple)) else [model]
    switchable = [part for part in parts if callable(getattr(part, "set_training", None))]
    before = [bool(getattr(part, "is_training", True)) for part in switchable]
    for part in switchable:
        part.set_training(False)
    try:
        yield
    finally:
        for part, mode in zip(switchable, before):
            part.set_training(mode)


def predict(model: Any, X: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's outputs for X (cast to the model's dtype), computed batch by batch in
    evaluation mode (Dropout off); the model's mode is restored afterwards."""
    dtype = model_dtype(model)
    batch_size = check_size(batch_size, "batch_size")
    _refuse_masked(X, "X")
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (samples, features), got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise TypeError(f"X must hold real numbers, got dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=dtype)
    run = _forward_layers(model)
    # An empty X still runs one (empty) batch, so the result has the output's width.
    starts = range(0, max(len(X), 1), batch_size)
    with evaluation_mode(model):
        return np.concatenate([np.array(run(X[i:i + batch_size])) for i in starts])


def evaluate(model: Any, X: np.ndarray, y: np.ndarray, *, loss: str = "cross_entropy",
             batch_size: int = 256, comm: Any = None) -> Dict[str, float]:
    """Mean loss (and accuracy for cross_entropy) of the model on (X, y), in evaluation mode.

    With an mpi4py communicator ``comm``, each rank evaluates a contiguous share of the rows
    and the sums are gathered over the ranks (call it on every rank, each with the whole
    (X, y): a memory map reads only the rank's share).
    """
    loss_fn = get_loss(loss)
    X, y = check_inputs(X, y, model_dtype(model), loss)
    if len(X) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    if comm is None:
        output = predict(model, X, batch_size)
        value, _ = loss_fn(output, y)
        result = {"loss": value}
        if loss == "cross_entropy":
            result["accuracy"] = count_correct(output, y, loss) / len(X)
        return result
    size, rank = comm.Get_size(), comm.Get_rank()
    lo, hi = rank * len(X) // size, (rank + 1) * len(X) // size
    totals = np.zeros(3)   # loss sum, correct, rows
    if hi > lo:
        output = predict(model, X[lo:hi], batch_size)
        value, _ = loss_fn(output, y[lo:hi])
        totals[:] = value * (hi - lo), count_correct(output, y[lo:hi], loss), hi - lo
    # Summed in rank order on every rank, so that every rank reports the same bits.
    totals = np.sum(comm.allgather(totals), axis=0)
    result = {"loss": float(totals[0] / totals[2])}
    if loss == "cross_entropy":
        result["accuracy"] = float(totals[1] / totals[2])
    return result


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> Dict[str, float]:
    """{"rmse", "r2", "mse"} of predictions against targets (1-D, or one column each)."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    if y_true.shape != y_pred.shape or len(y_true) == 0:
        raise ValueError(f"{y_pred.shape} predictions for {y_true.shape} targets")
    residual = float(np.sum((y_true - y_pred) ** 2))
    total = float(np.sum((y_true - y_true.mean(axis=0)) ** 2))
    mse = residual / y_true.size
    # R^2 of a constant target is 1 for exact predictions, else 0 (scikit-learn's choice).
    r2 = 1.0 - residual / total if total > 0 else float(residual == 0)
    return {"mse": mse, "rmse": mse ** 0.5, "r2": r2}
