"""The planner's entry points: plan, uniform_plan, tradeoff and simulate."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ckpt.plan._chain import _chain, _check_budget, _check_feasible, _is_int, kept_positions
from ckpt.plan._equal import _EqualChain, _equal_best_slots
from ckpt.plan._plan import Plan, _make_plan
from ckpt.plan._recursion import _recursion
from ckpt.plan._search import _auto, _check_method, _schedule_for
from ckpt.schedule import KEEP_AUTO, KeepInternals, Op, check_keep_internals, replay, uniform_ops
from ckpt.units import format_size


def simulate(ops: Iterable[Op], chain: object, batch_size: int, dtype: object = np.float32, *,
             keep_internals: KeepInternals = False) -> int:
    """Check that ``ops`` is a legal schedule for the chain and return its peak in bytes.

    The rules and the measure are :func:`ckpt.schedule.replay`'s (the one checker): starting
    with only a_0 held, forward i needs a_i held and a_{i+1} not (and backward i not yet done);
    backward i comes in the order N-1 .. 0, needs a_i and a_{i+1} held and frees a_{i+1}; free i
    needs a_i held, i > 0. Every backward must appear. The peak counts the activations held and
    the scratch of the operation running. ``keep_internals`` is :attr:`Plan.keep_internals` or
    any policy of :mod:`ckpt.schedule` (True: each output's internals are held beside it
    instead of being recomputed in its backward; positions: those forwards' are). Raises
    ValueError naming the first illegal operation.
    """
    c = _chain(chain, batch_size, dtype)
    return replay(ops, c.costs, check_keep_internals(keep_internals)).peak_units * c.scale


def plan(chain: object, batch_size: int, budget_bytes: int, dtype: object = np.float32, *,
         method: str = "auto") -> Plan:
    """The schedule with the least recomputation whose peak activation memory fits the budget.

    ``chain`` is a :class:`~ckpt.costs.ChainCosts`, N+1 widths (a Dense chain a_0 .. a_N) or N
    layers (described by their ``describe`` method, or Dense layers of their ``in_features`` /
    ``out_features``). When the budget holds plain backprop (every activation and internal
    kept), that is the plan (``keep_internals=True``). Otherwise each forward may keep its
    element's internals (a Residual block's inner activations) beside its output until its
    backward, which then rebuilds nothing: the plan minimises forward FLOPs plus the internal
    FLOPs rebuilt, and ``keep_internals`` lists the positions in ``ops`` of the forwards that
    keep (False when none does). Elements that all cost the same, without scratch or
    internals, get the exact closed form.

    ``method``:

    - ``"auto"`` (default, interactive): the exact search when the chain is short enough for it
      to finish quickly (then ``proven_optimal``), else bounded searches on memory rounded up
      to a few dozen slots, compared with every uniform schedule that fits; a 200-element
      uneven chain plans in about a second;
    - ``"optimal"``: the exact search, optimal over all legal schedules under the model of the
      :mod:`ckpt.plan` docstring (can take minutes on long uneven chains);
    - ``"persistent"``: optimal among schedules that keep each stored activation until its
      backward (rotor), faster.

    Raises TypeError / ValueError for bad inputs, and ValueError naming the smallest feasible
    budget when the budget is below it.
    """
    c = _chain(chain, batch_size, dtype)
    budget = _check_budget(budget_bytes)
    method = _check_method(method)
    _check_feasible(c, budget)
    return _make_plan(c, budget, *_schedule_for(c, budget, method), method=method)


def uniform_plan(chain: object, batch_size: int, checkpoint_every: int,
                 dtype: object = np.float32, *, keep_internals: bool | str = KEEP_AUTO) -> Plan:
    """The classic k-uniform segment schedule (Chen et al. 2016) as a Plan, to compare at equal
    budget: the first sweep keeps the inputs of elements 0, k, 2k, ...; then each segment, last
    first, is recomputed once from its start and back-propagated. A segment's last element is
    not recomputed (its output is the next segment's start or a_N, both held). k = 1 keeps
    everything, internals included (plain backprop); k = 0 or k >= N keeps only a_0.
    ``keep_internals``: ``"auto"`` (default) keeps the internals that
    ``SegmentCheckpointer(checkpoint_every=k)`` keeps (:mod:`ckpt.schedule`), False none,
    True all. ``budget_bytes`` of the result is its own peak.
    """
    c = _chain(chain, batch_size, dtype)
    if not _is_int(checkpoint_every):
        raise TypeError(f"checkpoint_every must be an int, got {checkpoint_every!r}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if keep_internals is not True and keep_internals is not False \
            and keep_internals != KEEP_AUTO:
        raise ValueError(f"keep_internals must be True, False or {KEEP_AUTO!r}, "
                         f"got {keep_internals!r}")
    ops = uniform_ops(c.n, int(checkpoint_every))
    if checkpoint_every == 1 or c.n == 1:  # the plain schedule
        keep_internals = True
    trace = replay(ops, c.costs, keep_internals)
    return _make_plan(c, trace.peak_units * c.scale, ops, kept_positions(trace), False,
                      f"uniform(k={checkpoint_every})")


def _budget_points(low: int, high: int, points: object) -> list:
    if points is None:
        points = 17
    if _is_int(points):
        if points < 2:
            raise ValueError(f"points must be >= 2 or a list of budgets, got {points}")
        return sorted({low + (high - low) * i // (points - 1) for i in range(points)})
    if isinstance(points, (str, bytes)) or not isinstance(points, Iterable):
        raise TypeError(f"points must be None, an int or a list of budgets, got {points!r}")
    budgets = sorted({_check_budget(b) for b in points})
    if not budgets:
        raise ValueError("points is an empty list of budgets")
    if budgets[0] < low:
        raise ValueError(f"budget {budgets[0]} B ({format_size(budgets[0])}) in points is below "
                         f"the smallest feasible budget {low} B ({format_size(low)})")
    return budgets


def tradeoff(chain: object, batch_size: int, dtype: object = np.float32,
             points: object = None, *, method: str = "auto") -> list:
    """The memory-versus-compute curve: a list of (budget_bytes, recompute_flops, peak_bytes),
    from the smallest feasible budget to the plain-backprop peak, ``peak_bytes`` being the least
    peak among the cheapest plans within the budget (for ``"auto"``: of the plan it returns).
    ``recompute_flops`` is :attr:`Plan.recompute_flops` (internals recomputed included).

    ``points``: None (17 evenly spaced budgets), an int (that many) or a list of budgets.
    """
    c = _chain(chain, batch_size, dtype)
    method = _check_method(method)
    budgets = _budget_points(c.min_budget, c.plain_peak, points)
    batch, row_flops = c.batch_size, c.costs.forward_flops
    plain = sum(row_flops)
    curve = []
    rec = None
    for budget in budgets:
        if budget >= c.plain_peak:
            curve.append((budget, 0, c.plain_peak))
            continue
        m = budget // c.scale
        if c.closed_form:
            eq = _EqualChain(c.n, c.n + 1)
            slots = _equal_best_slots(eq, min(m // c.units[0], c.n + 1))
            cost, peak = eq.cost(slots) * row_flops[0], slots * c.units[0]
        elif method == "auto":
            ops, keep, _ = _auto(c, m)
            cost, peak = c.cost_of(replay(ops, c.costs, keep))
        else:  # the recursion's costs count the internals rebuilt
            rec = rec or _recursion(c, method)
            cost, peak = rec.value(m)
        curve.append((budget, (cost - plain) * batch, peak * c.scale))
    return curve
