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


def _inputs(c: _Chain, method: str, units: Sequence[int] | None = None,
            fwd: Sequence[int] | None = None, bwd: Sequence[int] | None = None) -> tuple:
    """(sizes, flops, forward scratch, backward scratch, slides) of the recursion for a chain, in
    units and FLOPs per row, or the given (e.g. quantised) ``units`` / ``fwd`` / ``bwd``. Raises
    ValueError when a count could overflow the compiled recursion's int64: any schedule Z
    considers runs each of its N sweeps over at most the whole chain."""
    costs = c.costs
    units = list(costs.stored if units is None else units)
    fwd = list(costs.forward_scratch if fwd is None else fwd)
    bwd = list(costs.backward_scratch(False) if bwd is None else bwd)
    flops = list(costs.forward_flops)
    worst_flops = c.n * (c.n + 1) * max(flops)
    worst_units = 4 * (sum(units) + max(fwd) + max(bwd))
    if worst_flops >= _INT64_SAFE or worst_units >= _INT64_SAFE:
        raise ValueError(
            f"this {c.n}-element chain is too large to plan: its worst-case recomputation "
            f"({worst_flops} FLOPs per row) or memory ({worst_units} elements per row) "
            f"would overflow the planner's 64-bit counts (limit {_INT64_SAFE})")
    return units, flops, fwd, bwd, method == "optimal"


def _recursion(c: _Chain, method: str, *, limit: int = -1, units: Sequence[int] | None = None,
               fwd: Sequence[int] | None = None, bwd: Sequence[int] | None = None,
               allowed: Sequence[int] | None = None, window: int = 0) -> _planner.Recursion:
    """The compiled recursion for a chain (see :func:`_inputs`); ``method`` "optimal" allows
    slides, "persistent" does not. ``limit``, ``allowed`` and ``window`` bound the search
    (:class:`ckpt._planner.Recursion`)."""
    units, flops, fwd, bwd, slides = _inputs(c, method, units, fwd, bwd)
    return _planner.Recursion(
        np.array(units, np.int64), np.array(flops, np.int64), np.array(fwd, np.int64),
        np.array(bwd, np.int64), slides, limit,
        None if allowed is None else np.array(allowed, np.int8), window)
