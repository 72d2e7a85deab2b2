"""scikit-learn estimators trained by ckpt: ``MLPClassifier`` and ``MLPRegressor``.

Drop-in counterparts of ``sklearn.neural_network.MLPClassifier`` / ``MLPRegressor`` (1.9): the
same parameter names and defaults, the same fitted attributes, and scikit-learn's semantics --
its losses (half squared error or half Poisson deviance on exp outputs; binary cross-entropy
on logistic outputs for binary and multilabel targets; softmax cross-entropy for multiclass),
its L2 penalty ``0.5 * alpha * ||W||^2`` on the weights only, divided by the (weighted) number
of samples in the batch and included in ``loss_``, its weight initialisation and shuffling
from ``random_state``, its Adam, SGD and L-BFGS (scipy's L-BFGS-B, the parameters packed as
scikit-learn packs them) solvers, learning-rate schedules, early-stopping split, convergence
rules and warnings, sparse input. The network runs on ckpt: a SegmentCheckpointer of Dense
layers, with ckpt's own parameters ``checkpoint_every``, ``memory_budget``, ``dtype`` and
``n_threads``; lbfgs computes its full-batch loss and gradient through the same checkpointed
chain, so ``memory_budget`` bounds it too.

Beyond scikit-learn: ``fit(..., validation_data=(X_val, y_val))`` with per-epoch
``validation_scores_`` and ``validation_loss_curve_``; ``class_weight`` (classifier);
``learning_rate="cosine"`` with ``warmup_fraction`` (:mod:`ckpt.optim.schedules`, per batch);
ckpt's extra activations, ``dropout`` and ``residual``.

Differences from scikit-learn: float32 arithmetic by default (``dtype=None`` gives
scikit-learn's dtypes); predictions and probabilities come in the training dtype, also for
float64 X on a float32 network; negative sample weights are refused; sparse X of an integer
dtype is refused (cast it); ``loss="poisson"`` refuses negative targets (scikit-learn's
MLPRegressor lets them through to a NaN loss); ``partial_fit`` is absent for lbfgs on the
regressor too (scikit-learn's regressor keeps it by an oversight of its ``available_if``); an
epoch whose loss is not finite stops the fit with scikit-learn's non-finite-weights error
instead of training on to max_iter; a continued fit trains in the network's dtype (arrays
assigned to ``coefs_`` are cast into it).

scikit-learn (>= 1.6) is needed only here: ``pip install 'ckpt-cpu[sklearn]'``.
"""
from __future__ import annotations

import itertools
import numbers
import os
import re
import sys
import threading
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.optimize
import scipy.sparse as sp
import scipy_openblas32
from scipy.special import xlogy

_SKLEARN_EXTRA = "pip install 'ckpt-cpu[sklearn]'"
try:
    import sklearn
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import LabelBinarizer
    from sklearn.utils import check_random_state, column_or_1d, gen_batches, shuffle
    from sklearn.utils.class_weight import compute_sample_weight
    from sklearn.utils.metaestimators import available_if
    from sklearn.utils.multiclass import check_classification_targets, type_of_target, unique_labels
    from sklearn.utils.validation import check_is_fitted, validate_data
    from threadpoolctl import ThreadpoolController
except ImportError as exc:  # scikit-learn missing, or older than 1.6 (no validate_data)
    raise ImportError(f"ckpt.MLPClassifier and ckpt.MLPRegressor need scikit-learn >= 1.6 "
                      f"({exc}); install it with: {_SKLEARN_EXTRA}") from exc
if tuple(map(int, re.findall(r"\d+", sklearn.__version__)[:2])) < (1, 6):
    raise ImportError(f"ckpt.MLPClassifier and ckpt.MLPRegressor need scikit-learn >= 1.6, "
                      f"found {sklearn.__version__}; upgrade with: {_SKLEARN_EXTRA}")

from ckpt import _core
from ckpt.activations import NAMES as _ACTIVATION_NAMES
from ckpt.activations import get_activation
from ckpt.checkpoint import SegmentCheckpointer
from ckpt.layers import (Activation, BatchNorm, Dense, Dropout, LayerNorm, check_float_dtype,
                         walk)
from ckpt.optim import Optimizer, _number, collect_parameters
from ckpt.optim.schedules import Cosine
from ckpt.train import build_mlp, check_norm
from ckpt.train import predict as _predict_layers

__all__ = ["MLPClassifier", "MLPRegressor"]

# scikit-learn's activation names, and ckpt's extra ones (ckpt.activations' table), to ckpt's
# Dense activations.
HIDDEN_ACTIVATIONS = {"identity": None, "logistic": "sigmoid",
                      **{name: name for name in _ACTIVATION_NAMES if name != "sigmoid"}}
_STOCHASTIC_SOLVERS = ("adam", "sgd")
_SOLVERS = ("lbfgs", "sgd", "adam")
_REGRESSION_LOSSES = ("squared_error", "poisson")
# scikit-learn's schedules (SGD only, as in scikit-learn), and ckpt's cosine (both solvers).
_SCHEDULES = ("constant", "invscaling", "adaptive", "cosine")
_PREDICT_ROWS = 4096  # rows per forward call in predict
_NO_Y = object()      # _validate_data of X alone (y=None is a y, refused by scikit-learn's check)
# What the target checks set: the classifier's classes and output units, validate_data's
# n_features_in_ (and feature_names_in_ for a DataFrame).
_TARGET_STATE = ("classes_", "_label_binarizer", "_output", "n_features_in_",
                 "feature_names_in_")


def _first_activation(layer: Dense, z: np.ndarray) -> np.ndarray:
    """The first layer's activation of its pre-activation z, for sparse input (NumPy: the
    first layer runs outside the compiled chain there), in z's dtype."""
    return get_activation(layer.activation).f(z, layer.negative_slope).astype(z.dtype,
                                                                              copy=False)


def _first_derivative(layer: Dense, z: np.ndarray) -> np.ndarray:
    """d act / d z of the first layer at z, for sparse input's backward."""
    return get_activation(layer.activation).df(z, layer.negative_slope).astype(z.dtype,
                                                                               copy=False)


# ------------------------------------------------------------------------------ parameters
def _check_real(value: object, name: str, low: float, high: float = np.inf, *,
                low_open: bool = False, high_open: bool = False) -> float:
    # scikit-learn's intervals admit infinity (tol=np.inf, for one): optim's check, unbounded.
    return _number(value, name, low, high, open_low=low_open, open_high=high_open, finite=False)


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _hidden_sizes(value: object) -> List[int]:
    sizes = list(value) if hasattr(value, "__iter__") else [value]
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"hidden_layer_sizes must be positive integers, got {value!r}")
    return [int(size) for size in sizes]


class _SharedHold:
    """A process-wide setting that overlapping users (fits or predicts in threads of one process)
    share: the first to enter saves it, the last to leave restores it. Each restoring what it
    saw on entry would undo the changes out of order (A saves 2, B saves A's 1, A ends -> 2,
    B ends -> 1: left at one thread for good)."""

    def __init__(self, save: Callable[[], Any], restore: Callable[[Any], None]) -> None:
        self._save, self._restore = save, restore
        self._lock = threading.Lock()
        self._users = 0
        self._saved: Any = None

    @contextmanager
    def held(self, apply: Optional[Callable[[], None]] = None) -> Iterator[None]:
        """Hold the setting for a block; ``apply`` (if any) changes it on entry."""
        with self._lock:
            if self._users == 0:
                self._saved = self._save()
            self._users += 1
            if apply is not None:
                apply()
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    saved, self._saved = self._saved, None
                    self._restore(saved)


# ckpt's OpenBLAS thread count (n_threads); while two holders overlap it is the one set last.
_CKPT_THREADS = _SharedHold(_core.get_num_threads, _core.set_num_threads)
# Every other BLAS at one thread during fit (see _other_blas): saving applies the limit.
_OTHER_BLAS_AT_ONE = _SharedHold(lambda: _other_blas().limit(limits=1),
                                 lambda limiter: limiter.restore_original_limits())


def _blas_threads(n_threads: Optional[int]):
    """Hold ckpt's OpenBLAS at n_threads threads for a block (None: leave it alone)."""
    if n_threads is None:
        return nullcontext()
    return _CKPT_THREADS.held(lambda: _core.set_num_threads(n_threads))


def _other_blas() -> ThreadpoolController:
    """threadpoolctl's controller of the BLAS libraries loaded in the process other than ckpt's
    own OpenBLAS (the ``scipy_openblas32`` wheel's): NumPy's, SciPy's.

    ``fit`` holds them at one thread. Their OpenBLAS threads busy-wait for a while after each
    threaded call: one NumPy call per mini-batch (``np.dot`` in the L2 term, before
    ``_squared_weights`` avoided BLAS) kept a NumPy thread spinning through the whole fit, and
    ckpt's 2-thread float64 fits ran 3-4x slower than 1-thread ones. The fit loop makes no
    NumPy BLAS call now; the limit keeps any other (scikit-learn's helpers, a subclass) from
    waking a competing pool.
    """
    ours = os.path.realpath(scipy_openblas32.get_lib_dir()) + os.sep
    controller = ThreadpoolController()
    return controller.select(filepath=[
        lib.filepath for lib in controller.lib_controllers
        if lib.user_api == "blas" and not os.path.realpath(lib.filepath).startswith(ours)])


# ------------------------------------------------------------------------------ optimizers
class _SklearnOptimizer(Optimizer):
    """Base of the estimators' optimizers: scikit-learn's update rules on ckpt's kernels.

    The L2 penalty reaches weights only (every other parameter of a Dense chain): ``step``
    takes its coefficient, alpha / (weighted batch size), which changes from batch to batch.
    """

    def __init__(self, model: SegmentCheckpointer, learning_rate_init: float) -> None:
        # Set first: Optimizer.__init__ checks the hyperparameters against the parameters' dtype.
        self.learning_rate_init = learning_rate_init
        self.learning_rate = learning_rate_init
        super().__init__(model)
        # Dense.params() is [W, b]: the weights are the 2-D parameters.
        self._decays = [p.ndim == 2 for p in self._params]

    @property
    def hyperparameters(self) -> Dict[str, Any]:
        return {"learning_rate_init": self.learning_rate_init}

    @staticmethod
    def _validated(**hyper: Any) -> Dict[str, Any]:
        return hyper

    def set_rate(self, learning_rate: float) -> None:
        """The learning rate of the next steps (learning_rate="cosine" sets it per batch)."""
        self.learning_rate = learning_rate

    def iteration_ends(self, samples_seen: int) -> None:
        """The end of an epoch (scikit-learn's learning-rate schedules act here)."""

    def trigger_stopping(self) -> Tuple[bool, str]:
        """Whether training stops when it stops improving, and what to say."""
        return True, "Stopping."


class _SklearnAdam(_SklearnOptimizer):
    """scikit-learn's Adam: p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps).

    ckpt's kernel divides sqrt(v) by sqrt(1 - b2^t) instead; with eps / sqrt(1 - b2^t) in
    place of eps the two updates are the same.
    """

    _buffer_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, model: SegmentCheckpointer, learning_rate_init: float, beta_1: float,
                 beta_2: float, epsilon: float) -> None:
        super().__init__(model, learning_rate_init)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon

    def step(self, weight_decay: float = 0.0) -> None:
        self.step_count += 1
        eps = self.epsilon / np.sqrt(1.0 - self.beta_2 ** self.step_count)
        for p, g, m, v, decays in zip(self._flat_params, self._flat_grads,
                                      self._buffers["exp_avg"], self._buffers["exp_avg_sq"],
                                      self._decays):
            _core.adam_step(p, g, m, v, self.learning_rate, self.beta_1, self.beta_2, eps,
                            weight_decay if decays else 0.0, False, self.step_count)


class _SklearnSGD(_SklearnOptimizer):
    """scikit-learn's SGD: v = mu v - lr g; p += mu v - lr g (Nesterov) or p += v.

    ckpt's kernel keeps buf = -v / lr (PyTorch's form); when the learning rate changes, buf is
    rescaled so that v, scikit-learn's velocity, carries over unchanged.
    """

    _buffer_names = ("momentum_buffer",)

    def __init__(self, model: SegmentCheckpointer, learning_rate_init: float, schedule: str,
                 momentum: float, nesterov: bool, power_t: float) -> None:
        super().__init__(model, learning_rate_init)
        self.schedule, self.momentum, self.power_t = schedule, momentum, power_t
        self.nesterov = nesterov and momentum > 0

    def step(self, weight_decay: float = 0.0) -> None:
        self.step_count += 1
        for p, g, buf, decays in zip(self._flat_params, self._flat_grads,
                                     self._buffers["momentum_buffer"], self._decays):
            _core.sgd_momentum_step(p, g, buf, self.learning_rate, self.momentum,
                                    weight_decay if decays else 0.0, self.nesterov)

    def set_rate(self, learning_rate: float) -> None:
        self._set_learning_rate(learning_rate)

    def _set_learning_rate(self, learning_rate: float) -> None:
        if learning_rate != self.learning_rate and learning_rate > 0:
            ratio = self.learning_rate / learning_rate
            for buf in self._buffers["momentum_buffer"]:
                buf *= ratio
        self.learning_rate = learning_rate

    def iteration_ends(self, samples_seen: int) -> None:
        if self.schedule == "invscaling":
            self._set_learning_rate(self.learning_rate_init / (samples_seen + 1) ** self.power_t)

    def trigger_stopping(self) -> Tuple[bool, str]:
        if self.schedule != "adaptive":
            return True, "Stopping."
        if self.learning_rate <= 1e-6:
            return True, "Learning rate too small. Stopping."
        self._set_learning_rate(self.learning_rate / 5.0)
        return False, f"Setting learning rate to {self.learning_rate:f}"


class _PackedObjective:
    """The full-batch loss of an estimator's network and its gradient as functions of one
    float64 vector of every parameter, for scipy's L-BFGS-B.

    The vector is packed as scikit-learn packs it (every coefs_ flattened, then every
    intercepts_; a residual network's LayerNorm parameters follow). A call writes the vector
    into the network, runs one forward and backward of the whole batch through the
    checkpointed chain (the sparse first layer outside it), and returns
    (loss + 0.5 alpha ||W||^2 / sum(w), its gradient packed the same way).
    """

    def __init__(self, estimator: "_BaseMLP", X: Any, Y: np.ndarray,
                 sample_weight: Optional[np.ndarray], alpha: float) -> None:
        params, grads = collect_parameters(estimator._model)
        grad_of = {id(a): g for a, g in zip(params, grads)}
        ordered = estimator.coefs_ + estimator.intercepts_
        known = {id(a) for a in ordered}
        ordered += [a for a in params if id(a) not in known]
        self._params = [a.reshape(-1) for a in ordered]
        self._grads = [grad_of[id(a)].reshape(-1) for a in ordered]
        self._bounds = np.cumsum([0] + [a.size for a in self._params])
        self._n_coefs = len(estimator.coefs_)
        self._estimator, self._X, self._Y, self._w = estimator, X, Y, sample_weight
        self._sw_sum = X.shape[0] if sample_weight is None else float(
            sample_weight.sum(dtype=np.float64))
        self._alpha = alpha
        self._grad_output = np.empty_like(Y)

    def _slices(self) -> Iterator[Tuple[int, np.ndarray, np.ndarray, slice]]:
        for i, (a, g) in enumerate(zip(self._params, self._grads)):
            yield i, a, g, slice(self._bounds[i], self._bounds[i + 1])

    def packed(self) -> np.ndarray:
        """The network's parameters now, packed in float64."""
        return np.concatenate([a.astype(np.float64) for a in self._params])

    def unpack(self, packed: np.ndarray) -> None:
        """Write a packed vector into the network (cast to its dtype)."""
        for _, a, _, part in self._slices():
            a[...] = packed[part]

    def __call__(self, packed: np.ndarray) -> Tuple[float, np.ndarray]:
        self.unpack(packed)
        estimator, scale = self._estimator, self._alpha / self._sw_sum
        loss = estimator._loss_and_gradients(self._X, self._Y, self._w, self._grad_output)
        gradient = np.empty(self._bounds[-1], np.float64)
        for i, a, g, part in self._slices():
            gradient[part] = g
            if i < self._n_coefs and self._alpha:
                gradient[part] += scale * a
        if self._alpha:
            loss += 0.5 * scale * estimator._squared_weights()
        return float(loss), gradient


# ------------------------------------------------------------------------------ the estimators
class _BaseMLP(BaseEstimator):
    """What the classifier and the regressor share: parameters, network, training loop."""

    _output: str  # the output units of the last layer: identity, logistic or softmax

    def __init__(self, hidden_layer_sizes: Union[int, Sequence[int]] = (100,),
                 activation: str = "relu", *, solver: str = "adam", alpha: float = 0.0001,
                 batch_size: Union[int, str] = "auto", learning_rate: str = "constant",
                 learning_rate_init: float = 0.001, power_t: float = 0.5, max_iter: int = 200,
                 shuffle: bool = True, random_state: Any = None, tol: float = 1e-4,
                 verbose: bool = False, warm_start: bool = False, momentum: float = 0.9,
                 nesterovs_momentum: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, n_iter_no_change: Union[int, float] = 10,
                 max_fun: int = 15000, warmup_fraction: float = 0.0,
                 checkpoint_every: Optional[int] = None,
                 memory_budget: Union[None, int, str] = None, residual: bool = False,
                 norm: Optional[str] = None, dropout: float = 0.0, dtype: Any = np.float32,
                 n_threads: Optional[int] = None) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.warmup_fraction = warmup_fraction
        self.checkpoint_every = checkpoint_every
        self.memory_budget = memory_budget
        self.residual = residual
        self.norm = norm
        self.dropout = dropout
        self.dtype = dtype
        self.n_threads = n_threads

    # ---------------------------------------------------------------- parameters
    def _check_params(self) -> Dict[str, Any]:
        """Every parameter checked (TypeError/ValueError naming it); nothing is changed."""
        p: Dict[str, Any] = {"hidden_layer_sizes": _hidden_sizes(self.hidden_layer_sizes)}
        p["activation"] = _check_choice(self.activation, "activation", tuple(HIDDEN_ACTIVATIONS))
        p["solver"] = _check_choice(self.solver, "solver", _SOLVERS)
        p["alpha"] = _check_real(self.alpha, "alpha", 0.0)
        if isinstance(self.batch_size, str):
            p["batch_size"] = _check_choice(self.batch_size, "batch_size", ("auto",))
        else:
            p["batch_size"] = _check_int(self.batch_size, "batch_size", 1)
        p["learning_rate"] = _check_choice(self.learning_rate, "learning_rate", _SCHEDULES)
        p["learning_rate_init"] = _check_real(self.learning_rate_init, "learning_rate_init", 0.0,
                                              low_open=True)
        p["power_t"] = _check_real(self.power_t, "power_t", 0.0)
        p["warmup_fraction"] = _check_real(self.warmup_fraction, "warmup_fraction", 0.0, 1.0,
                                           high_open=True)
        p["max_iter"] = _check_int(self.max_iter, "max_iter", 1)
        p["tol"] = _check_real(self.tol, "tol", 0.0)
        p["momentum"] = _check_real(self.momentum, "momentum", 0.0, 1.0)
        p["validation_fraction"] = _check_real(self.validation_fraction, "validation_fraction",
                                               0.0, 1.0, high_open=True)
        p["beta_1"] = _check_real(self.beta_1, "beta_1", 0.0, 1.0, high_open=True)
        p["beta_2"] = _check_real(self.beta_2, "beta_2", 0.0, 1.0, high_open=True)
        p["epsilon"] = _check_real(self.epsilon, "epsilon", 0.0, low_open=True)
        if isinstance(self.n_iter_no_change, float) and self.n_iter_no_change == np.inf:
            p["n_iter_no_change"] = np.inf
        else:
            p["n_iter_no_change"] = _check_int(self.n_iter_no_change, "n_iter_no_change", 1)
        p["max_fun"] = _check_int(self.max_fun, "max_fun", 1)
        for name in ("shuffle", "warm_start", "nesterovs_momentum", "early_stopping",
                     "residual"):
            p[name] = _check_bool(getattr(self, name), name)
        if not isinstance(self.verbose, (bool, np.bool_, numbers.Integral)):
            raise TypeError(f"verbose must be a bool or an integer, got {self.verbose!r}")
        if self.checkpoint_every is not None and self.memory_budget is not None:
            raise ValueError("give at most one of checkpoint_every and memory_budget")
        p["checkpoint_every"] = (None if self.checkpoint_every is None
                                 else _check_int(self.checkpoint_every, "checkpoint_every", 0))
        p["memory_budget"] = self._budget()
        p["dropout"] = _check_real(self.dropout, "dropout", 0.0, 1.0, high_open=True)
        p["norm"] = check_norm(self.norm)
        hidden = self.hidden_layer_sizes
        sizes = [hidden] if isinstance(hidden, numbers.Integral) else list(hidden)
        if p["residual"] and (not sizes or len(set(sizes)) != 1):
            raise ValueError(f"residual=True builds blocks of one width: hidden_layer_sizes must "
                             f"be one or more equal sizes, got {hidden!r}")
        if p["solver"] == "lbfgs" and p["dropout"] > 0:
            raise ValueError(f"dropout={p['dropout']} needs a stochastic solver ('adam' or "
                             f"'sgd'): solver='lbfgs' minimises one deterministic full-batch loss")
        try:
            p["dtype"] = None if self.dtype is None else check_float_dtype(self.dtype)
        except TypeError as exc:
            raise ValueError(f"dtype: {exc}") from None
        p["n_threads"] = None if self.n_threads is None else _check_int(self.n_threads,
                                                                         "n_threads", 1)
        p.update(self._check_own_params())
        return p

    def _check_own_params(self) -> Dict[str, Any]:
        """The parameters of the classifier or the regressor only (checked, unchanged)."""
        return {}

    def _budget(self) -> Optional[int]:
        budget = self.memory_budget
        if budget is None:
            return None
        if isinstance(budget, str):
            from ckpt.units import parse_size
            try:
                return parse_size(budget)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"memory_budget: {exc}") from None
        return _check_int(budget, "memory_budget", 1)

    # ---------------------------------------------------------------- input
    def _validate_X(self, X: Any, dtype: Any, reset: bool) -> Any:
        return self._validate_data(X, _NO_Y, dtype, reset)

    def _validate_data(self, X: Any, y: Any, dtype: Any, reset: bool, **kwargs: Any) -> Any:
        """scikit-learn's checks of X (and y): dense X C-contiguous, sparse X (CSR or CSC,
        matrix or array) as CSR, both in ``dtype`` (one dtype, or float64 unless float32 as
        scikit-learn's ``(np.float64, np.float32)``)."""
        if sp.issparse(X) and X.dtype.kind != "f":
            raise TypeError(f"sparse X must hold floating-point values (float32 or float64), "
                            f"got dtype {X.dtype}: cast it first, e.g. X.astype(np.float32)")
        kwargs.update(reset=reset, dtype=dtype, order="C", accept_sparse=["csr", "csc"])
        if y is _NO_Y:
            X = validate_data(self, X, **kwargs)
        else:
            X, y = validate_data(self, X, y, multi_output=True, **kwargs)
        if sp.issparse(X) and X.format != "csr":
            X = X.tocsr()
        return X if y is _NO_Y else (X, y)

    @staticmethod
    def _sample_weight(sample_weight: Any, n_samples: int, dtype: np.dtype) -> Optional[np.ndarray]:
        if sample_weight is None:
            return None
        if isinstance(sample_weight, numbers.Number):
            sample_weight = np.full(n_samples, sample_weight, dtype=dtype)
        w = np.asarray(sample_weight)
        if w.ndim != 1 or w.shape[0] != n_samples:
            raise ValueError(f"sample_weight must have shape ({n_samples},), got {w.shape}")
        if not (np.issubdtype(w.dtype, np.number) or w.dtype == bool):
            raise ValueError(f"sample_weight must hold numbers, got dtype {w.dtype}")
        w = np.ascontiguousarray(w, dtype=dtype)
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("sample_weight must hold finite, non-negative numbers")
        if not w.any():
            raise ValueError("sample_weight is zero for every sample")
        return w

    # ---------------------------------------------------------------- the network
    def _initialize(self, p: Dict[str, Any], units: List[int], rng: np.random.RandomState) -> None:
        """A new network, initialised as scikit-learn does, and fresh training records."""
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = units[-1]
        self.n_layers_ = len(units)
        self.out_activation_ = self._output
        act = HIDDEN_ACTIVATIONS[p["activation"]]
        if p["residual"]:
            # ckpt's pre-norm residual MLP (ckpt.build_mlp): one block per hidden layer size.
            layers = build_mlp(units[0], len(units) - 2, units[1], units[-1], act, p["dtype"],
                               np.random.default_rng(rng.randint(2**31)), residual=True,
                               norm=p["norm"], dropout=p["dropout"])
            self._attach(layers, p)
            return
        layers = []
        for i in range(len(units) - 1):
            fan_in, fan_out = units[i], units[i + 1]
            # Glorot uniform, factor 2 for logistic units: scikit-learn's initialisation, drawn
            # from the same random stream (weights, then biases, layer by layer).
            bound = np.sqrt((2.0 if p["activation"] == "logistic" else 6.0) / (fan_in + fan_out))
            coef = rng.uniform(-bound, bound, (fan_in, fan_out))
            intercept = rng.uniform(-bound, bound, fan_out)
            hidden = i < len(units) - 2
            # With norm="batch" the activation comes after the BatchNorm, not in the Dense.
            fused = act if hidden and p["norm"] != "batch" else None
            layer = Dense(fan_in, fan_out, fused, dtype=p["dtype"], rng=0)
            layer.set_params([coef, intercept])
            layers.append(layer)
            if hidden and p["norm"] is not None:
                layers += ([LayerNorm(fan_out, dtype=p["dtype"])] if p["norm"] == "layer" else
                           [BatchNorm(fan_out, dtype=p["dtype"])]
                           + ([Activation(act)] if act is not None else []))
            if hidden and p["dropout"] > 0:
                layers.append(Dropout(p["dropout"]))
        self._attach(layers, p)

    def _attach(self, layers: List[Any], p: Dict[str, Any]) -> None:
        """Wrap the new layers in their checkpointer; fresh training records."""
        self._schedule = ({"budget_bytes": p["memory_budget"]} if p["memory_budget"] is not None
                          else {"checkpoint_every": p["checkpoint_every"]})
        seed = int(self._random_state.randint(2**31)) if p["dropout"] > 0 else None
        self._model = SegmentCheckpointer(layers, **self._schedule, seed=seed)
        self._rest = None
        self._bind_parameters()
        self._best_parameters = self._parameter_copies()
        for name in ("loss_curve_", "validation_scores_", "best_validation_score_", "best_loss_",
                     "validation_loss_curve_", "_no_improvement_count"):
            self.__dict__.pop(name, None)
        if p["solver"] in _STOCHASTIC_SOLVERS:   # scikit-learn's lbfgs fit keeps no curves
            self._new_records(p)

    def _new_records(self, p: Dict[str, Any]) -> None:
        """Empty training curves and stopping state, as scikit-learn's first stochastic fit."""
        self.loss_curve_ = []
        self.validation_loss_curve_ = None
        self._no_improvement_count = 0
        if p["early_stopping"]:
            self.validation_scores_ = []
            self.best_validation_score_ = -np.inf
            self.best_loss_ = None
        else:
            self.best_loss_ = np.inf
            self.validation_scores_ = None
            self.best_validation_score_ = None

    def _bind_parameters(self) -> None:
        """coefs_ and intercepts_ are the Dense layers' own arrays, W (n_in, n_out) and b, in
        chain order (with residual=True: the input projection, the two Dense of each block,
        the output layer; the LayerNorms' parameters are not among them)."""
        self.coefs_ = [layer.W for layer in self._dense_layers()]
        self.intercepts_ = [layer.b for layer in self._dense_layers()]

    def _state_arrays(self) -> List[np.ndarray]:
        """Every parameter of the network (coefs_, intercepts_, the norms') and the BatchNorms'
        running statistics: what early stopping's best epoch is."""
        buffers = [a for layer in walk(self._model.layers) if isinstance(layer, BatchNorm)
                   for a in (layer.running_mean, layer.running_var)]
        return collect_parameters(self._model)[0] + buffers

    def _parameter_copies(self) -> List[np.ndarray]:
        """Copies of :meth:`_state_arrays`."""
        return [a.copy() for a in self._state_arrays()]

    def _dense_layers(self) -> List[Dense]:
        return [layer for layer in walk(self._model.layers) if isinstance(layer, Dense)]

    def _assigned_parameters(self) -> Optional[List[np.ndarray]]:
        """The arrays assigned to coefs_/intercepts_ since the network was built, checked
        against its shapes (ValueError otherwise); None when they are still its own."""
        dense = self._dense_layers()
        coefs, intercepts = list(self.coefs_), list(self.intercepts_)
        if len(coefs) == len(intercepts) == len(dense) and all(
                c is layer.W and b is layer.b for c, b, layer in zip(coefs, intercepts, dense)):
            return None
        if len(coefs) != len(dense) or len(intercepts) != len(dense):
            raise ValueError(f"coefs_ and intercepts_ must hold {len(dense)} arrays each (one per "
                             f"layer), got {len(coefs)} and {len(intercepts)}")
        values = []
        for i, (c, b, layer) in enumerate(zip(coefs, intercepts, dense)):
            c, b = np.asarray(c), np.asarray(b)
            if c.shape != layer.W.shape or b.shape != layer.b.shape:
                raise ValueError(f"layer {i} has coefs_ of shape {layer.W.shape} and intercepts_ "
                                 f"of shape {layer.b.shape}, got {c.shape} and {b.shape}")
            values += [c, b]
        return values

    def _adopt_assigned_parameters(self, values: Optional[List[np.ndarray]]) -> None:
        """Copy assigned coefs_/intercepts_ into the network, cast to its dtype (the training
        dtype), and bind coefs_/intercepts_ to the network's arrays again."""
        if values is None:
            return
        for i, layer in enumerate(self._dense_layers()):
            layer.set_params([values[2 * i].astype(layer.dtype, copy=False),
                              values[2 * i + 1].astype(layer.dtype, copy=False)])
        self._bind_parameters()

    def _rest_chain(self) -> SegmentCheckpointer:
        """The chain after the first layer, for sparse input: the first layer's X @ W and
        X.T @ G run on the sparse matrix (scipy), the rest compiled. Same layer objects as
        the full chain, so both train the same parameters."""
        if self.__dict__.get("_rest") is None:
            layers = self._model.layers[1:]
            seed = int(self._model.next_step_seed()) if any(
                isinstance(layer, Dropout) for layer in walk(layers)) else None
            self._rest = SegmentCheckpointer(layers, **self._schedule, seed=seed)
        return self._rest

    def _check_network(self, p: Dict[str, Any], units: List[int]) -> None:
        """A warm start or partial_fit continues the same network: refuse another one."""
        current = [self.coefs_[0].shape[0]] + [c.shape[1] for c in self.coefs_]
        if p["residual"]:   # the Dense layers of build_mlp(residual=True): two per block
            units = [units[0]] + [units[1]] * (2 * len(units) - 3) + [units[-1]]
        if current != units:
            raise ValueError(f"warm_start/partial_fit continue the fitted network of layer sizes "
                             f"{current}, but the data and hidden_layer_sizes give {units}")

    def _new_optimizer(self, p: Dict[str, Any]) -> _SklearnOptimizer:
        if p["solver"] == "adam":
            return _SklearnAdam(self._model, p["learning_rate_init"], p["beta_1"], p["beta_2"],
                                p["epsilon"])
        return _SklearnSGD(self._model, p["learning_rate_init"], p["learning_rate"],
                           p["momentum"], p["nesterovs_momentum"], p["power_t"])

    # ---------------------------------------------------------------- training
    def _training_dtype(self, p: Dict[str, Any], first_pass: bool) -> Any:
        """The dtype X is validated in: a continued fit keeps the network's; a first fit takes
        ``dtype``, or with dtype=None scikit-learn's rule (float32 stays, the rest float64)."""
        if first_pass:
            return (np.float64, np.float32) if p["dtype"] is None else p["dtype"]
        network = self._model.dtype
        if p["dtype"] is not None and p["dtype"] != network:
            raise ValueError(f"warm_start/partial_fit continue the fitted {network} network, "
                             f"but dtype is now {p['dtype']}")
        return network

    def _fit(self, X: Any, y: Any, sample_weight: Any, incremental: bool,
             validation_data: Any = None) -> "_BaseMLP":
        p = self._check_params()
        first_pass = not hasattr(self, "coefs_") or (not p["warm_start"] and not incremental)
        if incremental and p["early_stopping"]:
            raise ValueError("partial_fit does not support early_stopping=True")
        assigned = None if first_pass else self._assigned_parameters()
        dtype = self._training_dtype(p, first_pass)
        # The target checks set classes_ (scikit-learn's order): put them back if any later
        # check refuses the input, so that a refused fit changes nothing.
        before = {key: self.__dict__[key] for key in _TARGET_STATE if key in self.__dict__}
        try:
            X, Y, labels = self._validate_input(X, y, dtype, incremental, first_pass)
            p["dtype"] = X.dtype
            sample_weight = self._sample_weight(sample_weight, X.shape[0], X.dtype)
            sample_weight = self._with_class_weight(p, labels, sample_weight)
            if validation_data is not None and p["solver"] not in _STOCHASTIC_SOLVERS:
                raise ValueError("validation_data is scored every epoch: it needs a stochastic "
                                 "solver ('adam' or 'sgd'), not solver='lbfgs'")
            validation = self._validation_set(validation_data, X.dtype)
            units = [X.shape[1]] + p["hidden_layer_sizes"] + [Y.shape[1]]
            if not first_pass:
                self._check_network(p, units)
        except BaseException:
            for key in _TARGET_STATE:
                self.__dict__.pop(key, None)
            self.__dict__.update(before)
            raise
        self._random_state = check_random_state(self.random_state)
        if first_pass:
            self._initialize(p, units, self._random_state)
        else:
            self._adopt_assigned_parameters(assigned)
        if p["solver"] in _STOCHASTIC_SOLVERS and (not incremental
                                                   or not hasattr(self, "_optimizer")):
            self._optimizer = self._new_optimizer(p)
        with _OTHER_BLAS_AT_ONE.held(), _blas_threads(p["n_threads"]):
            self._set_training(True)
            try:
                if p["solver"] == "lbfgs":
                    self._fit_lbfgs(p, X, Y, sample_weight)
                else:
                    self._fit_stochastic(p, X, Y, labels, sample_weight, incremental,
                                         validation)
            finally:
                self._set_training(False)
        if not all(np.isfinite(a).all() for a in self.coefs_ + self.intercepts_):
            raise ValueError("Solver produced non-finite parameter weights. The input data may "
                             "contain large values and need to be preprocessed.")
        self.memory_report_ = self._memory_report(min(self._batch_rows, X.shape[0]),
                                                  sp.issparse(X))
        return self

    def _with_class_weight(self, p: Dict[str, Any], labels: Any,
                           sample_weight: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """sample_weight times the class weights (the classifier's class_weight)."""
        return sample_weight

    def _validation_set(self, validation_data: Any, dtype: np.dtype) -> Any:
        """validation_data=(X_val, y_val) checked like the training data: (X, Y, labels)."""
        if validation_data is None:
            return None
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            what = (f"a {type(validation_data).__name__} of length {len(validation_data)}"
                    if isinstance(validation_data, (tuple, list))
                    else type(validation_data).__name__)
            raise ValueError(f"validation_data must be a pair (X_val, y_val), got {what}")
        X_val, y_val = self._validate_data(validation_data[0], validation_data[1], dtype,
                                           reset=False, **self._y_checks())
        if y_val.ndim == 2 and y_val.shape[1] == 1:
            y_val = column_or_1d(y_val, warn=True)
        return (X_val,) + self._encode_targets(y_val, X_val.dtype, "validation_data")

    def _set_training(self, training: bool) -> None:
        self._model.set_training(training)
        if self.__dict__.get("_rest") is not None:
            self._rest.set_training(training)

    def _loss_and_gradients(self, X: Any, Y: np.ndarray, w: Optional[np.ndarray],
                            grad: np.ndarray) -> float:
        """One forward and backward over the batch (X, Y): returns its loss (before the L2
        term) and sets every parameter's gradient. ``grad`` receives d loss / d output."""
        if sp.issparse(X):
            first, rest = self._model.layers[0], self._rest_chain()
            z = np.asarray(X @ first.W)
            z += first.b
            output = rest.forward(_first_activation(first, z))
        else:
            output = self._model.forward(X)
        loss = self._output_loss(output, Y, w, grad)
        if sp.issparse(X):
            g = rest.backward(grad, input_grad=True, accumulate=False)
            g *= _first_derivative(first, z)
            first.grad_W[...] = X.T @ g
            np.sum(g, axis=0, out=first.grad_b)
        else:
            self._model.backward(grad, input_grad=False, accumulate=False)
        return loss

    def _output_loss(self, z: np.ndarray, Y: np.ndarray, w: Optional[np.ndarray],
                     grad: np.ndarray) -> float:
        """scikit-learn's loss of the network output z (before the output units) against Y;
        grad receives w_i (out(z) - y) / sum(w), its gradient with respect to z."""
        if self._output != "exp":
            return _core.output_loss_kernel(z, Y, w, grad, _core.OUTPUT_CODES[self._output])
        # Half Poisson deviance on exp outputs, as scikit-learn's poisson_loss:
        # the weighted mean over samples of y log(y / p) - y + p, summed over the outputs.
        p = np.exp(z)
        loss = float(np.average(xlogy(Y, Y / p) - Y + p, weights=w, axis=0).sum())
        np.subtract(p, Y, out=grad)
        if w is not None:
            grad *= w[:, None]
        grad /= z.shape[0] if w is None else w.sum(dtype=np.float64)
        return loss

    def _fit_lbfgs(self, p: Dict[str, Any], X: Any, Y: np.ndarray,
                   sample_weight: Optional[np.ndarray]) -> None:
        """scikit-learn's lbfgs: scipy's L-BFGS-B on the full-batch loss (``max_iter``
        iterations, ``max_fun`` loss evaluations, ``tol`` on the projected gradient)."""
        objective = _PackedObjective(self, X, Y, sample_weight, p["alpha"])
        self._batch_rows = X.shape[0]

        iterations = itertools.count(1)

        def report(intermediate_result: Any) -> None:
            print(f"Iteration {next(iterations)}, loss = {intermediate_result.fun:.8f}")

        result = scipy.optimize.minimize(
            objective, objective.packed(), method="L-BFGS-B", jac=True,
            callback=report if self.verbose else None,
            options={"maxfun": p["max_fun"], "maxiter": p["max_iter"], "gtol": p["tol"]})
        self.n_iter_ = min(result.nit, p["max_iter"])
        if result.status != 0:
            message = (f"lbfgs failed to converge after {self.n_iter_} iteration(s) "
                       f"(status={result.status}):\n{result.message}\n")
            if self.n_iter_ == p["max_iter"]:
                message += (f"\nIncrease the number of iterations to improve the convergence "
                            f"(max_iter={p['max_iter']}).")
            message += ("\nYou might also want to scale the data as shown in:\n"
                        "    https://scikit-learn.org/stable/modules/preprocessing.html")
            warnings.warn(message, ConvergenceWarning, stacklevel=4)
        self.loss_ = result.fun
        objective.unpack(result.x)

    def _fit_stochastic(self, p: Dict[str, Any], X: Any, Y: np.ndarray, labels: np.ndarray,
                        sample_weight: Optional[np.ndarray], incremental: bool,
                        validation: Any) -> None:
        rng = self._random_state
        if not hasattr(self, "loss_curve_"):     # a warm start from an lbfgs fit
            self._new_records(p)
        # A warm start that turns early_stopping on or off starts the other record afresh.
        if p["early_stopping"] and self.best_validation_score_ is None:
            self.best_validation_score_ = -np.inf
        if not p["early_stopping"] and self.best_loss_ is None:
            self.best_loss_ = np.inf
        w_val = None
        if validation is None and p["early_stopping"]:
            X, Y, labels, sample_weight, validation, w_val = self._split(
                p, X, Y, labels, sample_weight)
        if validation is not None:
            if self.validation_scores_ is None:
                self.validation_scores_ = []
            if self.validation_loss_curve_ is None:
                self.validation_loss_curve_ = []
        n = X.shape[0]
        if p["batch_size"] == "auto":
            batch_size = min(200, n)
        else:
            if p["batch_size"] > n:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is "
                              "going to be clipped")
            batch_size = int(np.clip(p["batch_size"], 1, n))
        if p["norm"] == "batch" and min(batch_size, n % batch_size or batch_size) < 2:
            raise ValueError(f"norm='batch' needs at least 2 rows in every training batch, but "
                             f"{n} samples in batches of {batch_size} leave a batch of "
                             f"{min(batch_size, n % batch_size or batch_size)} row")
        self._batch_rows = batch_size
        optimizer = self._optimizer
        # learning_rate="cosine": ckpt.optim.schedules' Cosine over max_iter epochs, per batch.
        cosine = (Cosine(p["learning_rate_init"], p["warmup_fraction"])
                  if p["learning_rate"] == "cosine" else None)
        total_steps = p["max_iter"] * len(range(0, n, batch_size))
        order = np.arange(n)
        grads: Dict[int, np.ndarray] = {}
        progress = self._progress(p)
        try:
            self.n_iter_ = 0
            for _ in range(p["max_iter"]):
                if p["shuffle"]:
                    order = shuffle(order, random_state=rng)
                total = 0.0
                for batch in gen_batches(n, batch_size):
                    idx = order[batch] if p["shuffle"] else batch
                    w = None if sample_weight is None else sample_weight[idx]
                    weight = (batch.stop - batch.start if w is None
                              else float(w.sum(dtype=np.float64)))
                    if weight == 0:
                        continue  # rows of weight zero only: nothing to learn from this batch
                    rows = batch.stop - batch.start
                    grad = grads.get(rows)
                    if grad is None:
                        grad = grads[rows] = np.empty((rows, Y.shape[1]), Y.dtype)
                    loss = self._loss_and_gradients(X[idx], Y[idx], w, grad)
                    if p["alpha"]:
                        loss += 0.5 * p["alpha"] * self._squared_weights() / weight
                    if cosine is not None:  # partial_fit past max_iter epochs: the last rate
                        optimizer.set_rate(cosine(min(optimizer.step_count, total_steps - 1),
                                                  total_steps))
                    optimizer.step(p["alpha"] / weight)
                    total += loss * rows
                self.n_iter_ += 1
                self.loss_ = np.float64(total / n)
                self.t_ += n
                self.loss_curve_.append(self.loss_)
                self._say(progress, f"Iteration {self.n_iter_}, loss = {self.loss_:.8f}")
                if not np.isfinite(self.loss_):
                    self._diverged(p, n, batch_size)
                if validation is not None:
                    self._record_validation(validation, w_val, progress)
                self._update_no_improvement_count(p)
                optimizer.iteration_ends(self.t_)
                if self._no_improvement_count > p["n_iter_no_change"]:
                    what = "Validation score" if p["early_stopping"] else "Training loss"
                    stop, note = optimizer.trigger_stopping()
                    self._say(progress, f"{what} did not improve more than tol={p['tol']:f} for "
                                        f"{p['n_iter_no_change']} consecutive epochs. {note}")
                    if stop:
                        break
                    self._no_improvement_count = 0
                if incremental:
                    break
                if self.n_iter_ == p["max_iter"]:
                    warnings.warn(f"Stochastic Optimizer: Maximum iterations ({p['max_iter']}) "
                                  f"reached and the optimization hasn't converged yet.",
                                  ConvergenceWarning)
        finally:
            if progress is not None:
                progress.close()
        if p["early_stopping"]:   # the best epoch's parameters, LayerNorms' included
            for target, best in zip(self._state_arrays(), self._best_parameters):
                np.copyto(target, best)

    def _diverged(self, p: Dict[str, Any], n: int, batch_size: int) -> None:
        """The epoch's loss is not finite: training cannot recover, say why and stop."""
        where = (f"(epoch {self.n_iter_}, {n} samples in batches of {batch_size}, "
                 f"learning_rate_init={p['learning_rate_init']})")
        if not all(np.isfinite(a).all() for a in self.coefs_ + self.intercepts_):
            raise ValueError(f"Solver produced non-finite parameter weights. The input data may "
                             f"contain large values and need to be preprocessed. {where}")
        raise ValueError(f"The training loss diverged to {self.loss_} {where}: the input data "
                         f"may contain large values and need to be preprocessed, or "
                         f"learning_rate_init is too large.")

    def _split(self, p: Dict[str, Any], X: Any, Y: np.ndarray, labels: np.ndarray,
               sample_weight: Optional[np.ndarray]) -> Tuple[Any, ...]:
        """early_stopping's validation split, scikit-learn's: train_test_split with the
        estimator's random state, stratified for binary targets."""
        stratify = labels if self._stratify() else None
        arrays = [X, Y, labels] + ([] if sample_weight is None else [sample_weight])
        try:
            parts = train_test_split(*arrays, random_state=self._random_state,
                                     test_size=p["validation_fraction"], stratify=stratify)
        except ValueError as exc:
            raise ValueError(f"{exc} (early_stopping's stratified validation split of "
                             f"{X.shape[0]} samples, validation_fraction="
                             f"{p['validation_fraction']})") from None
        X, X_val, Y, Y_val, labels, labels_val = parts[:6]
        sample_weight, w_val = parts[6:] if sample_weight is not None else (None, None)
        if X_val.shape[0] < 2:
            raise ValueError(f"The validation set is too small. Increase "
                             f"'validation_fraction' or the size of your dataset. "
                             f"(validation_fraction={p['validation_fraction']} of "
                             f"{X.shape[0] + X_val.shape[0]} samples gives {X_val.shape[0]})")
        return X, Y, labels, sample_weight, (X_val, Y_val, labels_val), w_val

    def _record_validation(self, validation: Any, w_val: Optional[np.ndarray],
                           progress: Any) -> None:
        """The epoch's validation score and loss (the data loss, without the L2 term)."""
        X_val, Y_val, labels_val = validation
        z = self._raw_outputs(X_val)   # one forward for both
        loss = self._output_loss(z, Y_val, w_val, np.empty_like(z))
        self.validation_loss_curve_.append(np.float64(loss))
        score = self._validation_score(self._output_units(z), labels_val, w_val)
        self.validation_scores_.append(score)
        self._say(progress, f"Validation score: {score:f}")

    def _squared_weights(self) -> float:
        """||W||^2 over the weights, for the L2 term of the loss (once per mini-batch).

        einsum's own loop, not np.dot: np.dot would run NumPy's OpenBLAS, whose ddot is
        threaded above 10,000 elements, and its threads would then spin against ckpt's.
        """
        total = 0.0
        for coef in self.coefs_:
            flat = coef.reshape(-1)
            total += float(np.einsum("i,i->", flat, flat))
        return total

    def _update_no_improvement_count(self, p: Dict[str, Any]) -> None:
        """scikit-learn's rule: an epoch improves if it beats the best so far by tol."""
        if p["early_stopping"]:
            score = self.validation_scores_[-1]
            if score < self.best_validation_score_ + p["tol"]:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_parameters = self._parameter_copies()
        else:
            if self.loss_curve_[-1] > self.best_loss_ - p["tol"]:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    def _progress(self, p: Dict[str, Any]) -> Any:
        if not self.verbose:
            return None
        from tqdm import tqdm
        return tqdm(total=p["max_iter"], desc=type(self).__name__, unit="epoch",
                    file=sys.stdout, leave=False, dynamic_ncols=True)

    def _say(self, progress: Any, message: str) -> None:
        if progress is None:
            return
        if message.startswith("Iteration"):
            progress.update(1)
            progress.set_postfix_str(f"loss={self.loss_:.6f}", refresh=False)
        progress.write(message, file=sys.stdout)

    def _memory_report(self, batch: int, sparse: bool) -> Dict[str, Any]:
        """What checkpointing saved and cost at the training batch size: of the chain that
        ran, the whole network, or after the first layer for sparse X."""
        from ckpt.plan import uniform_plan
        model = self._rest_chain() if sparse and len(self._model) > 1 else self._model
        widths, dtype = model.widths, model.dtype
        if model.budget_bytes is not None:
            plan = model._plan_for_budget(batch)
        else:
            plan = uniform_plan(widths, batch, model.checkpoint_every, dtype)
        plain = uniform_plan(widths, batch, 1, dtype)
        return {
            "batch_size": batch,
            "n_layers": len(widths) - 1,
            "checkpoint_every": model.checkpoint_every,
            "memory_budget": model.budget_bytes,
            "peak_activation_bytes": plan.peak_bytes,
            "peak_activation_bytes_plain": plain.peak_bytes,
            "recomputed_layer_forwards": sum(count - 1 for count in plan.forward_counts),
            "recompute_flops_fraction": plan.recompute_flops / (3 * plan.plain_forward_flops),
            "measured_peak_bytes": model.memory_tracker.peak_bytes,
            "optimizer_state_bytes": self._optimizer_state_bytes(),
            "first_layer_outside_chain": model is not self._model,
        }

    def _optimizer_state_bytes(self) -> int:
        if self.solver in _STOCHASTIC_SOLVERS:
            return self._optimizer.state_bytes
        # scipy's L-BFGS-B keeps maxcor = 10 correction pairs of float64 parameter vectors.
        n_params = sum(p.size for p in collect_parameters(self._model)[0])
        return 2 * 10 * n_params * 8

    # ---------------------------------------------------------------- prediction
    def _raw_outputs(self, X: Any) -> np.ndarray:
        """The network's outputs before the output units, in evaluation mode (Dropout off),
        (n_samples, n_outputs) in the network's dtype."""
        with _blas_threads(self.n_threads):
            if not sp.issparse(X):
                return _predict_layers(self._model, X, batch_size=_PREDICT_ROWS)
            first, rest = self._model.layers[0], self._rest_chain()
            training = rest.is_training
            rest.set_training(False)
            try:
                parts = []
                for start in range(0, max(X.shape[0], 1), _PREDICT_ROWS):
                    z = np.asarray(X[start:start + _PREDICT_ROWS] @ first.W)
                    z += first.b
                    parts.append(np.array(rest.forward(_first_activation(first, z))))
                return np.concatenate(parts)
            finally:
                rest.set_training(training)

    def _forward(self, X: Any, check_input: bool = True) -> np.ndarray:
        """The network's outputs after the output units, (n_samples, n_outputs), in the
        network's dtype (scikit-learn's: the training dtype)."""
        self._adopt_assigned_parameters(self._assigned_parameters())
        if check_input:
            X = self._validate_X(X, self._model.dtype, reset=False)
        return self._output_units(self._raw_outputs(X))

    def _output_units(self, z: np.ndarray) -> np.ndarray:
        """The output units applied to the raw outputs z (overwritten)."""
        if self._output == "logistic":
            return 0.5 * (1.0 + np.tanh(0.5 * z))
        if self._output == "exp":
            return np.exp(z, out=z)
        if self._output == "softmax":
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
        return z

    # ---------------------------------------------------------------- pickling
    def __getstate__(self) -> dict:
        # coefs_ and intercepts_ are the layers' arrays: pickled once, with the layers, and
        # bound again on load (joblib would otherwise write, and load, separate copies). The
        # sparse path's chain (_rest) holds the same layers: pickle's memo keeps them shared.
        state = dict(super().__getstate__())
        state.pop("coefs_", None)
        state.pop("intercepts_", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_model" in self.__dict__:
            self._bind_parameters()


_COMMON_DOC = """
    Parameters are scikit-learn's, with its names, defaults and meaning (``solver`` "adam",
    "sgd" or "lbfgs"; ``max_fun`` for lbfgs), plus ckpt's:

    - ``activation`` also accepts every other activation of ckpt's table
      (:mod:`ckpt.activations`: "gelu", "leaky_relu", "softplus", "silu", ...);
    - ``checkpoint_every``: keep every k-th activation and recompute the rest in backward
      (default floor(sqrt(number of layers))); or ``memory_budget``: bytes or a string such as
      "64MiB", the least recomputation that fits (activations and gradient buffers). lbfgs runs
      the whole training set as one batch, so that is where the budget matters most;
    - ``dtype``: the network's arithmetic. float32 (the default, for speed: half float64's
      activation memory and memory traffic, and faster GEMMs) or float64 casts X to it;
      ``None`` follows scikit-learn: float32 X trains in float32, any other X in float64;
    - ``n_threads``: OpenBLAS threads during fit and predict (None: leave the setting);
    - ``learning_rate="cosine"`` (adam and sgd; scikit-learn's schedules are sgd's only):
      ``ckpt.optim.schedules.Cosine`` from ``learning_rate_init``, set before every batch,
      over ``max_iter`` epochs of batches, after a linear warmup over ``warmup_fraction`` of
      them (default 0); a partial_fit past that holds the last rate;
    - ``dropout``: a Dropout of this probability after each hidden layer (off in predict;
      stochastic solvers only);
    - ``residual=True``: ckpt's pre-norm residual MLP (``ckpt.build_mlp(residual=True)``) with one
      block per hidden layer size (all equal); ``coefs_``/``intercepts_`` then hold every Dense
      layer's arrays in chain order (input projection, two per block, output layer);
    - ``norm``: None, "layer" (a LayerNorm after each hidden layer) or "batch" (each hidden
      layer Dense -> BatchNorm -> activation; with ``residual=True`` the tabular ResNet of
      ``ckpt.build_mlp``); the norms' parameters are not among ``coefs_``/``intercepts_``, and
      a BatchNorm needs at least two rows in every training batch (``batch_size``).

    ``fit`` also takes ``validation_data=(X_val, y_val)``: a validation set scored every epoch
    (``validation_scores_``, and ``validation_loss_curve_``: its loss without the L2 term); with
    ``early_stopping=True`` it replaces the ``validation_fraction`` split, and training stops on
    its score and ends with the best epoch's weights. The split of ``validation_fraction`` also
    fills both curves.

    X may be dense or sparse (CSR or CSC, scipy matrices or arrays, float32/float64): for
    sparse X the first layer's X @ W and X.T @ G run on the sparse matrix (X is never
    densified) and the rest of the network in ckpt's compiled chain.

    ``coefs_[i]`` (n_in, n_out) and ``intercepts_[i]`` are the network's own arrays, in the
    training dtype, as are the outputs of ``predict`` (regressor) and ``predict_proba``.
    Arrays assigned to them before a ``warm_start`` fit, ``partial_fit`` or predict are copied
    into the network (cast to its dtype). Fitted attributes are scikit-learn's, plus
    ``memory_report_``: the peak activation bytes of a training step with and without
    checkpointing, the recomputation it costs, the tracker's measured peak.
    """


def _stochastic(estimator: "_BaseMLP") -> bool:
    """partial_fit exists for the stochastic solvers only, as in scikit-learn."""
    if estimator.solver not in _STOCHASTIC_SOLVERS:
        raise AttributeError(f"partial_fit is only available for stochastic optimizers. "
                             f"{estimator.solver} is not stochastic.")
    return True


class MLPClassifier(ClassifierMixin, _BaseMLP):
    __doc__ = """Multi-layer perceptron classifier: scikit-learn's ``MLPClassifier`` on ckpt.

    Binary and multilabel targets use logistic output units with binary cross-entropy,
    multiclass targets a softmax with cross-entropy.

    ``class_weight`` (ckpt's; scikit-learn's MLP has none): None, a dict {class: weight}
    (classes not named weigh 1), or "balanced" (n_samples / (n_classes * count of the
    class)), computed from the y given to ``fit`` before any validation split, and multiplied
    into ``sample_weight``. Not for multilabel targets; partial_fit takes a dict only.
    """ + _COMMON_DOC

    _output = "logistic"

    def __init__(self, hidden_layer_sizes: Union[int, Sequence[int]] = (100,),
                 activation: str = "relu", *, solver: str = "adam", alpha: float = 0.0001,
                 batch_size: Union[int, str] = "auto", learning_rate: str = "constant",
                 learning_rate_init: float = 0.001, power_t: float = 0.5, max_iter: int = 200,
                 shuffle: bool = True, random_state: Any = None, tol: float = 1e-4,
                 verbose: bool = False, warm_start: bool = False, momentum: float = 0.9,
                 nesterovs_momentum: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, n_iter_no_change: Union[int, float] = 10,
                 max_fun: int = 15000, warmup_fraction: float = 0.0,
                 class_weight: Any = None,
                 checkpoint_every: Optional[int] = None,
                 memory_budget: Union[None, int, str] = None, residual: bool = False,
                 norm: Optional[str] = None, dropout: float = 0.0, dtype: Any = np.float32,
                 n_threads: Optional[int] = None) -> None:
        super().__init__(
            hidden_layer_sizes, activation, solver=solver, alpha=alpha, batch_size=batch_size,
            learning_rate=learning_rate, learning_rate_init=learning_rate_init,
            power_t=power_t, max_iter=max_iter, shuffle=shuffle, random_state=random_state,
            tol=tol, verbose=verbose, warm_start=warm_start, momentum=momentum,
            nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
            validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2,
            epsilon=epsilon, n_iter_no_change=n_iter_no_change, max_fun=max_fun,
            warmup_fraction=warmup_fraction, checkpoint_every=checkpoint_every,
            memory_budget=memory_budget, residual=residual, norm=norm, dropout=dropout,
            dtype=dtype,
            n_threads=n_threads)
        self.class_weight = class_weight

    def _check_own_params(self) -> Dict[str, Any]:
        weights = self.class_weight
        if weights is None or (isinstance(weights, str) and weights == "balanced"):
            return {"class_weight": weights}
        if not isinstance(weights, dict):
            raise ValueError(f"class_weight must be None, 'balanced' or a dict of class: "
                             f"weight, got {type(weights).__name__} {weights!r}")
        for label, weight in weights.items():
            _check_real(weight, f"class_weight[{label!r}]", 0.0)
        return {"class_weight": dict(weights)}

    def _stratify(self) -> bool:
        # scikit-learn stratifies the early-stopping split for binary targets only.
        return self.n_outputs_ == 1

    def _validate_input(self, X: Any, y: Any, dtype: Any, incremental: bool,
                        reset: bool) -> Tuple[Any, np.ndarray, np.ndarray]:
        X, y = self._validate_data(X, y, dtype, reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer().fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start and not incremental:
                if set(classes) != set(self.classes_):
                    raise ValueError(f"warm_start can only be used where `y` has the same "
                                     f"classes as in the previous call to fit. Previously got "
                                     f"{self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has "
                                 f"{self.classes_}. 'y' has {classes}.")
        Y = np.ascontiguousarray(self._label_binarizer.transform(y), dtype=X.dtype)
        self._output = ("softmax" if self._label_binarizer.y_type_ == "multiclass"
                        else "logistic")
        return X, Y, y

    def _y_checks(self) -> Dict[str, Any]:
        return {}

    def _encode_targets(self, y: Any, dtype: np.dtype, where: str) -> Tuple[np.ndarray, Any]:
        check_classification_targets(y)
        unseen = np.setdiff1d(unique_labels(y), self.classes_)
        if len(unseen):
            raise ValueError(f"{where}: `y` has classes not in `self.classes_`. "
                             f"`self.classes_` has {self.classes_}. 'y' has {unique_labels(y)} "
                             f"({len(unseen)} unseen: {unseen}).")
        return np.ascontiguousarray(self._label_binarizer.transform(y), dtype=dtype), y

    def _with_class_weight(self, p: Dict[str, Any], labels: Any,
                           sample_weight: Optional[np.ndarray]) -> Optional[np.ndarray]:
        weights = p["class_weight"]
        if weights is None:
            return sample_weight
        if np.ndim(labels) != 1:
            raise ValueError(f"class_weight is not supported for multilabel targets (y has "
                             f"shape {np.shape(labels)}): give sample_weight instead")
        if isinstance(weights, dict):
            unknown = [label for label in weights if label not in set(self.classes_.tolist())]
            if unknown:
                raise ValueError(f"class_weight names the classes {unknown}, which are not "
                                 f"among the {len(self.classes_)} classes of y: {self.classes_}")
        per_sample = compute_sample_weight(weights, labels)
        if sample_weight is not None:
            per_sample *= sample_weight
        return self._sample_weight(per_sample, len(per_sample), p["dtype"])

    def _validation_score(self, outputs: np.ndarray, y: Any, w: Optional[np.ndarray]) -> float:
        return float(accuracy_score(y, self._from_outputs(outputs), sample_weight=w))

    def fit(self, X: Any, y: Any, sample_weight: Any = None, *,
            validation_data: Any = None) -> "MLPClassifier":
        """Fit the network to X (n_samples, n_features) and class labels y.

        y: (n_samples,) labels, or (n_samples, n_labels) 0/1 indicators for multilabel.
        sample_weight: (n_samples,) non-negative weights of each sample's loss.
        validation_data: (X_val, y_val), scored every epoch (see the class docstring).
        """
        return self._fit(X, y, sample_weight, incremental=False,
                         validation_data=validation_data)

    @available_if(_stochastic)
    def partial_fit(self, X: Any, y: Any, classes: Any = None,
                    sample_weight: Any = None) -> "MLPClassifier":
        """One epoch over (X, y), continuing the fitted network.

        ``classes`` (all the labels) is required on the first call, unless y is multilabel.
        """
        if isinstance(self.class_weight, str) and self.class_weight == "balanced":
            raise ValueError("class_weight='balanced' is not supported for partial_fit (each "
                             "call sees part of the data): give a dict of class weights")
        first = not hasattr(self, "classes_")
        if first:
            if classes is None and not type_of_target(y).startswith("multilabel"):
                raise ValueError("classes must be passed on the first call to partial_fit.")
            self._label_binarizer = LabelBinarizer().fit(y if classes is None else classes)
            self.classes_ = self._label_binarizer.classes_
        elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
            raise ValueError(f"`classes={classes!r}` is not the same as on last call to "
                             f"partial_fit, was: {self.classes_!r}")
        return self._fit(X, y, sample_weight, incremental=True)

    def _predict(self, X: Any, check_input: bool = True) -> np.ndarray:
        return self._from_outputs(self._forward(X, check_input))

    def _from_outputs(self, proba: np.ndarray) -> np.ndarray:
        """The classes of the output units' values."""
        return self._label_binarizer.inverse_transform(
            proba.ravel() if self.n_outputs_ == 1 else proba)

    def predict(self, X: Any) -> np.ndarray:
        """The predicted classes, (n_samples,) or (n_samples, n_labels) for multilabel."""
        check_is_fitted(self)
        return self._predict(X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n_samples, n_classes), in the order of ``classes_``."""
        check_is_fitted(self)
        proba = self._forward(X)
        if self.n_outputs_ == 1:
            return np.hstack([1.0 - proba, proba])
        return proba

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """The logarithm of ``predict_proba``."""
        proba = self.predict_proba(X)
        return np.log(proba, out=proba)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        tags.input_tags.sparse = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    __doc__ = """Multi-layer perceptron regressor: scikit-learn's ``MLPRegressor`` on ckpt.

    ``loss`` as scikit-learn's: "squared_error" (half squared error, identity outputs) or
    "poisson" (half Poisson deviance on exp outputs; targets must be non-negative, and not
    all zero). Targets are (n_samples,) or (n_samples, n_outputs).
    """ + _COMMON_DOC

    _output = "identity"

    def __init__(self, loss: str = "squared_error",
                 hidden_layer_sizes: Union[int, Sequence[int]] = (100,),
                 activation: str = "relu", *, solver: str = "adam", alpha: float = 0.0001,
                 batch_size: Union[int, str] = "auto", learning_rate: str = "constant",
                 learning_rate_init: float = 0.001, power_t: float = 0.5, max_iter: int = 200,
                 shuffle: bool = True, random_state: Any = None, tol: float = 1e-4,
                 verbose: bool = False, warm_start: bool = False, momentum: float = 0.9,
                 nesterovs_momentum: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, n_iter_no_change: Union[int, float] = 10,
                 max_fun: int = 15000, warmup_fraction: float = 0.0,
                 checkpoint_every: Optional[int] = None,
                 memory_budget: Union[None, int, str] = None, residual: bool = False,
                 norm: Optional[str] = None, dropout: float = 0.0, dtype: Any = np.float32,
                 n_threads: Optional[int] = None) -> None:
        super().__init__(
            hidden_layer_sizes, activation, solver=solver, alpha=alpha, batch_size=batch_size,
            learning_rate=learning_rate, learning_rate_init=learning_rate_init,
            power_t=power_t, max_iter=max_iter, shuffle=shuffle, random_state=random_state,
            tol=tol, verbose=verbose, warm_start=warm_start, momentum=momentum,
            nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
            validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2,
            epsilon=epsilon, n_iter_no_change=n_iter_no_change, max_fun=max_fun,
            warmup_fraction=warmup_fraction, checkpoint_every=checkpoint_every,
            memory_budget=memory_budget, residual=residual, norm=norm, dropout=dropout,
            dtype=dtype,
            n_threads=n_threads)
        self.loss = loss

    def _check_own_params(self) -> Dict[str, Any]:
        return {"loss": _check_choice(self.loss, "loss", _REGRESSION_LOSSES)}

    def _stratify(self) -> bool:
        return False

    def _validate_input(self, X: Any, y: Any, dtype: Any, incremental: bool,
                        reset: bool) -> Tuple[Any, np.ndarray, np.ndarray]:
        X, y = self._validate_data(X, y, dtype, reset, y_numeric=True)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        Y, _ = self._encode_targets(y, X.dtype, "y")
        return X, Y, y

    def _y_checks(self) -> Dict[str, Any]:
        return {"y_numeric": True}

    def _encode_targets(self, y: Any, dtype: np.dtype, where: str) -> Tuple[np.ndarray, Any]:
        if self.loss == "poisson" and (np.any(y < 0) or not np.sum(y) > 0):
            # scikit-learn's MLPRegressor lets negative targets through (its loss is NaN
            # then); its other Poisson estimator with this rule, HistGradientBoostingRegressor,
            # raises this ValueError.
            raise ValueError(f"loss='poisson' requires non-negative y and sum(y) > 0. "
                             f"({where}: {int(np.sum(y < 0))} of {np.size(y)} values are "
                             f"negative, sum(y) = {np.sum(y)})")
        return np.ascontiguousarray(np.reshape(y, (len(y), -1)), dtype=dtype), y

    def _initialize(self, p: Dict[str, Any], units: List[int], rng: np.random.RandomState) -> None:
        self._output = "exp" if p["loss"] == "poisson" else "identity"
        super()._initialize(p, units, rng)

    def _validation_score(self, outputs: np.ndarray, y: Any, w: Optional[np.ndarray]) -> float:
        pred = self._from_outputs(outputs)
        if not np.isfinite(pred).all():   # scikit-learn's score of non-finite predictions
            return np.nan
        return float(r2_score(y, pred, sample_weight=w))

    def fit(self, X: Any, y: Any, sample_weight: Any = None, *,
            validation_data: Any = None) -> "MLPRegressor":
        """Fit the network to X (n_samples, n_features) and targets y.

        sample_weight: (n_samples,) non-negative weights of each sample's loss.
        validation_data: (X_val, y_val), scored every epoch (see the class docstring).
        """
        return self._fit(X, y, sample_weight, incremental=False,
                         validation_data=validation_data)

    @available_if(_stochastic)
    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None) -> "MLPRegressor":
        """One epoch over (X, y), continuing the fitted network."""
        return self._fit(X, y, sample_weight, incremental=True)

    def _predict(self, X: Any, check_input: bool = True) -> np.ndarray:
        return self._from_outputs(self._forward(X, check_input))

    @staticmethod
    def _from_outputs(pred: np.ndarray) -> np.ndarray:
        return pred.ravel() if pred.shape[1] == 1 else pred

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets, (n_samples,) or (n_samples, n_outputs)."""
        check_is_fitted(self)
        return self._predict(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.input_tags.sparse = True
        return tags
