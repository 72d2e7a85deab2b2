"""The BatchNorm kind: PyTorch's BatchNorm1d over the rows of a batch, correct under
recomputation.

In training each forward normalises with the batch's statistics (biased variance) and updates
the running mean and variance (unbiased variance, ``momentum``) once; a recomputation of the
same step -- a checkpointed segment rebuilt in the backward, a Residual's internals, a
CheckpointedLayer -- reuses the statistics the step's first forward computed, kept on the layer
(2 x features values, counted in its cost as ``step_state``), and never updates the running
statistics again. PyTorch's ``checkpoint`` runs the forward again and updates them twice per
step (pytorch#96136). A step is recognised by its :class:`~ckpt.elements.base.Step`'s token.

Its Layer class, its cost, its config (with the running statistics: the buffers travel in the
model file as part of the architecture), its NumPy twin. It has no executor record yet: a chain
holding one runs on the Python path.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import numpy as np

from ckpt.costs import ElementCost
from ckpt.elements._checks import (DTypeLike, _as_generator, _check_eps, _check_in_width,
                                   as_batch, check_allocation, check_blas_size,
                                   check_float_dtype)
from ckpt.elements.base import ElementKind, Layer, Step, Twin, new_step


def batchnorm_cost(n: int, *, params=(), gradients=()) -> ElementCost:
    """A BatchNorm: a few passes over the batch each way; its backward needs its input and the
    step's batch statistics (2 x n values held from the first forward to the backward)."""
    return ElementCost("batchnorm", n, n, stored=n, forward_flops=8 * n, backward_flops=14 * n,
                       parameter_count=2 * n, reads_output=False, step_state=2 * n,
                       params=tuple(params), gradients=tuple(gradients))


def _check_momentum(momentum: object) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    return float(momentum)


class BatchNorm(Layer):
    """y = (x - mean) / sqrt(var + eps) * weight + bias per feature, as PyTorch's
    ``nn.BatchNorm1d(features, eps, momentum)`` on a (batch, features) input.

    Training mode normalises with the batch's mean and biased variance and updates
    ``running_mean`` / ``running_var`` (the unbiased variance) as
    ``running = (1 - momentum) * running + momentum * batch statistic``, and counts
    ``num_batches_tracked``; evaluation mode normalises with the running statistics.
    ``weight`` (ones) and ``bias`` (zeros) are the parameters; the running statistics and the
    count are buffers: saved, loaded and pickled, never touched by optimizers.

    The statistics are those of the batch a forward sees: a micro-batch of ``fit``'s gradient
    accumulation has its own, as in PyTorch; a training batch needs at least two rows.
    Statistics are computed in float64.
    """

    preserves_width = True
    _array_attributes = ("weight", "bias", "grad_weight", "grad_bias", "running_mean",
                         "running_var")

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5, *,
                 dtype: DTypeLike = np.float32,
                 seed: Union[None, int, np.random.Generator] = None) -> None:
        self.features = check_blas_size(features, "features")
        self.momentum = _check_momentum(momentum)
        self.eps = _check_eps(eps)
        self.dtype = check_float_dtype(dtype)
        check_allocation(6 * self.features * self.dtype.itemsize,
                         f"BatchNorm({self.features}, {self.dtype.name})")
        self.weight = np.ones(self.features, self.dtype)
        self.bias = np.zeros(self.features, self.dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)
        self.running_mean = np.zeros(self.features, self.dtype)
        self.running_var = np.ones(self.features, self.dtype)
        self.num_batches_tracked = 0
        self._rng = _as_generator(seed)     # standalone forwards make their own steps
        self._last_step: Optional[Step] = None
        # (step token, mean, biased variance, this process's share of the batch's rows) of
        # the step held.
        self._batch = None
        self._sync = None       # an mpi4py communicator while fit(sync_batchnorm=True) runs

    @property
    def in_features(self) -> int:
        return self.features

    @property
    def out_features(self) -> int:
        return self.features

    def describe(self, in_width: Optional[int] = None) -> ElementCost:
        _check_in_width(self, in_width, self.features)
        return batchnorm_cost(self.features, params=self.params(), gradients=self.gradients())

    def config(self) -> dict:
        return {"kind": "BatchNorm", "features": self.features, "momentum": self.momentum,
                "eps": self.eps, "dtype": self.dtype.name,
                "running_mean": [float(v) for v in self.running_mean],
                "running_var": [float(v) for v in self.running_var],
                "num_batches_tracked": int(self.num_batches_tracked)}

    # ------------------------------------------------------------------ forward and backward
    def forward(self, x: np.ndarray) -> np.ndarray:
        x = as_batch(x, self.features, self.dtype, "the input", self._name)
        step = new_step(self._rng, [])
        out = self.forward_step(x, step)
        self._last_step = step
        return out

    def backward(self, x: np.ndarray, grad_output: np.ndarray, *,
                 output: Optional[np.ndarray] = None) -> np.ndarray:
        if self.is_training and self._last_step is None:
            raise ValueError("BatchNorm.backward in training mode needs a forward first (it "
                             "back-propagates through that forward's batch statistics)")
        return self.backward_step(x, grad_output, self._last_step or Step(0))

    def forward_step(self, x: np.ndarray, step: Step) -> np.ndarray:
        x = as_batch(x, self.features, self.dtype, "the input", self._name)
        mean, var = self._statistics(x, step)
        return batchnorm_apply(x, self.weight, self.bias, mean, var, self.eps)

    def _statistics(self, x: np.ndarray, step: Step):
        """The mean and variance this forward normalises with: the running ones in evaluation;
        in training the step's batch statistics, computed (and the running ones updated) by the
        step's first forward only."""
        if not self.is_training:
            return self.running_mean.astype(np.float64), self.running_var.astype(np.float64)
        if self._batch is not None and self._batch[0] == step.token:
            return self._batch[1], self._batch[2]
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"{self._name} needs more than one row per batch in training "
                             f"mode (its variance), got {n} (PyTorch refuses it too); use "
                             f"evaluation mode or a larger batch")
        if self._sync is None:
            mean, var = batch_statistics(x)
            share = 1.0
        else:
            mean, var, n, share = synced_statistics(x, self._sync)
        self._batch = (step.token, mean, var, share)
        m = self.momentum
        self.running_mean[...] = (1 - m) * self.running_mean + m * mean
        self.running_var[...] = (1 - m) * self.running_var + m * var * (n / (n - 1))
        self.num_batches_tracked += 1
        return mean, var

    def backward_step(self, x: np.ndarray, grad_output: np.ndarray, step: Step, *,
                      output: Optional[np.ndarray] = None) -> np.ndarray:
        x = as_batch(x, self.features, self.dtype, "the input", self._name)
        g = as_batch(grad_output, self.features, self.dtype, "grad_output", self._name)
        if g.shape[0] != x.shape[0]:
            raise ValueError(f"{self._name}: grad_output has {g.shape[0]} rows but the input "
                             f"has {x.shape[0]}")
        if not self.is_training:
            mean, var = self.running_mean.astype(np.float64), self.running_var.astype(np.float64)
        elif self._batch is not None and self._batch[0] == step.token:
            mean, var = self._batch[1], self._batch[2]
        else:
            raise ValueError(f"{self._name}: backward of a step whose forward this layer did "
                             f"not run (its batch statistics are not held)")
        if self.is_training and self._sync is not None:
            gx, gw, gb = synced_backward(x, self.weight, g, mean, var, self.eps, self._batch[3],
                                         self._sync)
        else:
            gx, gw, gb = batchnorm_backward(x, self.weight, g, mean, var, self.eps,
                                            self.is_training)
        self.grad_weight += gw.astype(self.dtype)
        self.grad_bias += gb.astype(self.dtype)
        return gx

    def params(self) -> list:
        return [self.weight, self.bias]

    def gradients(self) -> list:
        return [self.grad_weight, self.grad_bias]

    def __getstate__(self) -> dict:
        # A communicator is a process's connection, not the layer's state.
        return {key: value for key, value in self.__dict__.items() if key != "_sync"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__["_sync"] = None

    def buffers(self) -> dict:
        """The running statistics and the count: state that is not a parameter."""
        return {"running_mean": self.running_mean, "running_var": self.running_var,
                "num_batches_tracked": self.num_batches_tracked}

    @property
    def _name(self) -> str:
        return f"BatchNorm({self.features})"

    @property
    def layer_description(self) -> str:
        return (f"BatchNorm({self.features}, momentum={self.momentum:g}, eps={self.eps:g}, "
                f"dtype={self.dtype.name})")


def _from_config(args: dict, build) -> BatchNorm:
    """A BatchNorm from its config; the running statistics, when present, must be lists of
    ``features`` finite numbers (variance non-negative) and the count a non-negative int."""
    mean = args.pop("running_mean", None)
    var = args.pop("running_var", None)
    count = args.pop("num_batches_tracked", 0)
    layer = BatchNorm(**args)
    for name, values in (("running_mean", mean), ("running_var", var)):
        if values is None:
            continue
        array = np.asarray(values, dtype=np.float64) if isinstance(values, list) else None
        if array is None or array.shape != (layer.features,) or not np.isfinite(array).all():
            shape = np.shape(values) if isinstance(values, list) else type(values).__name__
            raise ValueError(f"{name} must be {layer.features} finite numbers (one per "
                             f"feature), got {shape}")
        if name == "running_var" and (array < 0).any():
            raise ValueError("running_var must be non-negative")
        getattr(layer, name)[...] = array
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"num_batches_tracked must be a non-negative integer, got {count!r}")
    layer.num_batches_tracked = count
    return layer


# ---------------------------------------------------------------------------------------------
# The NumPy twin (float64 statistics, as the layer computes them)
# ---------------------------------------------------------------------------------------------

def batch_statistics(x):
    """(mean, biased variance) per feature, in float64."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    return mean, ((x64 - mean) ** 2).mean(axis=0)


def batchnorm_apply(x, weight, bias, mean, var, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias, in x's dtype."""
    return ((x.astype(np.float64) - mean) / np.sqrt(var + eps) * weight + bias).astype(x.dtype)


def batchnorm_backward(x, weight, grad_output, mean, var, eps, training=True):
    """(grad_input, grad_weight, grad_bias). In training the statistics are the batch's own, so
    the input gradient goes through them too; in evaluation they are constants."""
    x64, g = x.astype(np.float64), grad_output.astype(np.float64)
    rstd = 1 / np.sqrt(var + eps)
    xhat = (x64 - mean) * rstd
    gw, gb = (g * xhat).sum(axis=0), g.sum(axis=0)
    dxhat = g * weight
    if training:
        n = x.shape[0]
        gx = rstd * (dxhat - dxhat.sum(axis=0) / n - xhat * (dxhat * xhat).sum(axis=0) / n)
    else:
        gx = dxhat * rstd
    return gx.astype(x.dtype), gw, gb


def synced_statistics(x, comm):
    """The statistics of the rows of every rank (mpi4py ``comm``): two allreduces, the counts
    and sums, then the squared deviations from the global mean. Returns (mean, biased
    variance, global rows, this rank's share of them)."""
    x64 = x.astype(np.float64)
    sums = np.concatenate([[x.shape[0]], x64.sum(axis=0)])
    comm.Allreduce(_in_place(), sums)
    total = sums[0]
    mean = sums[1:] / total
    squares = ((x64 - mean) ** 2).sum(axis=0)
    comm.Allreduce(_in_place(), squares)
    return mean, squares / total, int(total), x.shape[0] / total


def synced_backward(x, weight, grad_output, mean, var, eps, share, comm):
    """The training backward over every rank's rows. Each rank's upstream gradient is that of
    the mean loss over its own rows (scale 1 / its rows), so the batch sums the input gradient
    needs are the ranks' sums weighted by their ``share`` of the rows (one allreduce); the
    parameter gradients stay this rank's sums, which data-parallel averaging weighs the same
    way."""
    x64, g = x.astype(np.float64), grad_output.astype(np.float64)
    rstd = 1 / np.sqrt(var + eps)
    xhat = (x64 - mean) * rstd
    gw, gb = (g * xhat).sum(axis=0), g.sum(axis=0)
    sums = np.concatenate([gb, gw]) * share
    comm.Allreduce(_in_place(), sums)
    n = x.shape[0]
    mean_g, mean_gx = weight * sums[:len(gb)] / n, weight * sums[len(gb):] / n
    gx = rstd * (g * weight - mean_g - xhat * mean_gx)
    return gx.astype(x.dtype), gw, gb


def _in_place():
    from mpi4py import MPI   # only a synced step gets here, under fit(sync_batchnorm=True)
    return MPI.IN_PLACE


def _twin_forward(layer: BatchNorm, x, step):
    mean, var = (batch_statistics(x) if layer.is_training
                 else (layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)))
    return batchnorm_apply(x, layer.weight, layer.bias, mean, var, layer.eps)


def _twin_backward(layer: BatchNorm, x, g, step):
    mean, var = (batch_statistics(x) if layer.is_training
                 else (layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)))
    gx, gw, gb = batchnorm_backward(x, layer.weight, g, mean, var, layer.eps, layer.is_training)
    return gx, [gw, gb]


def _example(dtype, rng) -> BatchNorm:
    layer = BatchNorm(5, momentum=0.3, dtype=dtype)
    layer.weight[...] = rng.uniform(0.5, 1.5, 5)
    layer.bias[...] = rng.uniform(-0.5, 0.5, 5)
    return layer


KIND = ElementKind("BatchNorm", BatchNorm, lambda args, build: _from_config(args, build),
                   Twin(_twin_forward, _twin_backward), example=_example)
