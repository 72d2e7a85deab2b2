"""Optimizers: SGD (momentum, Nesterov, weight decay), Adam and AdamW, with PyTorch's semantics.

An optimizer takes a model -- anything with ``params()`` and ``gradients()`` (a layer, a
SegmentCheckpointer) or a list of such -- and updates its parameters in place. Each ``step()`` runs
one fused Cython kernel per parameter; the moment buffers are allocated once, up front, and
``state_bytes`` reports their size so that memory reports can count them.

Learning-rate schedules (constant, cosine with warmup, one-cycle), pure functions of the step,
are in :mod:`ckpt.optim.schedules`.
"""
from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ckpt import _core

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def collect_parameters(model: Any) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """The (params, gradients) lists of a model or of a list of models, checked pairwise."""
    parts = list(model) if isinstance(model, (list, tuple)) else [model]
    params: List[np.ndarray] = []
    grads: List[np.ndarray] = []
    for part in parts:
        if not (callable(getattr(part, "params", None))
                and callable(getattr(part, "gradients", None))):
            raise TypeError(f"a model needs params() and gradients(); "
                            f"{type(part).__name__} has not")
        params.extend(part.params())
        grads.extend(part.gradients())
    if len(params) != len(grads):
        raise ValueError(f"the model has {len(params)} parameters but {len(grads)} gradients")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("a parameter appears twice in the model (a layer given twice?)")
    for i, (p, g) in enumerate(zip(params, grads)):
        if not isinstance(p, np.ndarray) or not isinstance(g, np.ndarray):
            raise TypeError(f"parameter {i} and its gradient must be numpy arrays")
        if p.dtype not in _FLOAT_DTYPES or g.dtype != p.dtype:
            raise TypeError(f"parameter {i} is {p.dtype} and its gradient {g.dtype}; "
                            f"both must be the same float32 or float64")
        if p.shape != g.shape:
            raise ValueError(f"parameter {i} has shape {p.shape} but its gradient {g.shape}")
        if not (p.flags.c_contiguous and g.flags.c_contiguous):
            raise ValueError(f"parameter {i} and its gradient must be C-contiguous")
    _check_no_overlap(params, grads)
    return params, grads


def _check_no_overlap(params: List[np.ndarray], grads: List[np.ndarray]) -> None:
    """ValueError if two of the arrays share memory: the kernels write one while reading another.

    All are C-contiguous, so each occupies exactly its byte range, and sorting the ranges finds
    any overlap in O(n log n) (what np.shares_memory would say, pair by pair).
    """
    spans = []
    for kind, arrays in (("parameter", params), ("gradient", grads)):
        for i, a in enumerate(arrays):
            if a.nbytes:
                start = a.__array_interface__["data"][0]
                spans.append((start, start + a.nbytes, f"{kind} {i}"))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{first} and {second} share memory: every parameter and gradient "
                             f"needs its own array")


def _number(value: object, name: str, low: float, high: float = np.inf, *,
            open_low: bool = False, open_high: bool = False, finite: bool = True) -> float:
    """value as a float in the interval (NaN never; infinity only with ``finite=False``), or a
    TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    too_low = value <= low if open_low else value < low
    too_high = value >= high if open_high else value > high
    if np.isnan(value) or (finite and np.isinf(value)) or too_low or too_high:
        lo, hi = "(" if open_low else "[", ")" if open_high or high == np.inf else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")
    return value


_BELOW_ONE = ("momentum", "beta1", "beta2")


def _scalar_hyperparameters(hyper: Dict[str, Any]) -> List[Tuple[str, float]]:
    """(name, value) of every real hyper-parameter, a pair of betas as beta1 and beta2."""
    pairs: List[Tuple[str, float]] = []
    for name, value in hyper.items():
        if name == "betas":
            pairs.extend(zip(("beta1", "beta2"), value))
        elif not isinstance(value, (bool, np.bool_)):
            pairs.append((name, value))
    return pairs


class Optimizer(ABC):
    """Common machinery: parameter lists, flat views, named state buffers, state dicts."""

    _buffer_names: Tuple[str, ...] = ()

    def __init__(self, model: Any) -> None:
        params, grads = collect_parameters(model)
        if not params:
            raise ValueError("the model has no parameters to optimize")
        self._model = model  # pickled in place of the arrays (see __getstate__)
        self._params = params
        self._grads = grads
        # Flat views share memory with the arrays: built once, they make step() allocation-free.
        self._check_for_dtype(self.hyperparameters)
        self._flat_params = [p.reshape(-1) for p in params]
        self._flat_grads = [g.reshape(-1) for g in grads]
        self._buffers: Dict[str, List[np.ndarray]] = {
            name: [np.zeros_like(p) for p in self._flat_params] for name in self._buffer_names
        }
        self.step_count = 0

    @property
    def parameters(self) -> List[np.ndarray]:
        """The parameter arrays this optimizer updates (the model's own, not copies)."""
        return list(self._params)

    @abstractmethod
    def step(self) -> None:
        """Update every parameter from its gradient."""

    def zero_grad(self) -> None:
        """Set every gradient to zero."""
        for g in self._flat_grads:
            g.fill(0)

    @property
    def state_bytes(self) -> int:
        """Bytes of the optimizer's state buffers (momentum, moments)."""
        return sum(b.nbytes for bufs in self._buffers.values() for b in bufs)

    @property
    @abstractmethod
    def hyperparameters(self) -> Dict[str, Any]:
        """The optimizer's hyper-parameters, by name."""

    def state_dict(self) -> Dict[str, Any]:
        """A copy of the state: type, hyper-parameters, step count and buffers."""
        return {
            "type": type(self).__name__,
            "hyperparameters": dict(self.hyperparameters),
            "step": self.step_count,
            "buffers": {name: [b.reshape(p.shape).copy() for b, p in zip(bufs, self._params)]
                        for name, bufs in self._buffers.items()},
        }

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """Raise ValueError if ``state`` does not fit this optimizer; changes nothing."""
        if not isinstance(state, dict):
            raise TypeError(f"an optimizer state must be a dict, got {type(state).__name__}")
        if state.get("type") != type(self).__name__:
            raise ValueError(f"the state is of a {state.get('type')} optimizer, "
                             f"not {type(self).__name__}")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0 \
                or step > np.iinfo(np.int64).max:
            raise ValueError(f"the step count must be an integer in [0, 2**63), got {step!r}")
        buffers = state.get("buffers")
        if not isinstance(buffers, dict) or set(buffers) != set(self._buffer_names):
            names = sorted(buffers) if isinstance(buffers, dict) else buffers
            raise ValueError(f"{type(self).__name__} state needs buffers "
                             f"{sorted(self._buffer_names)}, got {names}")
        for name in self._buffer_names:
            values = list(buffers[name])
            if len(values) != len(self._params):
                raise ValueError(f"{name}: {len(values)} buffers for {len(self._params)} "
                                 f"parameters")
            for i, (value, p) in enumerate(zip(values, self._params)):
                value = np.asarray(value)
                if value.shape != p.shape:
                    raise ValueError(f"{name} buffer {i} has shape {value.shape}, "
                                     f"expected {p.shape}")
                if not np.issubdtype(value.dtype, np.floating):
                    raise ValueError(f"{name} buffer {i} must hold floats, got {value.dtype}")
        self._check_hyperparameters(state.get("hyperparameters", {}))

    def _check_hyperparameters(self, hyper: Any) -> None:
        if not isinstance(hyper, dict):
            raise ValueError(f"hyper-parameters must be a dict, got {type(hyper).__name__}")
        try:
            validated = type(self)._validated(**hyper)
        except TypeError as exc:
            raise ValueError(f"bad {type(self).__name__} hyper-parameters: {exc}") from None
        self._check_for_dtype(validated)

    def _check_for_dtype(self, hyper: Dict[str, Any]) -> None:
        """ValueError for a hyper-parameter that the kernels' dtype would round to nonsense.

        The kernels compute in the parameters' dtype: a value must stay finite there, a positive
        value must not round to zero (eps = 1e-50 is 0 in float32), and a factor below 1 (a beta,
        the momentum) must not round to 1.
        """
        dtype = min((p.dtype for p in self._params), key=lambda d: d.itemsize)
        for name, value in _scalar_hyperparameters(hyper):
            with np.errstate(over="ignore"):
                cast = dtype.type(value)
            if not np.isfinite(cast):
                raise ValueError(f"{name} = {value} overflows the parameters' {dtype}")
            if value > 0 and cast == 0:
                raise ValueError(f"{name} = {value} rounds to 0 in the parameters' {dtype}")
            if name in _BELOW_ONE and cast >= 1:
                raise ValueError(f"{name} = {value} rounds to 1 in the parameters' {dtype}; "
                                 f"it must stay below 1")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Copy a state from ``state_dict()`` into this optimizer (validated first)."""
        self.check_state_dict(state)
        for name in self._buffer_names:
            for target, value in zip(self._buffers[name], state["buffers"][name]):
                np.copyto(target, np.asarray(value).reshape(-1), casting="same_kind")
        self._set_hyperparameters(type(self)._validated(**state.get("hyperparameters", {})))
        self.step_count = int(state["step"])

    def _set_hyperparameters(self, hyper: Dict[str, Any]) -> None:
        for key, value in hyper.items():
            setattr(self, key, value)

    @staticmethod
    @abstractmethod
    def _validated(**hyper: Any) -> Dict[str, Any]:
        """The hyper-parameters, checked (ValueError/TypeError naming the bad one)."""

    # Pickling: the parameter and gradient arrays are found again from the model, which is
    # pickled in their place. Arrays referenced twice are not shared after every kind of
    # pickling (joblib writes each occurrence of an array apart), but objects are.
    _TRANSIENT = ("_params", "_grads", "_flat_params", "_flat_grads")

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items()
                if key not in self._TRANSIENT}

    def __setstate__(self, state: dict) -> None:
        """Restore an optimizer on the model it was pickled with.

        Pickled together with its model (in one pickle, joblib file or deepcopy), it updates
        the copied model's own arrays, so the pair keeps training as before; pickled alone, it
        brings a copy of the model along.
        """
        self.__dict__.update(state)
        params, grads = collect_parameters(self._model)
        for name, buffers in self._buffers.items():
            shapes = [p.size for p in params]
            if [b.size for b in buffers] != shapes:
                raise ValueError(f"{type(self).__name__}: the model's parameters (sizes "
                                 f"{shapes}) no longer match the pickled {name} buffers")
        self._params, self._grads = params, grads
        self._flat_params = [p.reshape(-1) for p in params]
        self._flat_grads = [g.reshape(-1) for g in grads]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        return f"{type(self).__name__}({args}, parameters={len(self._params)})"


class SGD(Optimizer):
    """Stochastic gradient descent as PyTorch's ``torch.optim.SGD`` (dampening 0).

    d = g + weight_decay * p; with momentum, buf = momentum * buf + d (buf = d on the first
    step) and d = d + momentum * buf for Nesterov, else d = buf; then p -= lr * d.
    """

    def __init__(self, model: Any, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        hyper = self._validated(lr=lr, momentum=momentum, nesterov=nesterov,
                                weight_decay=weight_decay)
        self._set_hyperparameters(hyper)
        self._buffer_names = ("momentum_buffer",) if self.momentum else ()
        super().__init__(model)
        self._momentum_buffers = (self._buffers["momentum_buffer"] if self.momentum
                                  else [None] * len(self._flat_params))

    @staticmethod
    def _validated(lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                   weight_decay: float = 0.0) -> Dict[str, Any]:
        hyper = {
            "lr": _number(lr, "lr", 0.0),
            "momentum": _number(momentum, "momentum", 0.0, 1.0, open_high=True),
            "nesterov": nesterov,
            "weight_decay": _number(weight_decay, "weight_decay", 0.0),
        }
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
        hyper["nesterov"] = bool(nesterov)
        if hyper["nesterov"] and hyper["momentum"] == 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        return hyper

    @property
    def hyperparameters(self) -> Dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def step(self) -> None:
        for p, g, buf in zip(self._flat_params, self._flat_grads, self._momentum_buffers):
            _core.sgd_momentum_step(p, g, buf, self.lr, self.momentum, self.weight_decay,
                                    self.nesterov)
        self.step_count += 1


class Adam(Optimizer):
    """Adam as PyTorch's ``torch.optim.Adam``: bias-corrected moments, L2 weight decay.

    d = g + weight_decay * p; m = b1 m + (1 - b1) d; v = b2 v + (1 - b2) d^2;
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    """

    _buffer_names = ("exp_avg", "exp_avg_sq")
    _decoupled = False

    def __init__(self, model: Any, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self._set_hyperparameters(self._validated(lr=lr, betas=betas, eps=eps,
                                                  weight_decay=weight_decay))
        super().__init__(model)

    @staticmethod
    def _validated(lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0) -> Dict[str, Any]:
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        return {
            "lr": _number(lr, "lr", 0.0),
            "betas": (_number(beta1, "beta1", 0.0, 1.0, open_high=True),
                      _number(beta2, "beta2", 0.0, 1.0, open_high=True)),
            "eps": _number(eps, "eps", 0.0, open_low=True),
            "weight_decay": _number(weight_decay, "weight_decay", 0.0),
        }

    @property
    def hyperparameters(self) -> Dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay}

    def step(self) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        for p, g, m, v in zip(self._flat_params, self._flat_grads, self._buffers["exp_avg"],
                              self._buffers["exp_avg_sq"]):
            _core.adam_step(p, g, m, v, self.lr, beta1, beta2, self.eps, self.weight_decay,
                            self._decoupled, self.step_count)


class AdamW(Adam):
    """AdamW as PyTorch's ``torch.optim.AdamW``: Adam with decoupled weight decay.

    ``p *= 1 - lr * weight_decay`` before the Adam update, which sees the raw gradient.
    The default weight decay is PyTorch's, 0.01.
    """

    _decoupled = True

    def __init__(self, model: Any, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @staticmethod
    def _validated(lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.01) -> Dict[str, Any]:
        hyper = Adam._validated(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if hyper["lr"] * hyper["weight_decay"] > 1:
            # The decay factor 1 - lr * weight_decay would be negative: parameters flip sign.
            raise ValueError(f"lr * weight_decay must be at most 1 for AdamW, got "
                             f"{hyper['lr']} * {hyper['weight_decay']}")
        return hyper


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
