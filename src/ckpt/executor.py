"""Build the compiled executor (``ckpt._core.Chain``) of a chain of ckpt's own layers.

The chain becomes a table of elements, one row per element: the chain's elements first, then
the bodies of blocks (Residual), each body a contiguous range after its block. Each kind's
executor record (ckpt.elements) gives its row's columns by name; the layout columns -- widths,
tapes, scratch -- come from the layers' descriptions (ckpt.costs), and ``_core.Chain`` checks
them against what its loops need. Parameters and gradients become two flat lists that updates
iterate. A chain holding any layer whose kind has no executor record has no compiled form
(None): it runs through the layers' Python methods instead.
"""
from __future__ import annotations

from collections import deque
from typing import Dict, List, Optional, Sequence

import numpy as np

from ckpt import _core
from ckpt.costs import ChainCosts, ElementCost
from ckpt.elements import Layer, RowContext, dropout_streams, kind_of, walk


def compilable(layers: Sequence[Layer]) -> bool:
    """Whether every layer, blocks' insides included, is of a kind the executor runs."""
    return bool(layers) and all(_record(layer) is not None for layer in walk(layers))


def _record(layer: Layer):
    kind = kind_of(layer)
    return None if kind is None else kind.executor


def build_chain(layers: Sequence[Layer], costs: ChainCosts) -> Optional[_core.Chain]:
    """The compiled chain of these layers (described by ``costs``), or None."""
    if not compilable(layers):
        return None
    dtypes = {np.dtype(p.dtype) for layer in layers for p in layer.params()}
    if len(dtypes) > 1:
        raise TypeError(f"the chain mixes parameter dtypes {sorted(d.name for d in dtypes)}")
    ctx = RowContext(dropout_streams(layers))
    rows: List[Dict[str, float]] = []
    # Rows are emitted breadth first: a block's body is placed after every row before it.
    pending = deque()
    for layer, cost in zip(layers, costs.elements):
        rows.append(_row(layer, cost, ctx))
        if layer.children():
            pending.append((len(rows) - 1, layer, cost))
    while pending:
        index, block, cost = pending.popleft()
        body, inner, _ = block.layout(cost.in_width)
        rows[index].update(body=len(rows), body_len=len(body), inner_width=inner)
        for layer, inner_cost in zip(block.children(), body):
            rows.append(_row(layer, inner_cost, ctx))
            if layer.children():
                pending.append((len(rows) - 1, layer, inner_cost))
    ints = np.array([[row.get(name, 0) for name in _core.ELEMENT_COLUMNS] for row in rows],
                    np.int64).reshape(-1, len(_core.ELEMENT_COLUMNS))
    reals = np.array([[row.get(name, 0.0) for name in _core.ELEMENT_REALS] for row in rows],
                     np.float64).reshape(-1, len(_core.ELEMENT_REALS))
    return _core.Chain(ints, reals, len(costs.elements), ctx.params, ctx.grads)


def _row(layer: Layer, cost: ElementCost, ctx: RowContext) -> Dict[str, float]:
    """The layer's row by column name: the layout from its description, the rest its kind's."""
    record = _record(layer)
    row = {"kind": record.kind_code, "n_in": cost.in_width, "n_out": cost.out_width,
           "tape": cost.tape, "forward_scratch": cost.forward_scratch,
           "backward_scratch": cost.backward_scratch, "reads_output": int(cost.reads_output),
           "param": -1}
    own = record.row(layer, cost, ctx)
    unknown = set(own) - set(_core.ELEMENT_COLUMNS) - set(_core.ELEMENT_REALS)
    if unknown:
        raise ValueError(f"{layer.layer_type}'s executor record gives unknown columns "
                         f"{sorted(unknown)}")
    row.update(own)
    return row
