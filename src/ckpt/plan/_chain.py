"""The planner's inputs: a chain's element costs with the batch size and dtype, validated once.

A chain arrives as a :class:`~ckpt.costs.ChainCosts`, N+1 widths or N layers; :func:`_chain`
turns it, the batch size and the dtype into a :class:`_Chain`, which every search reads.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from numbers import Integral

import numpy as np

from ckpt.costs import ChainCosts, describe_chain
from ckpt.schedule import FORWARD, KEEP_AUTO, Trace, replay, uniform_ops
from ckpt.units import format_size


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _chain_costs(chain: object) -> ChainCosts:
    """The chain's element descriptions from a ChainCosts, N+1 widths (a Dense chain) or N
    layers (their ``describe`` when every layer has one and can describe itself, else Dense
    layers of their in_features / out_features)."""
    if isinstance(chain, ChainCosts):
        return chain
    if isinstance(chain, (str, bytes)) or not isinstance(chain, Iterable):
        raise TypeError("chain must be a ChainCosts, a list of N+1 widths or of N layers, got "
                        f"{type(chain).__name__}")
    items = list(chain)
    if not items:
        raise ValueError("chain is empty: give N+1 >= 2 widths or N >= 1 layers")
    if _is_int(items[0]):
        if len(items) < 2:
            raise ValueError(f"a chain of widths needs N+1 >= 2 entries (N >= 1), got {items}")
        for i, x in enumerate(items):
            if not _is_int(x):
                raise TypeError(f"chain item {i} is a {type(x).__name__}: widths must be ints")
            if x <= 0:
                raise ValueError(f"width {i} must be positive, got {x}")
        return ChainCosts.from_widths([int(x) for x in items])
    for i, layer in enumerate(items):
        if _is_int(layer) or not (hasattr(layer, "describe") or (
                hasattr(layer, "in_features") and hasattr(layer, "out_features"))):
            raise TypeError(
                f"chain item {i} is a {type(layer).__name__}: expected ints (widths) or layers "
                "(with describe(), or integer in_features and out_features), not a mix")
    if all(callable(getattr(layer, "describe", None)) for layer in items):
        described = describe_chain(items)
        if described is not None:
            return described
    widths: list = []
    for i, layer in enumerate(items):
        sizes = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
        for name, x in zip(("in_features", "out_features"), sizes):
            if not _is_int(x):
                raise TypeError(f"layer {i}: {name} must be an int, got {x!r}")
            if x <= 0:
                raise ValueError(f"layer {i}: {name} must be positive, got {x}")
        if i and sizes[0] != widths[-1]:
            raise ValueError(
                f"layers {i - 1} and {i} do not connect: layer {i - 1} has out_features="
                f"{widths[-1]}, layer {i} has in_features={sizes[0]}")
        if not i:
            widths.append(int(sizes[0]))
        widths.append(int(sizes[1]))
    return ChainCosts.from_widths(widths)


def _check_batch(batch_size: object) -> int:
    if not _is_int(batch_size):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return int(batch_size)


def _check_budget(budget_bytes: object) -> int:
    if not _is_int(budget_bytes):
        raise TypeError(f"budget_bytes must be an int number of bytes, got {budget_bytes!r} "
                        "(parse_size turns '4MiB' into bytes)")
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    return int(budget_bytes)


def _check_dtype(dtype: object) -> np.dtype:
    if dtype is None:  # np.dtype(None) would silently mean float64
        raise TypeError("dtype must be float32 or float64, got None")
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt.name}")
    return dt


@dataclass(frozen=True)
class _Chain:
    """A chain's costs with the batch size and dtype that turn them into bytes and FLOPs.

    Memory is counted in *units* (elements per batch row, as in :mod:`ckpt.costs`); bytes are
    units x batch x itemsize, so a budget in bytes is ``budget // scale`` units exactly.
    """

    costs: ChainCosts
    batch_size: int
    dtype: np.dtype

    @property
    def n(self) -> int:
        return self.costs.n

    @property
    def widths(self) -> tuple[int, ...]:
        return self.costs.widths

    @property
    def scale(self) -> int:
        """Bytes per unit."""
        return self.batch_size * self.dtype.itemsize

    @property
    def units(self) -> tuple[int, ...]:
        """Units held per activation a_0 .. a_N (internals not kept)."""
        return self.costs.stored

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(u * self.scale for u in self.units)

    @property
    def flops(self) -> tuple[int, ...]:
        """Forward FLOPs of each element for the whole batch."""
        return tuple(self.batch_size * f for f in self.costs.forward_flops)

    @property
    def min_budget(self) -> int:
        return self.costs.min_units() * self.scale

    @cached_property
    def plain_trace(self) -> Trace:
        """Plain backprop: every activation and every internal kept, nothing recomputed."""
        return replay(uniform_ops(self.n, 1), self.costs, keep_internals=True)

    @property
    def plain_peak(self) -> int:
        return self.plain_trace.peak_units * self.scale

    @cached_property
    def lean_peak_units(self) -> int:
        """Peak of plain backprop that recomputes internals in each backward instead: no
        schedule without kept internals needs more."""
        return replay(uniform_ops(self.n, 1), self.costs, keep_internals=False).peak_units

    @property
    def closed_form(self) -> bool:
        """Whether the equal-chain closed form applies: every element costs the same, with no
        scratch and no internals."""
        c = self.costs
        return c.uniform and not any(c.forward_scratch) and not any(c.backward_scratch(False))

    @cached_property
    def uniform_peaks(self) -> tuple:
        """Peak units of the uniform-k schedules without internals, k = 1 .. N (k = 0 is
        k = N), by :func:`_uniform_peak` (the tests check it against replay)."""
        return tuple(_uniform_peak(self.costs, k) for k in range(1, self.n + 1))

    def cost_of(self, trace: Trace) -> tuple:
        """What the searches minimise, per row: forward FLOPs plus the internal FLOPs of the
        backwards that rebuild (see :func:`internal_flops`); then the peak."""
        forwards = sum(k * f for k, f in zip(trace.forward_counts, self.costs.forward_flops))
        return forwards + internal_flops(self.costs, trace), trace.peak_units

    @cached_property
    def uniform_kept_traces(self) -> tuple:
        """The uniform-k schedules (k = 1 .. N) with ``keep_internals="auto"``, as the
        checkpointer runs them, replayed: () when no element has internals (then they are the
        schedules without)."""
        if not self.costs.has_internals:
            return ()
        return tuple(replay(uniform_ops(self.n, k), self.costs, KEEP_AUTO)
                     for k in range(1, self.n + 1))

    def best_uniform(self, m: int) -> Trace | None:
        """The cheapest uniform-k schedule within m units (least peak among equals), with or
        without the internals that the checkpointer keeps, measured by replay; None when none
        fits."""
        flops = self.costs.forward_flops
        internal = sum(e.internal_flops for e in self.costs.elements)
        n, fitting = self.n, []
        for k, peak in zip(range(1, n + 1), self.uniform_peaks):
            if peak <= m:
                rerun = sum(flops[i] for s in range(0, n, k) for i in range(s, min(s + k, n) - 1))
                fitting.append((rerun + internal, peak, k))
        for _, _, k in sorted(fitting):  # replay decides; the first one fits unless a bug
            trace = replay(uniform_ops(n, k), self.costs)
            if trace.peak_units <= m:
                break
        else:
            trace = None
        kept = [t for t in self.uniform_kept_traces if t.peak_units <= m]
        candidates = kept + ([trace] if trace is not None else [])
        return min(candidates, key=self.cost_of, default=None)


def internal_flops(costs: ChainCosts, trace: Trace) -> int:
    """Internal FLOPs per row that a schedule's backwards recompute: every element's, but those
    whose tape was kept (all of them when every forward keeps)."""
    if trace.keep_internals is True:
        return 0
    rebuilt = set(trace.rebuilt)
    return sum(e.internal_flops for i, e in enumerate(costs.elements)
               if not e.tape or i in rebuilt)


def kept_positions(trace: Trace) -> tuple | bool:
    """The plan's ``keep_internals`` for a replayed schedule: True when every forward keeps,
    else the positions of the forwards that keep a tape (False when none does)."""
    if trace.keep_internals is True:
        return True
    kept = tuple(q for q, event in enumerate(trace.events) if event[0] == FORWARD and event[4])
    return kept or False


def _uniform_peak(costs: ChainCosts, k: int) -> int:
    """The peak units of ``uniform_ops(n, k)`` without internals, in O(N) (replay of N
    schedules would be O(N^2) Python steps): the forward phase keeps a_0, a_k, a_2k, ...; each
    segment, last first, is recomputed keeping all of it, then back-propagated."""
    s, fs, bs = costs.stored, costs.forward_scratch, costs.backward_scratch(False)
    n = costs.n
    if k <= 0 or k > n:
        k = n
    peak, kept = 0, s[0]  # kept: a_0 and the checkpoints so far
    for i in range(n):
        if i and i % k == 0:
            kept += s[i]
        current = kept + (s[i] if i % k else 0) + s[i + 1]
        peak = max(peak, current + fs[i])
    for start in reversed(range(0, n, k)):
        end = min(start + k, n)
        base = kept + s[end]
        held = base
        for i in range(start, end - 1):   # recompute, keeping every output
            held += s[i + 1]
            peak = max(peak, held + fs[i])
        for i in reversed(range(start, end)):
            peak = max(peak, held + bs[i])
            held -= s[i + 1]                  # backward i frees a_(i+1)
        kept -= s[start] if start else 0
    return peak


def _chain(chain: object, batch_size: object, dtype: object) -> _Chain:
    return _Chain(_chain_costs(chain), _check_batch(batch_size), _check_dtype(dtype))


def _check_feasible(c: _Chain, budget: int) -> None:
    low = c.min_budget
    if budget < low:
        raise ValueError(
            f"budget {budget} B ({format_size(budget)}) is below the smallest feasible budget "
            f"{low} B ({format_size(low)}) for this chain: the forward and the backward of "
            "element i need a_0, a_i, a_(i+1) and their scratch held at once")
