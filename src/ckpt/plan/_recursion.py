"""The recursion Z / C of :mod:`ckpt.plan` at run time: the compiled ``ckpt._planner``.

It counts in int64; a chain whose costs could overflow that is refused with a ValueError
before any search starts (there is no slower fallback: ``ckpt.plan._oracle`` is the tests'
reference only).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ckpt import _planner
from ckpt.plan._chain import _Chain

_INT64_SAFE = 2**62  # every count the recursion meets stays below this


def _inputs(c: _Chain, method: str, keep: bool = True, units: Sequence[int] | None = None,
            fwd: Sequence[int] | None = None, bwd: Sequence[int] | None = None,
            tapes: Sequence[int] | None = None) -> tuple:
    """(sizes, flops, forward scratch, backward scratch, tapes, internal flops, slides) of the
    recursion for a chain, in units and FLOPs per row, or the given (e.g. quantised) ``units`` /
    ``fwd`` / ``bwd`` (backward scratch beside a kept tape) / ``tapes``.

    With ``keep`` each forward may keep its element's tape beside its output (costing its size
    until the backward, saving the rebuild); without, every backward rebuilds (the tape counts
    as backward scratch) and costs are forward FLOPs alone. Raises ValueError when a count could
    overflow the compiled recursion's int64: any schedule Z considers runs each of its N sweeps
    over at most the whole chain and rebuilds each tape at most once."""
    costs = c.costs
    units = list(costs.stored if units is None else units)
    fwd = list(costs.forward_scratch if fwd is None else fwd)
    bwd = list(costs.backward_scratch(True) if bwd is None else bwd)
    tapes = list((e.tape for e in costs.elements) if tapes is None else tapes)
    internal = [e.internal_flops for e in costs.elements]
    if not keep:
        bwd = [b + t for b, t in zip(bwd, tapes)]
        tapes, internal = [0] * c.n, [0] * c.n
    flops = list(costs.forward_flops)
    worst_flops = c.n * (c.n + 1) * max(flops) + sum(internal)
    worst_units = 4 * (sum(units) + sum(tapes) + max(fwd) + max(bwd))
    if worst_flops >= _INT64_SAFE or worst_units >= _INT64_SAFE:
        raise ValueError(
            f"this {c.n}-element chain is too large to plan: its worst-case recomputation "
            f"({worst_flops} FLOPs per row) or memory ({worst_units} elements per row) "
            f"would overflow the planner's 64-bit counts (limit {_INT64_SAFE})")
    return units, flops, fwd, bwd, tapes, internal, method == "optimal"


def _recursion(c: _Chain, method: str, *, keep: bool = True, limit: int = -1,
               units: Sequence[int] | None = None, fwd: Sequence[int] | None = None,
               bwd: Sequence[int] | None = None, tapes: Sequence[int] | None = None,
               allowed: Sequence[int] | None = None, window: int = 0) -> _planner.Recursion:
    """The compiled recursion for a chain (see :func:`_inputs`); ``method`` "optimal" allows
    slides, "persistent" does not. ``limit``, ``allowed`` and ``window`` bound the search
    (:class:`ckpt._planner.Recursion`)."""
    units, flops, fwd, bwd, tapes, internal, slides = _inputs(c, method, keep, units, fwd, bwd,
                                                              tapes)
    return _planner.Recursion(
        *(np.array(x, np.int64) for x in (units, flops, fwd, bwd, tapes, internal)), slides,
        limit, None if allowed is None else np.array(allowed, np.int8), window)
