"""Schedule policies: what decides which activations a SegmentCheckpointer keeps.

A policy is a value -- a segment length k, a fixed plan from :func:`ckpt.plan.plan`, or a byte
budget that is planned for each batch size -- plus the compiled schedules it has made, kept per
batch size (least recently used out). The checkpointer asks it for the compiled schedule of a
step; it never looks inside.
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np

from ckpt.costs import ChainCosts
from ckpt.schedule import KEEP_AUTO, CompiledSchedule, compile_schedule, uniform_ops
from ckpt.units import format_size, parse_size


def check_interval(checkpoint_every: object) -> int:
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, numbers.Integral):
        raise TypeError(f"checkpoint_every must be a non-negative integer, "
                        f"got {type(checkpoint_every).__name__} {checkpoint_every!r}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0 keeps only the input), "
                         f"got {checkpoint_every}")
    return int(checkpoint_every)


def check_budget(budget_bytes: object) -> int:
    """A positive byte count from an int or a size string ("4MiB")."""
    try:
        budget = parse_size(budget_bytes) if isinstance(budget_bytes, str) else budget_bytes
    except ValueError as exc:
        raise ValueError(f"budget_bytes: {exc}") from None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget <= 0:
        raise ValueError(f"budget_bytes must be a positive integer, got {budget_bytes!r}")
    return int(budget)


class SchedulePolicy:
    """One of: uniform segments of ``checkpoint_every`` elements (None: floor(sqrt(N))), a
    fixed ``plan``, or a ``budget`` in bytes planned per batch size and slice count. At most one
    is given; the checks happen here, before anything changes."""

    CACHED_SCHEDULES = 8   # batch sizes whose compiled schedules are kept (least recent out)

    def __init__(self, checkpoint_every: Optional[int] = None, plan=None,
                 budget_bytes: Optional[int] = None) -> None:
        given = [name for name, value in (("checkpoint_every", checkpoint_every), ("plan", plan),
                                          ("budget_bytes", budget_bytes)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of checkpoint_every, plan and budget_bytes, "
                             f"got {' and '.join(given)}")
        self.interval = None if checkpoint_every is None else check_interval(checkpoint_every)
        self.plan = plan
        self.budget = None if budget_bytes is None else check_budget(budget_bytes)
        self._cache: "OrderedDict" = OrderedDict()

    def checkpoint_every(self, n_elements: int) -> Optional[int]:
        """The segment length k (None when a plan or a budget decides)."""
        if self.plan is not None or self.budget is not None:
            return None
        if self.interval is not None:
            return self.interval
        return max(1, math.isqrt(n_elements))

    def invalidate(self) -> None:
        """Forget the compiled schedules (the chain changed)."""
        self._cache.clear()

    def compiled(self, costs: ChainCosts, batch_size: int, slices: int, dtype: Optional[np.dtype],
                 compiled_path: bool, workspace: Callable[[], int]) -> CompiledSchedule:
        """The compiled schedule of a step: cached per (batch size, slices) for a budget (whose
        plan depends on both; ``workspace()`` gives the bytes outside the plan's peak), once for
        the others. Only the compiled executor keeps internals; a layer's own backward
        rebuilds them."""
        key = (batch_size, slices) if self.budget is not None else None
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        if self.plan is not None:
            ops, keep = self.plan.ops, getattr(self.plan, "keep_internals", False)
        elif self.budget is not None:
            chosen = self._plan_for_budget(costs, batch_size, dtype, workspace())
            ops, keep = chosen.ops, getattr(chosen, "keep_internals", False)
        else:
            # Recomputed segments (and plain backprop's outputs) keep their internals, so their
            # backward does not rebuild them a second time; checkpoints do not.
            ops, keep = uniform_ops(costs.n, self.checkpoint_every(costs.n)), KEEP_AUTO
        schedule = compile_schedule(ops, costs, keep if compiled_path else False)
        self._cache[key] = schedule
        if len(self._cache) > self.CACHED_SCHEDULES:
            self._cache.popitem(last=False)
        return schedule

    def _plan_for_budget(self, costs: ChainCosts, batch_size: int, dtype, workspace: int):
        """The least-recomputation plan whose activations and gradient buffers fit the budget."""
        from ckpt.plan import plan as make_plan
        if dtype is None:
            raise ValueError("budget_bytes needs layers that describe their costs and a dtype "
                             "(ckpt's own layers do)")
        try:
            return make_plan(costs, batch_size, max(0, self.budget - workspace), dtype=dtype)
        except ValueError as exc:
            raise ValueError(f"budget {format_size(self.budget)} at batch {batch_size}, less "
                             f"{format_size(workspace)} of gradient buffers: {exc}") from None

    def describe(self, n_elements: int) -> str:
        if self.plan is not None:
            return "plan"
        if self.budget is not None:
            return f"budget_bytes={self.budget}"
        return f"checkpoint_every={self.checkpoint_every(n_elements)}"

    def __getstate__(self) -> dict:
        # The compiled schedules are rebuilt after pickle, copy or deepcopy.
        return {"interval": self.interval, "plan": self.plan, "budget": self.budget}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache = OrderedDict()
