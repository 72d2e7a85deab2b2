"""Build the compiled executor (``ckpt._core.Chain``) of a chain of ckpt's own layers.

The chain becomes a table of elements, one row per element: the chain's elements first, then
the bodies of Residual blocks (each body a contiguous range after its block). Widths, tapes and
scratch come from the layers' descriptions (ckpt.costs); ``_core.Chain`` checks them against
what its loops need. Parameters and gradients become two flat lists that updates iterate.
A chain holding any other Layer has no compiled form (None): it runs through the layers' Python
methods instead.
"""
from __future__ import annotations

from collections import deque
from typing import List, Optional, Sequence

import numpy as np

from ckpt import _core
from ckpt.costs import ChainCosts, ElementCost
from ckpt.layers import Dense, Dropout, LayerNorm, Layer, Residual, dropout_streams

_COLUMNS = {name: i for i, name in enumerate(_core.ELEMENT_COLUMNS)}
_REALS = {name: i for i, name in enumerate(_core.ELEMENT_REALS)}
# Element kinds the executor runs, by exact class (a subclass may change the maths).
_KINDS = {Dense: "dense", LayerNorm: "layernorm", Dropout: "dropout", Residual: "residual"}


def compilable(layers: Sequence[Layer]) -> bool:
    """Whether every layer, blocks' insides included, is one the executor runs."""
    from ckpt.layers import walk
    return bool(layers) and all(type(layer) in _KINDS for layer in walk(layers))


def build_chain(layers: Sequence[Layer], costs: ChainCosts) -> Optional[_core.Chain]:
    """The compiled chain of these layers (described by ``costs``), or None."""
    if not compilable(layers):
        return None
    dtypes = {np.dtype(p.dtype) for layer in layers for p in layer.params()}
    if len(dtypes) > 1:
        raise TypeError(f"the chain mixes parameter dtypes {sorted(d.name for d in dtypes)}")
    streams = dropout_streams(layers)
    ints: List[List[int]] = []
    reals: List[List[float]] = []
    params: list = []
    grads: list = []
    # Rows are emitted breadth first: a block's body is placed after every row before it.
    pending = deque()
    for layer, cost in zip(layers, costs.elements):
        ints.append(_row(layer, cost, streams, params, grads, reals))
        if isinstance(layer, Residual):
            pending.append((len(ints) - 1, layer, cost))
    while pending:
        index, block, cost = pending.popleft()
        body, inner, _ = block.layout(cost.in_width)
        ints[index][_COLUMNS["body"]] = len(ints)
        ints[index][_COLUMNS["body_len"]] = len(body)
        ints[index][_COLUMNS["inner_width"]] = inner
        for layer, inner_cost in zip(block.layers, body):
            ints.append(_row(layer, inner_cost, streams, params, grads, reals))
            if isinstance(layer, Residual):
                pending.append((len(ints) - 1, layer, inner_cost))
    return _core.Chain(np.array(ints, np.int64).reshape(-1, len(_COLUMNS)),
                       np.array(reals, np.float64).reshape(-1, len(_REALS)),
                       len(costs.elements), params, grads)


def _row(layer: Layer, cost: ElementCost, streams: dict, params: list, grads: list,
         reals: list) -> List[int]:
    row = [0] * len(_COLUMNS)
    real = [0.0] * len(_REALS)
    row[_COLUMNS["kind"]] = _core.ELEMENT_KINDS[_KINDS[type(layer)]]
    row[_COLUMNS["n_in"]] = cost.in_width
    row[_COLUMNS["n_out"]] = cost.out_width
    row[_COLUMNS["tape"]] = cost.tape
    row[_COLUMNS["forward_scratch"]] = cost.forward_scratch
    row[_COLUMNS["backward_scratch"]] = cost.backward_scratch
    row[_COLUMNS["param"]] = -1
    if isinstance(layer, (Dense, LayerNorm)):
        row[_COLUMNS["param"]] = len(params)
        params.extend(layer.params())
        grads.extend(layer.gradients())
    if isinstance(layer, Dense):
        row[_COLUMNS["act"]] = layer._act_code
        real[_REALS["alpha"]] = layer.negative_slope
    elif isinstance(layer, LayerNorm):
        real[_REALS["eps"]] = layer.eps
    elif isinstance(layer, Dropout):
        real[_REALS["p"]] = layer.p
        row[_COLUMNS["stream"]] = streams[id(layer)]
    reals.append(real)
    return row
