"""scikit-learn estimators trained by ckpt: ``MLPClassifier`` and ``MLPRegressor``.

Drop-in counterparts of ``sklearn.neural_network.MLPClassifier`` / ``MLPRegressor``: the same
parameter names and defaults, the same fitted attributes, and scikit-learn's semantics -- its
loss (half squared error; binary cross-entropy on logistic outputs for binary and multilabel
targets; softmax cross-entropy for multiclass), its L2 penalty ``0.5 * alpha * ||W||^2`` on the
weights only, divided by the (weighted) number of samples in the batch and included in
``loss_``, its weight initialisation and shuffling from ``random_state``, its Adam and SGD
updates, learning-rate schedules, early stopping and convergence rule. The network runs on
ckpt: a SegmentCheckpointer of Dense layers in float32 by default, with ckpt's own parameters
``checkpoint_every``, ``memory_budget``, ``dtype`` and ``n_threads``.

Differences from scikit-learn: ``solver="lbfgs"`` is refused; float32 arithmetic by default;
sparse input is refused; negative sample weights are refused; predictions and probabilities
come back as float64 computed from the network's outputs.

scikit-learn (>= 1.6) is needed only here: ``pip install 'ckpt-cpu[sklearn]'``.
"""
from __future__ import annotations

import numbers
import os
import re
import sys
import threading
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy_openblas32

_SKLEARN_EXTRA = "pip install 'ckpt-cpu[sklearn]'"
try:
    import sklearn
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import LabelBinarizer
    from sklearn.utils import check_random_state, column_or_1d, gen_batches, shuffle
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
from ckpt.checkpoint import SegmentCheckpointer
from ckpt.layers import Dense, Dropout, check_float_dtype, walk
from ckpt.optim import Optimizer, _number
from ckpt.train import build_mlp
from ckpt.train import predict as _predict_layers

__all__ = ["MLPClassifier", "MLPRegressor"]

# scikit-learn's activation names, and ckpt's extra ones, to ckpt's Dense activations.
HIDDEN_ACTIVATIONS = {
    "identity": None,
    "logistic": "sigmoid",
    "tanh": "tanh",
    "relu": "relu",
    "gelu": "gelu",
    "leaky_relu": "leaky_relu",
    "softplus": "softplus",
}
_SOLVERS = ("adam", "sgd")
_SCHEDULES = ("constant", "invscaling", "adaptive")
_PREDICT_ROWS = 4096  # rows per forward call in predict


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
            _core.adam_step(p, g, m, v, self.learning_rate_init, self.beta_1, self.beta_2, eps,
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
                 checkpoint_every: Optional[int] = None,
                 memory_budget: Union[None, int, str] = None, residual: bool = False,
                 dropout: float = 0.0, dtype: Any = np.float32,
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
        self.checkpoint_every = checkpoint_every
        self.memory_budget = memory_budget
        self.residual = residual
        self.dropout = dropout
        self.dtype = dtype
        self.n_threads = n_threads

    # ---------------------------------------------------------------- parameters
    def _check_params(self) -> Dict[str, Any]:
        """Every parameter checked (TypeError/ValueError naming it); nothing is changed."""
        if self.solver == "lbfgs":
            raise ValueError("solver='lbfgs' is not supported by ckpt's estimators: ckpt trains "
                             "with mini-batches; use solver='adam' (the default) or 'sgd'")
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
        hidden = self.hidden_layer_sizes
        sizes = [hidden] if isinstance(hidden, numbers.Integral) else list(hidden)
        if p["residual"] and (not sizes or len(set(sizes)) != 1):
            raise ValueError(f"residual=True builds blocks of one width: hidden_layer_sizes must "
                             f"be one or more equal sizes, got {hidden!r}")
        try:
            p["dtype"] = check_float_dtype(self.dtype)
        except TypeError as exc:
            raise ValueError(f"dtype: {exc}") from None
        p["n_threads"] = None if self.n_threads is None else _check_int(self.n_threads,
                                                                         "n_threads", 1)
        return p

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
    def _validate_X(self, X: Any, dtype: np.dtype, reset: bool) -> np.ndarray:
        return validate_data(self, X, reset=reset, dtype=dtype, order="C")

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
                               dropout=p["dropout"])
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
            layer = Dense(fan_in, fan_out, act if i < len(units) - 2 else None, dtype=p["dtype"],
                          rng=0)
            layer.set_params([coef, intercept])
            layers.append(layer)
            if i < len(units) - 2 and p["dropout"] > 0:
                layers.append(Dropout(p["dropout"]))
        self._attach(layers, p)

    def _attach(self, layers: List[Any], p: Dict[str, Any]) -> None:
        """Wrap the new layers in their checkpointer; fresh training records."""
        schedule = ({"budget_bytes": p["memory_budget"]} if p["memory_budget"] is not None
                    else {"checkpoint_every": p["checkpoint_every"]})
        seed = int(self._random_state.randint(2**31)) if p["dropout"] > 0 else None
        self._model = SegmentCheckpointer(layers, **schedule, seed=seed)
        self._bind_parameters()
        self._best_coefs = [c.copy() for c in self.coefs_]
        self._best_intercepts = [b.copy() for b in self.intercepts_]
        self.loss_curve_ = []
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
        dense = [layer for layer in walk(self._model.layers) if isinstance(layer, Dense)]
        self.coefs_ = [layer.W for layer in dense]
        self.intercepts_ = [layer.b for layer in dense]

    def _check_network(self, p: Dict[str, Any], units: List[int]) -> None:
        """A warm start or partial_fit continues the same network: refuse another one."""
        current = [self.coefs_[0].shape[0]] + [c.shape[1] for c in self.coefs_]
        if p["residual"]:   # the Dense layers of build_mlp(residual=True): two per block
            units = [units[0]] + [units[1]] * (2 * len(units) - 3) + [units[-1]]
        if current != units:
            raise ValueError(f"warm_start/partial_fit continue the fitted network of layer sizes "
                             f"{current}, but the data and hidden_layer_sizes give {units}")
        if self.coefs_[0].dtype != p["dtype"]:
            raise ValueError(f"warm_start/partial_fit continue the fitted {self.coefs_[0].dtype} "
                             f"network, but dtype is now {p['dtype']}")

    def _new_optimizer(self, p: Dict[str, Any]) -> _SklearnOptimizer:
        if p["solver"] == "adam":
            return _SklearnAdam(self._model, p["learning_rate_init"], p["beta_1"], p["beta_2"],
                                p["epsilon"])
        return _SklearnSGD(self._model, p["learning_rate_init"], p["learning_rate"],
                           p["momentum"], p["nesterovs_momentum"], p["power_t"])

    # ---------------------------------------------------------------- training
    def _fit(self, X: Any, y: Any, sample_weight: Any, incremental: bool) -> "_BaseMLP":
        p = self._check_params()
        first_pass = not hasattr(self, "coefs_") or (not p["warm_start"] and not incremental)
        if incremental and p["early_stopping"]:
            raise ValueError("partial_fit does not support early_stopping=True")
        X, Y, labels = self._validate_input(X, y, p["dtype"], incremental, first_pass)
        sample_weight = self._sample_weight(sample_weight, X.shape[0], p["dtype"])
        units = [X.shape[1]] + p["hidden_layer_sizes"] + [Y.shape[1]]
        self._random_state = check_random_state(self.random_state)
        if first_pass:
            self._initialize(p, units, self._random_state)
        else:
            self._check_network(p, units)
        if not incremental or not hasattr(self, "_optimizer"):
            self._optimizer = self._new_optimizer(p)
        with _OTHER_BLAS_AT_ONE.held(), _blas_threads(p["n_threads"]):
            self._model.set_training(True)
            self._fit_stochastic(p, X, Y, labels, sample_weight, incremental)
            self._model.set_training(False)
        if not all(np.isfinite(a).all() for a in self.coefs_ + self.intercepts_):
            raise ValueError("Solver produced non-finite parameter weights. The input data may "
                             "contain large values and need to be preprocessed.")
        self.memory_report_ = self._memory_report(min(self._batch_rows, X.shape[0]))
        return self

    def _fit_stochastic(self, p: Dict[str, Any], X: np.ndarray, Y: np.ndarray,
                        labels: np.ndarray, sample_weight: Optional[np.ndarray],
                        incremental: bool) -> None:
        rng = self._random_state
        X_val = labels_val = w_val = None
        if p["early_stopping"]:
            stratify = labels if self._stratify() else None
            arrays = [X, Y, labels] + ([] if sample_weight is None else [sample_weight])
            parts = train_test_split(*arrays, random_state=rng,
                                     test_size=p["validation_fraction"], stratify=stratify)
            X, X_val, Y, _, _, labels_val = parts[:6]
            if sample_weight is not None:
                sample_weight, w_val = parts[6:]
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase "
                                 "'validation_fraction' or the size of your dataset.")
        n = X.shape[0]
        if p["batch_size"] == "auto":
            batch_size = min(200, n)
        else:
            if p["batch_size"] > n:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is "
                              "going to be clipped")
            batch_size = int(np.clip(p["batch_size"], 1, n))
        self._batch_rows = batch_size
        optimizer = self._optimizer
        order = np.arange(n)
        grads: Dict[int, np.ndarray] = {}
        code = _core.OUTPUT_CODES[self._output]
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
                    weight = batch.stop - batch.start if w is None else float(w.sum(dtype=np.float64))
                    if weight == 0:
                        continue  # rows of weight zero only: nothing to learn from this batch
                    rows = batch.stop - batch.start
                    grad = grads.get(rows)
                    if grad is None:
                        grad = grads[rows] = np.empty((rows, Y.shape[1]), X.dtype)
                    output = self._model.forward(X[idx])
                    loss = _core.output_loss_kernel(output, Y[idx], w, grad, code)
                    if p["alpha"]:
                        loss += 0.5 * p["alpha"] * self._squared_weights() / weight
                    self._model.backward(grad, input_grad=False, accumulate=False)
                    optimizer.step(p["alpha"] / weight)
                    total += loss * rows
                self.n_iter_ += 1
                self.loss_ = np.float64(total / n)
                self.t_ += n
                self.loss_curve_.append(self.loss_)
                self._say(progress, f"Iteration {self.n_iter_}, loss = {self.loss_:.8f}")
                self._update_no_improvement_count(p, X_val, labels_val, w_val, progress)
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
        if p["early_stopping"]:
            for target, best in zip(self.coefs_ + self.intercepts_,
                                    self._best_coefs + self._best_intercepts):
                np.copyto(target, best)

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

    def _update_no_improvement_count(self, p: Dict[str, Any], X_val: Optional[np.ndarray],
                                     labels_val: Any, w_val: Optional[np.ndarray],
                                     progress: Any) -> None:
        """scikit-learn's rule: an epoch improves if it beats the best so far by tol."""
        if p["early_stopping"]:
            score = self._validation_score(X_val, labels_val, w_val)
            self.validation_scores_.append(score)
            self._say(progress, f"Validation score: {score:f}")
            if score < self.best_validation_score_ + p["tol"]:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_coefs = [c.copy() for c in self.coefs_]
                self._best_intercepts = [b.copy() for b in self.intercepts_]
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

    def _memory_report(self, batch: int) -> Dict[str, Any]:
        """What checkpointing saved and cost at the training batch size."""
        from ckpt.plan import uniform_plan
        model = self._model
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
            "optimizer_state_bytes": self._optimizer.state_bytes,
        }

    # ---------------------------------------------------------------- prediction
    def _forward(self, X: Any, check_input: bool = True) -> np.ndarray:
        """The network's outputs after the output units, float64, (n_samples, n_outputs)."""
        if check_input:
            X = self._validate_X(X, self.coefs_[0].dtype, reset=False)
        with _blas_threads(self.n_threads):
            z = _predict_layers(self._model, X, batch_size=_PREDICT_ROWS).astype(np.float64)
        if self._output == "logistic":
            return 0.5 * (1.0 + np.tanh(0.5 * z))
        if self._output == "softmax":
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
        return z

    # ---------------------------------------------------------------- pickling
    def __getstate__(self) -> dict:
        # coefs_ and intercepts_ are the layers' arrays: pickled once, with the layers, and
        # bound again on load (joblib would otherwise write, and load, separate copies).
        state = dict(super().__getstate__())
        state.pop("coefs_", None)
        state.pop("intercepts_", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_model" in self.__dict__:
            self._bind_parameters()


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier, scikit-learn's ``MLPClassifier`` trained by ckpt.

    Parameters are scikit-learn's (same names and defaults; ``solver="lbfgs"`` is refused),
    plus ckpt's:

    - ``activation`` also accepts ckpt's "gelu", "leaky_relu" and "softplus";
    - ``checkpoint_every``: keep every k-th activation and recompute the rest in backward
      (default floor(sqrt(number of layers))); or ``memory_budget``: bytes or a string such as
      "64MiB", the least recomputation that fits (activations and gradient buffers);
    - ``dtype``: float32 (default) or float64, the network's arithmetic; X is cast to it;
    - ``n_threads``: OpenBLAS threads during fit and predict (None: leave the setting);
    - ``dropout``: a Dropout of this probability after each hidden layer (off in predict);
    - ``residual=True``: ckpt's pre-norm residual MLP (``ckpt.build_mlp(residual=True)``) with one
      block per hidden layer size (all equal); ``coefs_``/``intercepts_`` then hold every Dense
      layer's arrays in chain order (input projection, two per block, output layer).

    Binary and multilabel targets use logistic output units with binary cross-entropy,
    multiclass targets a softmax with cross-entropy. ``coefs_[i]`` (n_in, n_out) and
    ``intercepts_[i]`` are the network's own arrays (float32 by default). Fitted attributes
    are scikit-learn's, plus ``memory_report_``: the peak activation bytes of a training step
    with and without checkpointing, the recomputation it costs, the tracker's measured peak.
    """

    _output = "logistic"

    def _stratify(self) -> bool:
        return self.n_outputs_ == 1 or self.out_activation_ == "softmax"

    def _validate_input(self, X: Any, y: Any, dtype: np.dtype, incremental: bool,
                        reset: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        X, y = validate_data(self, X, y, reset=reset, dtype=dtype, order="C", multi_output=True)
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
        Y = np.ascontiguousarray(self._label_binarizer.transform(y), dtype=dtype)
        self._output = ("softmax" if self._label_binarizer.y_type_ == "multiclass"
                        else "logistic")
        return X, Y, y

    def _validation_score(self, X: np.ndarray, y: Any, w: Optional[np.ndarray]) -> float:
        pred = self._predict(X, check_input=False)
        return float(accuracy_score(y, pred, sample_weight=w))

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "MLPClassifier":
        """Fit the network to X (n_samples, n_features) and class labels y.

        y: (n_samples,) labels, or (n_samples, n_labels) 0/1 indicators for multilabel.
        sample_weight: (n_samples,) non-negative weights of each sample's loss.
        """
        return self._fit(X, y, sample_weight, incremental=False)

    def partial_fit(self, X: Any, y: Any, classes: Any = None,
                    sample_weight: Any = None) -> "MLPClassifier":
        """One epoch over (X, y), continuing the fitted network.

        ``classes`` (all the labels) is required on the first call, unless y is multilabel.
        """
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
        proba = self._forward(X, check_input)
        if self.n_outputs_ == 1:
            proba = proba.ravel()
        return self._label_binarizer.inverse_transform(proba)

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
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor, scikit-learn's ``MLPRegressor`` trained by ckpt.

    The loss is scikit-learn's half squared error; targets are (n_samples,) or
    (n_samples, n_outputs). Parameters and fitted attributes as for :class:`MLPClassifier`
    (identity output units).
    """

    _output = "identity"

    def _stratify(self) -> bool:
        return False

    def _validate_input(self, X: Any, y: Any, dtype: np.dtype, incremental: bool,
                        reset: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        X, y = validate_data(self, X, y, reset=reset, dtype=dtype, order="C", multi_output=True,
                             y_numeric=True)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        Y = np.ascontiguousarray(y.reshape(len(y), -1), dtype=dtype)
        return X, Y, y

    def _validation_score(self, X: np.ndarray, y: Any, w: Optional[np.ndarray]) -> float:
        pred = self._predict(X, check_input=False)
        return float(r2_score(y, pred, sample_weight=w))

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "MLPRegressor":
        """Fit the network to X (n_samples, n_features) and targets y.

        sample_weight: (n_samples,) non-negative weights of each sample's loss.
        """
        return self._fit(X, y, sample_weight, incremental=False)

    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None) -> "MLPRegressor":
        """One epoch over (X, y), continuing the fitted network."""
        return self._fit(X, y, sample_weight, incremental=True)

    def _predict(self, X: Any, check_input: bool = True) -> np.ndarray:
        pred = self._forward(X, check_input)
        return pred.ravel() if pred.shape[1] == 1 else pred

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets, (n_samples,) or (n_samples, n_outputs)."""
        check_is_fitted(self)
        return self._predict(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
