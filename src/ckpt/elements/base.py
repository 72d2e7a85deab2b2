"""The Layer protocol, the Step that keys a training step's randomness, and the registry of
element kinds.

A layer keeps no copy of its activations: ``backward`` takes the input again, so whoever stores
activations (a checkpointer, or plain backprop) decides what is held, and can really free it.
Every layer describes its costs once (``describe``, see :mod:`ckpt.costs`).

Stochastic layers (Dropout) draw their masks from a counter-based generator keyed by a
:class:`Step`: a per-step seed, the layer's stream id in its chain, and the global row index.
The first forward, every recomputation and the backward of one step share the Step, so they
see the same mask, and nothing is stored.

Each kind of element is one module of this package and one :class:`ElementKind` record in the
registry (``ckpt.elements`` registers the built-in ones); every list of kinds -- the executor's,
the save/load registry, the NumPy twins -- is read from it. The registry lives here, below the
kinds, so that a block (Residual) can rebuild its body without importing the other kinds.
"""
from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from ckpt import _core
from ckpt.costs import ElementCost, _Undescribable
from ckpt.elements._checks import _FLOAT_DTYPES, _check_learning_rate, _assign_into, _copy_into


_step_tokens = itertools.count(1)


@dataclass(frozen=True)
class Step:
    """What the forward, the recomputations and the backward of one training step share.

    ``seed`` keys the step's Dropout masks; ``row0`` is the global index of the batch's first
    row (a slice of a larger batch, on another thread or MPI rank, passes its offset, so masks
    do not depend on how a batch is split); ``streams`` maps each Dropout layer (by id) to its
    stream, its rank among the chain's Dropout layers. ``token`` is unique to each Step made:
    a layer with per-step state (BatchNorm's batch statistics) tells a recomputation of the
    step it holds from a new step by it.
    """

    seed: int
    row0: int = 0
    streams: Dict[int, int] = field(default_factory=dict)
    token: int = field(default_factory=lambda: next(_step_tokens), compare=False)

    def stream(self, layer: "Layer") -> int:
        return self.streams.get(id(layer), 0)


def walk(layers: Sequence["Layer"]) -> Iterator["Layer"]:
    """Every layer of a chain, depth first, blocks before their insides."""
    for layer in layers:
        yield layer
        yield from walk(layer.children())


def dropout_streams(layers: Sequence["Layer"]) -> Dict[int, int]:
    """Stream ids of a chain's stochastic layers (``uses_stream``, Dropout): their rank in
    depth-first order."""
    drops = [layer for layer in walk(layers) if layer.uses_stream]
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
    # Whether the layer draws randomness keyed by its stream in the Step (Dropout).
    uses_stream = False

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

    def config(self) -> dict:
        """The layer's kind and hyper-parameters (JSON-ready), for saving its architecture;
        only registered kinds (ckpt.elements) have one."""
        raise TypeError(f"{self.layer_type} is not one of ckpt's built-in layers "
                        f"({', '.join(kind_names())}): its architecture cannot be recorded")

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


# ---------------------------------------------------------------------------------------------
# The registry of element kinds
# ---------------------------------------------------------------------------------------------

class RowContext:
    """What an executor record needs to turn one layer into a row of the compiled table: the
    chain's flat parameter and gradient lists (a row names its first parameter by index) and
    the stream ids of its stochastic layers."""

    def __init__(self, streams: Dict[int, int]) -> None:
        self.streams = streams
        self.params: List[np.ndarray] = []
        self.grads: List[np.ndarray] = []

    def add_parameters(self, layer: "Layer") -> int:
        """Append the layer's parameters and gradients; the index of its first parameter."""
        first = len(self.params)
        self.params.extend(layer.params())
        self.grads.extend(layer.gradients())
        return first

    def stream(self, layer: "Layer") -> int:
        return self.streams[id(layer)]


@dataclass(frozen=True)
class ExecutorRecord:
    """How a kind runs in the compiled executor: its name in ``_core.ELEMENT_KINDS`` (its
    kernels' .pxi registers it) and ``row(layer, cost, ctx)``, the layer's columns of the
    element table by name (ELEMENT_COLUMNS / ELEMENT_REALS; those not given are 0)."""

    code: str
    row: Callable[["Layer", ElementCost, RowContext], Dict[str, Any]]

    @property
    def kind_code(self) -> int:
        return _core.ELEMENT_KINDS[self.code]


@dataclass(frozen=True)
class Twin:
    """A kind's plain-NumPy twin, the oracle the tests hold the kernels to:
    ``forward(layer, x, step) -> y`` and ``backward(layer, x, grad_output, step) ->
    (grad_input, [gradient of each of layer.params()])``."""

    forward: Callable
    backward: Callable


@dataclass(frozen=True)
class ElementKind:
    """One kind of chain element: its ``name`` (the "kind" of its saved config), its Layer
    class, ``from_config(args, build)`` (a new layer from its config without "kind"; ``build``
    rebuilds nested configs), its NumPy twin, its compiled executor record (None: it runs on
    the Python path, through its Layer methods), and ``example(dtype, rng)``, a small instance
    the registry's tests exercise."""

    name: str
    layer: type
    from_config: Callable[[Dict[str, Any], Callable[[object, str], "Layer"]], "Layer"]
    twin: Twin
    example: Callable[[np.dtype, np.random.Generator], "Layer"]
    executor: Optional[ExecutorRecord] = None


_KINDS: Dict[str, ElementKind] = {}
_BY_CLASS: Dict[type, ElementKind] = {}


def register(kind: ElementKind) -> ElementKind:
    """Add a kind to the registry (its name and class must be new)."""
    if not isinstance(kind, ElementKind):
        raise TypeError(f"register() takes an ElementKind, got {type(kind).__name__}")
    if kind.name in _KINDS or kind.layer in _BY_CLASS:
        raise ValueError(f"an element kind named {kind.name!r} or of class "
                         f"{kind.layer.__name__} is already registered")
    if kind.executor is not None and kind.executor.code not in _core.ELEMENT_KINDS:
        raise ValueError(f"{kind.name}: the compiled executor has no kind "
                         f"{kind.executor.code!r} (it has {', '.join(_core.ELEMENT_KINDS)})")
    _KINDS[kind.name] = kind
    _BY_CLASS[kind.layer] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind (for tests that register one of their own)."""
    kind = _KINDS.pop(name)
    del _BY_CLASS[kind.layer]


def kinds() -> List[ElementKind]:
    """Every registered kind, in registration order."""
    return list(_KINDS.values())


def get_kind(name: str) -> ElementKind:
    """The registered kind of that name (KeyError naming the kinds otherwise)."""
    if name not in _KINDS:
        raise KeyError(f"no element kind {name!r}; the kinds are {', '.join(_KINDS)}")
    return _KINDS[name]


def kind_names() -> List[str]:
    return list(_KINDS)


def kind_of(layer: object) -> Optional[ElementKind]:
    """The kind of a layer, by its exact class (a subclass may change the maths), or None."""
    return _BY_CLASS.get(type(layer))


def layer_config(layer: "Layer") -> dict:
    """A built-in layer's kind and hyper-parameters (JSON-ready); TypeError for other layers."""
    if kind_of(layer) is None:
        raise TypeError(f"{layer.layer_type} is not one of ckpt's built-in layers "
                        f"({', '.join(_KINDS)}): its architecture cannot be recorded")
    return layer.config()


def layer_from_config(config: object, where: str = "layer") -> "Layer":
    """A new built-in layer from ``layer_config``'s dict (fresh parameters); ValueError naming
    ``where`` for anything malformed."""
    if not isinstance(config, dict) or config.get("kind") not in _KINDS:
        kind = config.get("kind") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{where}: unknown layer kind {kind!r} (expected one of "
                         f"{', '.join(_KINDS)})")
    args = {key: value for key, value in config.items() if key != "kind"}
    try:
        return _KINDS[config["kind"]].from_config(dict(args), layer_from_config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot rebuild {config['kind']} from {args}: {exc}") from None
