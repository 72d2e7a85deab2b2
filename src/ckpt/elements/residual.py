"""The Residual kind: a block y = x + f(x) over a body of other elements.

Its Layer class, its cost, its config, its NumPy twin and its executor record; its executor
functions are in ``_residual.pxi``. It holds the body through the Layer base and rebuilds it
through the registry, never importing the other kinds.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ckpt.costs import ElementCost, _Undescribable, infer_input_width
from ckpt.elements._checks import _as_generator, _check_in_width, _float_batch
from ckpt.elements.base import (ElementKind, ExecutorRecord, Layer, RowContext, Step, Twin,
                                get_kind, kind_of, layer_config, new_step, walk)


def residual_layout(body: Sequence[ElementCost]) -> Tuple[int, int]:
    """(inner width, ping-pong buffers) of a Residual body: how the executor lays it out."""
    return max(c.out_width for c in body), min(len(body) - 1, 2)


def residual_tapes_last(body: Sequence[ElementCost]) -> bool:
    """Whether a Residual keeps (or rebuilds) its last body element's output: only when that
    element's backward reads it, or it has internals of its own. Otherwise the output goes
    straight into the block's y = x + f(x) and no backward rebuilds it."""
    return body[-1].reads_output or body[-1].tape > 0


def residual_cost(body: Sequence[ElementCost]) -> ElementCost:
    """A Residual block y = x + f(x) over f's descriptions. Its tape is every body output and
    the bodies' own tapes, in order (the last body output only if residual_tapes_last); forward
    scratch is the ping-pong buffers (its last body output goes straight to y) and the body's
    own; backward scratch is the larger of the recompute's forward scratch and the ping-pong
    gradient buffers plus the body's backward scratch (the tape itself comes on top when it was
    not kept)."""
    inner, pingpong = residual_layout(body)
    n = body[0].in_width
    fwd = max(c.forward_scratch for c in body)
    bwd = max(c.backward_scratch for c in body)
    taped = body if residual_tapes_last(body) else body[:-1]
    return ElementCost(
        "residual", n, n, stored=n,
        tape=sum(c.out_width + c.tape for c in taped),
        forward_scratch=pingpong * inner + fwd,
        backward_scratch=max(fwd, pingpong * inner + bwd),
        forward_flops=sum(c.forward_flops for c in body) + n,
        backward_flops=sum(c.backward_flops for c in body) + n,
        internal_flops=sum(c.forward_flops for c in taped),
        parameter_count=sum(c.parameter_count for c in body),
        step_state=sum(c.step_state for c in body),
        params=tuple(p for c in body for p in c.params),
        gradients=tuple(g for c in body for g in c.gradients))


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


# ---------------------------------------------------------------------------------------------
# The NumPy twin: the body's own twins, composed
# ---------------------------------------------------------------------------------------------

def residual_forward(x, layers):
    """y = x + f(x), f = the layers' forwards in order (each a callable)."""
    h = x
    for layer in layers:
        h = layer(h)
    return x + h


def _twin_forward(block: Residual, x, step):
    return residual_forward(x, [lambda h, layer=layer: kind_of(layer).twin.forward(layer, h, step)
                                for layer in block.layers])


def _twin_backward(block: Residual, x, g, step):
    inside = [x]
    for layer in block.layers:
        inside.append(kind_of(layer).twin.forward(layer, inside[-1], step))
    grads: List[list] = []
    grad = g
    for j in reversed(range(len(block.layers))):
        grad, own = kind_of(block.layers[j]).twin.backward(block.layers[j], inside[j], grad, step)
        grads.insert(0, own)
    return grad + g, [a for own in grads for a in own]


def _row(layer: Residual, cost: ElementCost, ctx: RowContext) -> dict:
    return {}   # its body's rows and layout are placed by ckpt.executor (blocks are nested)


def _from_config(args: dict, build) -> Residual:
    inner = args.pop("layers", None)
    if not isinstance(inner, list) or args:
        raise ValueError("a Residual needs exactly a list 'layers'")
    return Residual(*[build(c, f"layers[{i}]") for i, c in enumerate(inner)], seed=0)


def _example(dtype, rng) -> Residual:
    dense, norm = get_kind("Dense").layer, get_kind("LayerNorm").layer
    return Residual(norm(5, dtype=dtype), dense(5, 6, "relu", dtype=dtype, rng=rng),
                    dense(6, 5, dtype=dtype, rng=rng))


KIND = ElementKind("Residual", Residual, _from_config, Twin(_twin_forward, _twin_backward),
                   example=_example, executor=ExecutorRecord("residual", _row))
