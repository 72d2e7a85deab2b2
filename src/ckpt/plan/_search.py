"""Choosing the schedule for a budget: plain backprop, the closed form, the exact search, or
(``method="auto"`` on long chains) bounded searches compared with uniform schedules."""
from __future__ import annotations

from collections.abc import Sequence

from ckpt.plan._chain import _Chain, kept_positions
from ckpt.plan._equal import _EqualChain, _equal_best_slots
from ckpt.plan._ops import _OpTable
from ckpt.plan._recursion import _recursion
from ckpt.schedule import KEEP_AUTO, replay

METHODS = ("auto", "optimal", "persistent")


def _check_method(method: object) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


# Work limits, in evaluations of Z or C: the compiled recursion does a few million a second.
_EXACT_MAX_LAYERS = 60      # longer chains skip the exact search
_EXACT_LIMIT = 2_000_000
# With internals the states of Z and C have the keep choices too (up to 3x and 6x as many): the
# exact search gets this many times the limit, so that it still proves the chains it proved
# (a 35-element residual MLP needs about 10M evaluations, about half a second).
_EXACT_LIMIT_INTERNALS = 6
_BOUNDED_SLIDES_MAX_LAYERS = 60  # longer chains skip the bounded search with slides
# Bounded searches after that: (method, memory unit as a fraction of the smallest activation,
# checkpoint candidates, window, work limit); see _bounded.
_BOUNDED_SEARCHES = (("optimal", 4, 16, 2, 1_000_000),   # <= _BOUNDED_SLIDES_MAX_LAYERS only
                     ("persistent", 1, 8, 1, 600_000), ("persistent", 4, 16, 2, 1_500_000),
                     ("persistent", 1, 16, 4, 1_200_000))
_MAX_SLOTS = 4096           # the rounded budget never has more slots than this
_BUDGET_NUDGES = (0, 1, 2, 3, 5, 8)


def _schedule_for(c: _Chain, budget: int, method: str) -> tuple:
    """(ops, keep_internals, proven_optimal) of the plan for a budget (at least the smallest
    feasible one): plain backprop when it fits, else the closed form for truly equal elements,
    else the method's search."""
    if budget >= c.plain_peak:
        return list(c.plain_trace.ops), True, True
    m = budget // c.scale
    if c.closed_form:
        slots = min(m // c.units[0], c.n + 1)
        eq = _EqualChain(c.n, slots)
        return eq.ops(_equal_best_slots(eq, slots)), False, True
    if method == "auto":
        return _auto(c, m)
    ops, kept = _recursion(c, method).schedule(m)
    return ops, tuple(kept) or False, method == "optimal"


def _minimal_ops(n: int) -> list:
    """The schedule of the smallest feasible budget: before each backward i, free a_(i+1),
    sweep from a_0 to a_i (freeing as it goes) and forward i again. Its peak is
    ChainCosts.min_units()."""
    table, out = _OpTable(n), []
    for i in reversed(range(n)):
        if i < n - 1:
            out.append(table.free[i + 1])
        table.sweep(out, 0, i, keep=True)
        out += [table.forward[i], table.backward[i]]
    return out


def _bounded(c: _Chain, m: int, method: str, fineness: int, count: int, window: int,
             limit: int) -> list:
    """Traces of a bounded search within m units.

    - Memory: sizes and scratch are rounded UP to multiples of a unit q (the smallest
      activation / ``fineness``, and at least m / _MAX_SLOTS), so that a schedule fitting the
      rounded budget fits m. The rounding is pessimistic, so a few larger rounded budgets are
      tried too, each schedule measured exactly by replay and kept only if it fits m.
    - Choices: on a chain longer than 3 x ``count``, a segment longer than twice ``window``
      stores or slides to an activation only within ``window`` of its start or at one of
      ``count`` evenly spaced candidates (shorter segments choose freely).
    - Work: at most ``limit`` evaluations; what was found before the limit stays valid.
    """
    q = max(1, min(c.units) // fineness, -(-m // _MAX_SLOTS))

    def up(xs: Sequence[int]) -> list:
        return [-(-x // q) for x in xs]

    flags = None
    if c.n > 3 * count:
        flags = [0] * (c.n + 1)
        for j in range(count):
            flags[1 + (c.n - 1) * j // count] = 1
        flags[0] = flags[c.n] = 1
    rec = _recursion(c, method, limit=limit, units=up(c.units), fwd=up(c.costs.forward_scratch),
                     bwd=up(c.costs.backward_scratch(True)),
                     tapes=up([e.tape for e in c.costs.elements]), allowed=flags, window=window)
    found, seen = [], set()
    for nudge in _BUDGET_NUDGES:
        try:
            value = rec.value(m // q + nudge)
            schedule = rec.schedule(m // q + nudge) if value is not None else None
        except RuntimeError:  # the work limit
            break
        if schedule is None or value in seen:
            continue
        seen.add(value)
        ops, kept = schedule
        trace = replay(ops, c.costs, tuple(kept) or False)
        if trace.peak_units <= m:
            found.append(trace)
    return found


def _as_if_equal(c: _Chain, m: int) -> list:
    """Traces of the equal-chain closed form (Revolve's binomial schedules) with every element
    counted as the largest activation plus the largest scratch, so that it fits m; a few more
    slots are tried too, each schedule measured exactly by replay (with and without the
    internals that ``keep_internals="auto"`` keeps) and kept only if it fits m. Cheap, and it
    stays feasible at tight budgets where the bounded searches may find nothing."""
    n, width = c.n, max(c.units)
    scratch = max(max(c.costs.forward_scratch), max(c.costs.backward_scratch(False)))
    low = 2 if n == 1 else 3
    base = max(low, (m - scratch) // width)
    top = min(base + 4, n + 1)
    if base > top:
        return []
    eq, found = _EqualChain(n, top), []
    policies = (False, KEEP_AUTO) if c.costs.has_internals else (False,)
    for slots in range(base, top + 1):
        ops = eq.ops(slots)
        for keep in policies:
            trace = replay(ops, c.costs, keep)
            if trace.peak_units <= m:
                found.append(trace)
    return found


def _auto(c: _Chain, m: int) -> tuple:
    """(ops, keep_internals, proven_optimal) for ``method="auto"``, m units below the plain peak.

    Chains of up to _EXACT_MAX_LAYERS elements get the exact search, bounded in work; when it
    finishes the plan is proven optimal. Otherwise the bounded searches run, and the result is
    the cheapest of their schedules, every uniform-k schedule that fits (with and without the
    internals the checkpointer keeps), the equal-chain schedules that fit (_as_if_equal) and the
    minimal schedule, all measured by replay.
    """
    if c.n <= _EXACT_MAX_LAYERS:
        try:
            limit = _EXACT_LIMIT * (_EXACT_LIMIT_INTERNALS if c.costs.has_internals else 1)
            ops, kept = _recursion(c, "optimal", limit=limit).schedule(m)
            return ops, tuple(kept) or False, True
        except RuntimeError:
            pass
    flops = c.costs.forward_flops
    candidates = _as_if_equal(c, m)
    uniform = c.best_uniform(m)
    if uniform is not None:
        candidates.append(uniform)
    for method, fineness, count, window, limit in _BOUNDED_SEARCHES:
        if method == "optimal" and c.n > _BOUNDED_SLIDES_MAX_LAYERS:
            continue
        candidates += _bounded(c, m, method, fineness, count, window, limit)
    # The minimal schedule (O(N^2) operations) is replayed only when nothing else fits: its
    # FLOPs are sum_i F(0, i + 1) and every internal, its peak min_units() (the tests check
    # both by replay).
    minimal = (sum(sum(flops[:i + 1]) for i in range(c.n))
               + sum(e.internal_flops for e in c.costs.elements), c.costs.min_units())
    best = min(candidates, key=c.cost_of, default=None)
    if best is None or c.cost_of(best) > minimal:
        return _minimal_ops(c.n), False, False
    return list(best.ops), kept_positions(best), False
