"""Optimal checkpointing plans for a chain of elements: least recomputation within a budget.

Model
-----
A chain of N elements has activations a_0 ... a_N: a_i is the input of element i, a_0 the
network input, a_N its output. Every cost comes from the elements' descriptions
(:mod:`ckpt.costs`, one :class:`~ckpt.costs.ElementCost` per element): holding a_i costs
``|a_i| = stored_i * batch * itemsize`` bytes (``stored`` = the width for Dense); element i's
forward needs ``forward_scratch_i`` more while it runs, its backward ``backward_scratch_i`` more
plus its internals (``tape_i``, recomputed inside the backward). Only plain backprop keeps the
internals beside the outputs instead (``Plan.keep_internals``); it is the plan whenever its peak
fits the budget. A schedule is a sequence of operations:

- ``("forward", i)``: needs a_i held and a_{i+1} not held; produces a_{i+1}; costs element i's
  forward FLOPs, ``2 * batch * in * out`` for a Dense layer;
- ``("backward", i)``: needs a_i and a_{i+1} held and the gradient of a_{i+1}; produces the
  gradient of a_i and frees a_{i+1} *implicitly* (the schedule never frees it explicitly);
- ``("free", i)``: releases a_i.

Conventions: only a_0 is held at the start and it stays held to the end (it counts toward the
peak and is never freed); a forward counts a_i and a_{i+1} together (no in-place update); the
backwards run exactly once each, N-1 down to 0; the gradient of a_N exists once a_N has been
computed; gradients, parameters, their gradients and workspace are outside the count (a
constant). The *peak* is the most bytes held at once: activations, plus the scratch of the
operation running. :func:`ckpt.schedule.replay` is the one checker and measure of schedules
(:func:`simulate` wraps it). A budget is feasible iff it is at least
``ChainCosts.min_units() * batch * itemsize``: the forward and backward of element i need a_0,
a_i, a_{i+1} and their scratch (recomputing from a_0 before each backward achieves it).
:func:`plan` returns a schedule with peak <= budget and the least total forward FLOPs.

The recursion
-------------
Fix a moment right after backward p (or the start, p = N). Left of p the held activations form a
stack; only its top, a_y, is ever a source of forwards (a forward from deeper down computes
something needed only once the top is used up, so it can wait). The top either stays held until
its own backward, or is used as a stepping stone: a forward sweep from a_y frees a_y once
a_{y+1} exists and goes on, so the top *slides* right to y2, and a_y is recomputed later from
deeper down. Every activation is freed right after its last use (earlier never costs FLOPs and
never raises the peak). Normalised this way, every schedule is one of this recursion, on exact
memory counts m (in units of one batch row; the argument is a sketch; the tests check it
against exhaustive search, scratch and internals included)::

    Z(y, p, r, e, m)  a_y is the top (held), a_p held iff e, backward p-1 is next; reach
                      position r (backwards p-1 .. r done) with a_r held, nothing of (r, p]
                      held and a_y freed if r > y; never hold more than m bytes of [y, p].
                      Cost = forward FLOPs.

      y = p-1:  r = y required; cost 0 if e (backward y: a_y, a_p and its backward scratch
                must fit m), else f_y (forward y with its forward scratch, then backward y).
      e = 1:    free a_p, then Z(y, p, r, 0, m).
      push:     min over r < r2 < p of  C(y, p, r2, e, m) + Z(y, r2, r, 1, m)
      slide:    min over y < y2 <= r of F(y, y2) + Z(y2, p, r, e, m)   (sweep frees a_y on the way)

    C(y, p, r2, e, m) = min over y < b <= r2 of F(y, b) + Z(b, p, r2, e, m - |a_y|)

C is a *child*: sweep from a_y to a_b keeping a_y, and let the child (which may slide from b to
r2) back-propagate down to r2. F(i, j) = f_i + ... + f_{j-1}. Sweeps are checked against m at
each transient moment: keeping a_y, the forward of a_k holds a_y, a_k, a_{k+1}, its forward
scratch (and a_p if e).
The whole plan is Z(0, N, 0, 0, budget). Ties in FLOPs go to the lower peak, so a generous
budget does not inflate the peak of the plan.

Without slides (b = r2 and y2 never taken) this is the recursion of Revolve / rotor
(Griewank & Walther 2000; Beaumont et al. 2019), extended by the right-end choice e (keep the
output a_p of the segment for the next backward, or free it and recompute it from a_{p-1}):
it is optimal among *persistent* schedules, where a stored activation stays until its backward.
For heterogeneous widths it is not optimal under this model: widths (2, 1, 2, 4, 7, 5) at batch
1 in float32 within 60 bytes need 174 forward FLOPs, every persistent schedule at least 178.
The best one keeps a_1 (cheap to hold while a_4 and a_5 are live), later slides it to a_2 and
recomputes a_1 from a_0 at the end. The tests compare Z against an exhaustive search over all
legal schedules on random small chains (a longer offline run found no difference in 260,000
chain-and-budget pairs of up to 9 layers). ``method="persistent"`` keeps the rotor recursion:
O(N^2) states instead of O(N^3), much faster on long uneven chains.

Equal layers
------------
With N equal layers the slides never help (checked against Z and exhaustive search in the
tests), and the persistent recursion has a binomial closed form. In units of one activation
(m slots) and one layer forward, let A(L, m) be the cost of a segment of L layers with both ends
held, B(L, m) the same with the output end not held (B(N, K) is the whole plan). Both are convex
in L; write c_A(m, r) for the number of unit steps L -> L+1 that cost r more forwards in
L -> A(L, m) (roughly: how many layers run r times), and c_B likewise. Splitting the segment at
its first stored activation is a min-plus convolution of convex sequences, i.e. a merge of
their slopes:

    c_A(m, r) = [r = 1] + c_A(m-1, r) + c_A(m, r-1)     (m >= 4)
    c_B(m, r) = [r = 1] + c_B(m-1, r) + c_A(m, r-1)     (m >= 3, c_B(2, r) = 0)
    c_A(3, r) = [r != 2]  (one free slot: no sweep of two steps fits beside both ends, so
                           segments longer than 2 free their right end and rebuild it)

which solves to c_A(m, r) = C(s+r-1, r) - C(s+r-4, s-2) with s = m - 2 free slots: Revolve's
binomial count C(s+r-1, r) = beta(s, r) - beta(s, r-1) minus a correction for the extra
transient slot a sweep of two or more steps needs. A(L, m) is the sum of the L-1 smallest
slopes, B(L, m) one more than that. (For m >= 4 keeping the right end turns out never to be
worse than freeing it; the tests check the closed form against Z.) The counts for K slots
take O(K * r) to build, r the largest repetition needed, and each split of the schedule is
read off them, so 1,000 equal layers plan in milliseconds.

Exact memory
------------
Memory is never discretised: Z and C are memoised on exact byte values. A result computed for m
with peak P is the answer for every m' in [P, m] (the same schedule fits, and less memory never
makes a plan cheaper), so each state keeps a list of intervals [P, m] instead of one entry per
byte value. The number of intervals is the number of distinct optima a state meets over the
budgets that reach it: a few when the chain has few distinct widths, dozens (growing with N)
when every width differs, which is what makes irregular chains slow.

Cost and timings
----------------
The persistent recursion has O(N^2) states, Z O(N^3), each with O(N) choices, times the number
of distinct optima a state meets (see above). ``python bench/bench_plan.py [--slow]`` prints
these (one core, compiled ``ckpt._planner``, budgets at 5/20/50/80% of the way from the
smallest feasible one to the plain peak; the pure-Python fallback is 100-400x slower):

    1,000 equal layers, 4 to 1,001 slots ................ 0.005-0.06 s (3 slots: 0.7 s, 1M ops)
    1,000 equal layers, tradeoff() at 17 budgets ........ 0.002 s
    tapered MLP 784-2048-1024-512-256-10, persistent .... 50 layers <= 0.003 s, 100 <= 0.05 s,
                                                          200: 0.1-0.9 s
    the same, optimal ................................... 50 layers <= 0.07 s, 100: 0.2-3 s,
                                                          200: 8-100 s
    random widths 256-4096, persistent .................. 50 layers <= 0.14 s, 100: 0.03-16 s,
                                                          200 at 5%: over 10 min
    the same, optimal ................................... 50 layers: 0.01-4 s
    auto (default), 200 tapered or random layers ........ 0.5-1.0 s (noisy shared machine)

The default method
------------------
``method="auto"`` keeps planning interactive. On chains of up to 60 elements it runs the exact
search above with a bound on its work (evaluations of Z and C); when it finishes, the plan is
proven optimal. Otherwise it runs bounded searches:

- memory rounded UP to a unit (the smallest activation, or a quarter of it, and at most 4,096
  slots in the budget), so a schedule that fits the rounded budget fits the real one; a few
  larger rounded budgets are tried too, since the rounding is pessimistic;
- on long chains, a segment longer than twice a small window stores only within the window of
  its start or at a few evenly spaced candidates;
- each with a work limit; every schedule found is measured exactly by replay.

It returns the cheapest of those, of every uniform-k schedule that fits (Chen et al.), of the
equal-chain schedules with every element counted as the largest, and of the minimal-memory
schedule: never worse than the best uniform schedule within the budget, not proven optimal.
The tests check it within 5% of the exact optimum on chains of up to 60 elements with the exact
search switched off.

References
----------
- A. Griewank, "Achieving logarithmic growth of temporal and spatial complexity in reverse
  automatic differentiation", Optimization Methods and Software 1(1), 1992.
- A. Griewank and A. Walther, "Algorithm 799: revolve", ACM TOMS 26(1), 2000.
- O. Beaumont, L. Eyraud-Dubois, J. Herrmann, A. Joly and A. Shilova, "Optimal checkpointing
  for heterogeneous chains: how to train deep neural networks with limited memory",
  arXiv:1911.13214, 2019 (rotor).
- T. Chen, B. Xu, C. Zhang and C. Guestrin, "Training deep nets with sublinear memory cost",
  arXiv:1604.06174, 2016 (uniform segments).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from numbers import Integral

import numpy as np

from ckpt.costs import ChainCosts, describe_chain
from ckpt.schedule import Trace, replay, uniform_ops
from ckpt.units import format_size, parse_size  # noqa: F401  (re-exported: ckpt.plan.parse_size)

try:  # the compiled twin of _Recursion; absent until the package is built
    from ckpt import _planner
except ImportError:
    _planner = None

__all__ = ["Plan", "plan", "uniform_plan", "tradeoff", "simulate", "parse_size", "format_size"]

Op = tuple[str, int]
FORWARD, BACKWARD, FREE = "forward", "backward", "free"
METHODS = ("auto", "optimal", "persistent")
_INF = float("inf")
# The compiled planner works in int64: chains whose worst-case cost could overflow stay in Python.
_INT64_SAFE = 2**62


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


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


def _check_method(method: object) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


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

    def best_uniform(self, m: int) -> Trace | None:
        """The cheapest uniform-k schedule within m units (least peak among equals), measured
        by replay; None when none fits."""
        flops = self.costs.forward_flops
        n, fitting = self.n, []
        for k, peak in zip(range(1, n + 1), self.uniform_peaks):
            if peak <= m:
                rerun = sum(flops[i] for s in range(0, n, k) for i in range(s, min(s + k, n) - 1))
                fitting.append((rerun, peak, k))
        if not fitting:
            return None
        for _, _, k in sorted(fitting):  # replay decides; the first one fits unless a bug
            trace = replay(uniform_ops(n, k), self.costs)
            if trace.peak_units <= m:
                return trace
        return None


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


def _format_flops(x: int) -> str:
    for unit, scale in (("TFLOP", 10**12), ("GFLOP", 10**9), ("MFLOP", 10**6), ("kFLOP", 10**3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x} FLOP"


# ---------------------------------------------------------------------------------------------
# Checking a schedule
# ---------------------------------------------------------------------------------------------


def simulate(ops: Iterable[Op], chain: object, batch_size: int, dtype: object = np.float32, *,
             keep_internals: bool = False) -> int:
    """Check that ``ops`` is a legal schedule for the chain and return its peak in bytes.

    The rules and the measure are :func:`ckpt.schedule.replay`'s (the one checker): starting
    with only a_0 held, forward i needs a_i held and a_{i+1} not (and backward i not yet done);
    backward i comes in the order N-1 .. 0, needs a_i and a_{i+1} held and frees a_{i+1}; free i
    needs a_i held, i > 0. Every backward must appear. The peak counts the activations held and
    the scratch of the operation running (with ``keep_internals``, each output's internals are
    held beside it instead of being recomputed in its backward). Raises ValueError naming the
    first illegal operation.
    """
    c = _chain(chain, batch_size, dtype)
    return replay(ops, c.costs, bool(keep_internals)).peak_units * c.scale


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A checkpointing schedule and what it costs under the model of this module.

    ``ops`` is the full schedule (see the module docstring); ``peak_bytes``, ``forward_counts``
    and ``stored`` are measured by :func:`ckpt.schedule.replay`, not assumed. ``budget_bytes``
    is the budget it was planned for (for a uniform plan, its own peak). ``keep_internals``:
    the schedule keeps the internals of compound elements beside their outputs (plain backprop
    only); otherwise each backward recomputes them. ``recompute_flops`` counts every forward
    FLOP beyond one forward pass: elements forwarded again, plus the internals recomputed in
    backwards. ``proven_optimal``: no schedule within the budget needs fewer FLOPs (an exact
    search finished, the closed form, or plain backprop); False for a bounded search, the
    persistent method and uniform plans. ``costs`` are the element descriptions it was planned
    from.
    """

    widths: tuple[int, ...]
    batch_size: int
    dtype: str
    itemsize: int
    budget_bytes: int
    peak_bytes: int
    recompute_flops: int
    forward_counts: tuple[int, ...]
    stored: tuple[int, ...]
    method: str
    ops: tuple[Op, ...] = field(repr=False)
    keep_internals: bool
    costs: ChainCosts = field(repr=False)
    proven_optimal: bool

    @property
    def n_layers(self) -> int:
        return self.costs.n

    @property
    def activation_bytes(self) -> tuple[int, ...]:
        """Bytes of each activation a_0 .. a_N (outputs only, internals aside)."""
        scale = self.batch_size * self.itemsize
        return tuple(u * scale for u in self.costs.stored)

    @property
    def layer_flops(self) -> tuple[int, ...]:
        """Forward FLOPs of each element for the whole batch."""
        return tuple(self.batch_size * f for f in self.costs.forward_flops)

    @property
    def plain_forward_flops(self) -> int:
        """FLOPs of one forward pass."""
        return sum(self.layer_flops)

    @property
    def total_forward_flops(self) -> int:
        return self.plain_forward_flops + self.recompute_flops

    @property
    def rerun_flops(self) -> int:
        """The part of ``recompute_flops`` spent forwarding elements again."""
        return sum((k - 1) * f for k, f in zip(self.forward_counts, self.layer_flops))

    @property
    def internal_flops(self) -> int:
        """The part of ``recompute_flops`` spent recomputing internals inside backwards (0 when
        they are kept)."""
        return self.recompute_flops - self.rerun_flops

    @property
    def plain_peak_bytes(self) -> int:
        """Peak of plain backprop, which keeps every activation and every internal."""
        trace = replay(uniform_ops(self.n_layers, 1), self.costs, keep_internals=True)
        return trace.peak_units * self.batch_size * self.itemsize

    @property
    def min_budget_bytes(self) -> int:
        return self.costs.min_units() * self.batch_size * self.itemsize

    @property
    def fixed_bytes(self) -> int:
        """What the count leaves out: every parameter and its gradient, plus the two gradient
        buffers of the widest activation (from the element descriptions)."""
        return (2 * self.costs.parameter_count()
                + 2 * self.batch_size * self.costs.gradient_width()) * self.itemsize

    def explain(self) -> str:
        """A readable table: per element its kind and widths, whether its input is stored by the
        first sweep and how many times its forward runs; then peak, budget, extra compute and
        whether the plan is proven optimal."""
        n, w = self.n_layers, self.widths
        stored = set(self.stored)
        kinds = [e.kind for e in self.costs.elements]
        names = sorted(set(kinds))
        what = f"{n} {names[0].capitalize()} layers" if len(names) == 1 else \
            f"{n} elements ({', '.join(f'{kinds.count(k)} {k}' for k in names)})"
        lines = [f"Checkpointing plan ({self.method}): {what}, batch {self.batch_size}, "
                 f"{self.dtype}",
                 f"{'layer':>6} {'kind':>9} {'in':>7} {'out':>7}  {'input stored':>12}  "
                 f"{'forward runs':>12}"]
        for i in range(n):
            lines.append(f"{i:>6} {kinds[i][:9]:>9} {w[i]:>7} {w[i + 1]:>7}  "
                         f"{'yes' if i in stored else '-':>12}  {self.forward_counts[i]:>12}")
        fwd = self.plain_forward_flops
        step = self.costs.step_flops() * self.batch_size
        rows = [("predicted peak", self.peak_bytes), ("budget", self.budget_bytes),
                ("plain backprop peak", self.plain_peak_bytes),
                ("smallest feasible budget", self.min_budget_bytes)]
        lines.append("")
        for name, value in rows:
            lines.append(f"{name:<25} {format_size(value):>11}  ({value} B)")
        lines.append(
            f"{'extra compute':<25} {_format_flops(self.recompute_flops):>11}  = "
            f"{100 * self.recompute_flops / fwd:.1f}% of one forward pass, "
            f"{100 * self.recompute_flops / step:.1f}% of a training step")
        lines.append(
            f"{'':<25} {_format_flops(self.rerun_flops):>11}  forwarding elements again, "
            f"{_format_flops(self.internal_flops)} recomputing internals in backwards"
            + (" (kept)" if self.keep_internals else ""))
        if self.proven_optimal:
            verdict = "yes: no schedule within the budget needs fewer FLOPs"
        elif self.method.startswith("uniform"):
            verdict = "no: a uniform schedule, planned by no search"
        elif self.method == "persistent":
            verdict = ("not proven: optimal among schedules that keep each checkpoint until "
                       "its backward")
        else:
            verdict = ("not proven: the exact search was too long for this chain; a bounded "
                       "search, checked against every uniform schedule that fits")
        lines.append(f"{'proven optimal':<25} {verdict}")
        lines.append(
            "Not counted: parameters, their gradients, the gradient buffers and BLAS workspace "
            f"(a constant, about {format_size(self.fixed_bytes)} for the parameters, their "
            "gradients and two gradient buffers).")
        return "\n".join(lines)

    def __repr__(self) -> str:
        shown = self.stored if len(self.stored) <= 12 else self.stored[:12] + ("...",)
        share = 100 * self.recompute_flops / self.plain_forward_flops
        return (f"Plan(layers={self.n_layers}, batch_size={self.batch_size}, dtype={self.dtype}, "
                f"method={self.method!r}, budget={format_size(self.budget_bytes)}, "
                f"peak={format_size(self.peak_bytes)}, "
                f"plain_peak={format_size(self.plain_peak_bytes)}, "
                f"recompute_flops={self.recompute_flops} (+{share:.1f}% of a forward), "
                f"stored={shown}, keep_internals={self.keep_internals}, "
                f"proven_optimal={self.proven_optimal})")


def _make_plan(c: _Chain, budget: int, ops: Sequence[Op], keep_internals: bool, proven: bool,
               method: str) -> Plan:
    trace = replay(ops, c.costs, keep_internals)
    flops = c.flops
    recompute = sum((k - 1) * f for k, f in zip(trace.forward_counts, flops))
    if not keep_internals:
        recompute += c.batch_size * sum(e.internal_flops for e in c.costs.elements)
    return Plan(widths=c.widths, batch_size=c.batch_size, dtype=c.dtype.name,
                itemsize=c.dtype.itemsize, budget_bytes=budget,
                peak_bytes=trace.peak_units * c.scale, recompute_flops=recompute,
                forward_counts=trace.forward_counts, stored=trace.stored_by_first_sweep,
                method=method, ops=tuple(trace.ops), keep_internals=keep_internals,
                costs=c.costs, proven_optimal=proven)


class _OpTable:
    """Shared (kind, i) tuples, so a long schedule holds references, not new tuples."""

    def __init__(self, n: int) -> None:
        self.forward = [(FORWARD, i) for i in range(n)]
        self.backward = [(BACKWARD, i) for i in range(n)]
        self.free = [(FREE, i) for i in range(n + 1)]

    def sweep(self, out: list, x: int, j: int, keep: bool) -> None:
        """Forwards from a_x to a_j, freeing each intermediate (and a_x unless keep)."""
        for k in range(x, j):
            out.append(self.forward[k])
            if k > x or not keep:
                out.append(self.free[k])


# ---------------------------------------------------------------------------------------------
# The general recursion Z (pure Python; ckpt._planner.Recursion is the compiled twin)
# ---------------------------------------------------------------------------------------------

_TERMINAL, _FREE_END = 0, -1  # Z decisions; a push to r2 is r2 >= 1, a slide to y2 is -y2 <= -2


class _SearchStopped(RuntimeError):
    """The work limit of a bounded search was reached: its results are void."""


class _Recursion:
    """Z and C of the module docstring for one chain, memoised across budgets: per activation
    its size, per element its forward FLOPs, forward scratch and backward scratch.

    ``slides=False`` restricts to persistent schedules (the rotor recursion). ``limit`` >= 0
    bounds the work: after that many evaluations of Z or C the search stops (``finished`` turns
    False; value() and ops() raise _SearchStopped). ``allowed`` (a flag per activation) restricts
    what a segment longer than ``window`` elements may store or slide to.
    """

    def __init__(self, sizes: Sequence[int], flops: Sequence[int], fwd: Sequence[int],
                 bwd: Sequence[int], slides: bool, limit: int = -1,
                 allowed: Sequence[int] | None = None, window: int = 0) -> None:
        n = self.n = len(sizes) - 1
        if len(flops) != n or len(fwd) != n or len(bwd) != n:
            raise ValueError(f"need N+1 sizes and N flops and scratches, got {len(sizes)}, "
                             f"{len(flops)}, {len(fwd)} and {len(bwd)}")
        w = list(sizes)
        pre = [0]
        for x in flops:
            pre.append(pre[-1] + x)
        restricted = allowed is not None
        if restricted and len(allowed) != n + 1:
            raise ValueError(f"need N+1 = {n + 1} flags in allowed, got {len(allowed)}")
        flags = [bool(a) for a in allowed] if restricted else [True] * (n + 1)
        self.calls, self.finished = 0, True
        # keep[x][j]: peak of the sweep a_x -> a_j holding a_x throughout; drop[x][j]: the same
        # sweep freeing a_x (and every intermediate) as soon as the next activation exists. The
        # forward of a_k holds a_k, a_(k+1) and its scratch (and a_x when kept).
        keep, drop = [], []
        for x in range(n):
            k_row, d_row = [0] * (n + 1), [0] * (n + 1)
            a = b = w[x] + w[x + 1] + fwd[x]
            k_row[x + 1], d_row[x + 1] = a, b
            for j in range(x + 2, n + 1):
                pair = w[j - 1] + w[j] + fwd[j - 1]
                a, b = max(a, w[x] + pair), max(b, pair)
                k_row[j], d_row[j] = a, b
            keep.append(k_row)
            drop.append(d_row)
        none = (_INF, _INF, None)
        memo_z: dict = {}
        memo_c: dict = {}
        dead_z: dict = {}
        dead_c: dict = {}

        def recall(memo: dict, dead: dict, key: tuple, m: int):
            if m <= dead.get(key, -1):
                return none
            for lo, hi, cost, peak, dec in memo.get(key, ()):
                if lo <= m <= hi:
                    return cost, peak, dec
            return None

        def remember(memo: dict, dead: dict, key: tuple, m: int, res: tuple) -> None:
            cost, peak, dec = res
            if cost == _INF:
                if dead.get(key, -1) < m:
                    dead[key] = m
                return
            entries = memo.setdefault(key, [])
            for entry in entries:
                if entry[2] == cost and entry[3] == peak:  # same optimum: it holds up to m too
                    entry[1] = max(entry[1], m)
                    return
            entries.append([peak, m, cost, peak, dec])

        def over() -> bool:
            """Count one evaluation; True when the search must stop."""
            if not self.finished:
                return True
            self.calls += 1
            if 0 <= limit < self.calls:
                self.finished = False
            return not self.finished

        def z(y: int, p: int, r: int, e: int, m: int) -> tuple:
            own = w[y] + w[p] if e else w[y]
            if over() or own > m:
                return none
            key = (y, p, r, e)
            hit = recall(memo_z, dead_z, key, m)
            if hit is not None:
                return hit
            if y == p - 1:
                if r != y:
                    res = none
                elif e:  # backward y
                    peak = own + bwd[y]
                    res = (0, peak, _TERMINAL) if peak <= m else none
                else:    # forward y, then backward y
                    peak = max(drop[y][p], own + w[p] + bwd[y])
                    res = (pre[p] - pre[y], peak, _TERMINAL) if peak <= m else none
            else:
                free_choice = not restricted or p - y <= 2 * window
                best, best_peak, best_dec = _INF, _INF, None
                if e:
                    cost, peak, _ = z(y, p, r, 0, m)
                    if cost < _INF:
                        best, best_peak, best_dec = cost, max(peak, own), _FREE_END
                # The child computes every activation of (y, p) at least once (a_p too if not
                # held), the rest every one of (y, r2): a lower bound growing with r2.
                floor = (pre[p - 1] if e else pre[p]) - 2 * pre[y]
                for r2 in range(r + 1, p):
                    if floor + pre[r2 - 1] > best:
                        break
                    if not (free_choice or flags[r2] or r2 - y <= window):
                        continue
                    c1, p1, _ = child(y, p, r2, e, m)
                    if c1 == _INF or c1 > best:
                        continue
                    c2, p2, _ = z(y, r2, r, 1, m)
                    cost, peak = c1 + c2, max(p1, p2)
                    if cost < best or (cost == best and peak < best_peak):
                        best, best_peak, best_dec = cost, peak, r2
                if slides and y > 0:
                    row, extra = drop[y], (w[p] if e else 0)
                    for y2 in range(y + 1, min(r, p - 1) + 1):
                        sweep = row[y2] + extra
                        if sweep > m:
                            break
                        if not (free_choice or flags[y2] or y2 - y <= window):
                            continue
                        c2, p2, _ = z(y2, p, r, e, m)
                        cost, peak = pre[y2] - pre[y] + c2, max(sweep, p2)
                        if cost < best or (cost == best and peak < best_peak):
                            best, best_peak, best_dec = cost, peak, -y2
                res = (best, best_peak, best_dec)
            if self.finished:
                remember(memo_z, dead_z, key, m, res)
            return res

        def child(y: int, p: int, r2: int, e: int, m: int) -> tuple:
            if over():
                return none
            key = (y, p, r2, e)
            hit = recall(memo_c, dead_c, key, m) if slides else None  # as the compiled twin
            if hit is not None:
                return hit
            row, extra, wy = keep[y], (w[p] if e else 0), w[y]
            best, best_peak, best_b = _INF, _INF, None
            free_choice = not restricted or p - y <= 2 * window
            for b in range(y + 1 if slides else r2, r2 + 1):
                sweep = row[b] + extra
                if sweep > m:
                    break
                if b < r2 and not (free_choice or flags[b] or b - y <= window):
                    continue
                c2, p2, _ = z(b, p, r2, e, m - wy)
                cost, peak = pre[b] - pre[y] + c2, max(sweep, p2 + wy)
                if cost < best or (cost == best and peak < best_peak):
                    best, best_peak, best_b = cost, peak, b
            res = (best, best_peak, best_b)
            if slides and self.finished:
                remember(memo_c, dead_c, key, m, res)
            return res

        self._z, self._child, self._w = z, child, w

    def _deep(self):
        """Room for the recursion: depth grows by one per index step, a few frames each."""
        return _RecursionLimit(10 * self.n + 1000)

    def value(self, budget: int) -> tuple[int, int] | None:
        """(total forward FLOPs, peak) of the best schedule within budget, or None. Raises
        _SearchStopped when the work limit stops the search."""
        with self._deep():
            cost, peak, _ = self._z(0, self.n, 0, 0, budget)
        if not self.finished:
            raise _SearchStopped(f"stopped after {self.calls} evaluations")
        return None if cost == _INF else (cost, peak)

    def ops(self, budget: int) -> list:
        """The schedule behind value(budget), which must not be None."""
        self.value(budget)
        table, z, child, w = _OpTable(self.n), self._z, self._child, self._w
        out: list = []
        stack: list = [(1, 0, self.n, 0, 0, budget)]  # (1, Z state) or (2, C state), last first
        with self._deep():
            while stack:
                kind, y, p, r, e, m = stack.pop()
                if kind == 2:
                    b = child(y, p, r, e, m)[2]
                    table.sweep(out, y, b, keep=True)
                    stack.append((1, b, p, r, e, m - w[y]))
                    continue
                dec = z(y, p, r, e, m)[2]
                if dec == _TERMINAL:
                    if not e:
                        out.append(table.forward[y])
                    out.append(table.backward[y])
                elif dec == _FREE_END:
                    out.append(table.free[p])
                    stack.append((1, y, p, r, 0, m))
                elif dec > 0:
                    stack.append((1, y, dec, r, 1, m))
                    stack.append((2, y, p, dec, e, m))
                else:
                    table.sweep(out, y, -dec, keep=False)
                    stack.append((1, -dec, p, r, e, m))
        return out


class _RecursionLimit:
    def __init__(self, limit: int) -> None:
        self.limit, self.saved = limit, sys.getrecursionlimit()

    def __enter__(self) -> None:
        if self.limit > self.saved:
            sys.setrecursionlimit(self.limit)

    def __exit__(self, *exc: object) -> None:
        sys.setrecursionlimit(self.saved)


def _fits_int64(c: _Chain, units: Sequence[int] | None = None, fwd: Sequence[int] | None = None,
                bwd: Sequence[int] | None = None) -> bool:
    """Whether the compiled recursion's int64 holds every cost and memory count it can meet:
    any schedule Z considers runs each of its N sweeps over at most the whole chain."""
    costs = c.costs
    units = costs.stored if units is None else units
    fwd = costs.forward_scratch if fwd is None else fwd
    bwd = costs.backward_scratch(False) if bwd is None else bwd
    return (c.n * (c.n + 1) * max(costs.forward_flops) < _INT64_SAFE
            and 4 * (sum(units) + max(fwd) + max(bwd)) < _INT64_SAFE)


def _recursion(c: _Chain, method: str, compiled: bool | None = None, *, limit: int = -1,
               units: Sequence[int] | None = None, fwd: Sequence[int] | None = None,
               bwd: Sequence[int] | None = None, allowed: Sequence[int] | None = None,
               window: int = 0):
    """The recursion for a chain in units (or the given, e.g. quantised, ``units`` / ``fwd`` /
    ``bwd``) and FLOPs per row: the compiled Recursion when built and the numbers fit in int64,
    else the Python one. ``compiled`` forces a choice (tests compare the two)."""
    costs = c.costs
    units = list(costs.stored if units is None else units)
    fwd = list(costs.forward_scratch if fwd is None else fwd)
    bwd = list(costs.backward_scratch(False) if bwd is None else bwd)
    flops = list(costs.forward_flops)
    fits = _fits_int64(c, units, fwd, bwd)
    if compiled is None:
        compiled = _planner is not None and fits
    slides = method == "optimal"
    if compiled:
        if _planner is None or not fits:
            raise RuntimeError("ckpt._planner is not built or the chain overflows int64")
        return _planner.Recursion(
            np.array(units, np.int64), np.array(flops, np.int64), np.array(fwd, np.int64),
            np.array(bwd, np.int64), slides, limit,
            None if allowed is None else np.array(allowed, np.int8), window)
    return _Recursion(units, flops, fwd, bwd, slides, limit, allowed, window)


# ---------------------------------------------------------------------------------------------
# Equal layers: the binomial closed form (module docstring)
# ---------------------------------------------------------------------------------------------


class _EqualChain:
    """Optimal costs and schedules for n equal layers with up to ``slots`` activations held.

    ``ca[m][r]`` / ``cb[m][r]``: how many steps of slope r (a layer run r times) the convex cost
    L -> A(L, m) / B(L, m) has; each list stops once it covers n - 1 steps.
    """

    def __init__(self, n: int, slots: int) -> None:
        self.n = n
        top = max(2, min(slots, n + 1))
        need = n - 1
        self.ca: list = [[0], [0], [0]]
        self.cb: list = [[0], [0], [0]]
        # Counts only grow with m, so list m never reads past the end of list m - 1.
        for m in range(3, top + 1):
            ca, total = [0], 0
            while total < need:
                r = len(ca)
                ca.append(int(r != 2) if m == 3 else (r == 1) + self.ca[m - 1][r] + ca[r - 1])
                total += ca[-1]
            cb, total = [0], 0
            while total < need:
                r = len(cb)
                cb.append((r == 1) + (self.cb[m - 1][r] if m > 3 else 0) + ca[r - 1])
                total += cb[-1]
            self.ca.append(ca)
            self.cb.append(cb)

    def cost(self, m: int) -> int:
        """B(n, m): layer forwards of the best plan with m slots (n >= 2 needs m >= 3)."""
        left, total, r = self.n - 1, 1, 0
        while left > 0:
            r += 1
            take = min(left, self.cb[m][r])
            total += r * take
            left -= take
        return total

    @staticmethod
    def _split(length: int, g: list, k: list) -> int:
        """Optimal first stored offset d of the min-plus convolution of g(d) = d + A(d, m)
        (slope counts of A shifted up by one) and a convex k: the L-2 smallest merged slopes,
        d - 1 of them from g."""
        left, from_g, r = length - 2, 0, 0
        while left > 0:
            r += 1
            take = min(left, k[r])
            left -= take
            take = min(left, g[r - 1])
            left -= take
            from_g += take
        return 1 + from_g

    def ops(self, m: int) -> list:
        """Schedule of B(n, m): the top segment, a_n not yet computed (m <= n + 1)."""
        table, ca, cb = _OpTable(self.n), self.ca, self.cb
        out: list = []
        stack: list = [("B", 0, self.n, m)]  # segments still to do, last first
        while stack:
            kind, s, t, mm = stack.pop()
            length = t - s
            if length == 1:
                if kind == "B":
                    out.append(table.forward[s])
                out.append(table.backward[s])
            elif kind == "A" and mm == 3:
                if length == 2:  # a_{s+1} fits beside a_s and a_t
                    out += [table.forward[s], table.backward[s + 1], table.backward[s]]
                else:  # no room to keep a_t while recomputing: free it, rebuild it at the end
                    out.append(table.free[t])
                    stack.append(("B", s, t, 3))
            else:
                if kind == "A":
                    d = self._split(length, ca[mm], ca[mm - 1])
                elif mm == 3:
                    d = length - 1
                else:
                    d = self._split(length, ca[mm], cb[mm - 1])
                table.sweep(out, s, s + d, keep=True)
                stack.append(("A", s, s + d, mm))
                stack.append((kind, s + d, t, mm - 1))
        return out


def _equal_best_slots(eq: _EqualChain, slots: int) -> int:
    """Fewest slots with the same cost as ``slots`` (<= n + 1): the least peak for that cost."""
    best = eq.cost(slots)
    low = 2 if eq.n == 1 else 3
    while slots > low and eq.cost(slots - 1) == best:
        slots -= 1
    return slots


# ---------------------------------------------------------------------------------------------
# The default method: exact when the search is short, else bounded, never worse than uniform
# ---------------------------------------------------------------------------------------------

# Work limits, in evaluations of Z or C: the compiled recursion does a few million a second,
# the Python one about a hundred times fewer (it gets a hundredth of the limits).
_EXACT_MAX_LAYERS = 60      # longer chains skip the exact search
_EXACT_LIMIT = 2_000_000
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
    m = min(budget // c.scale, c.lean_peak_units)
    if c.closed_form:
        slots = min(m // c.units[0], c.n + 1)
        eq = _EqualChain(c.n, slots)
        return eq.ops(_equal_best_slots(eq, slots)), False, True
    if method == "auto":
        return _auto(c, m)
    return _recursion(c, method).ops(m), False, method == "optimal"


def _cost_of(trace: Trace, row_flops: Sequence[int]) -> tuple:
    """What the searches minimise: forward FLOPs, then the peak."""
    return sum(k * f for k, f in zip(trace.forward_counts, row_flops)), trace.peak_units


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
                     bwd=up(c.costs.backward_scratch(False)), allowed=flags, window=window)
    found, seen = [], set()
    for nudge in _BUDGET_NUDGES:
        try:
            value = rec.value(m // q + nudge)
            ops = rec.ops(m // q + nudge) if value is not None else None
        except RuntimeError:  # the work limit
            break
        if ops is None or value in seen:
            continue
        seen.add(value)
        trace = replay(ops, c.costs)
        if trace.peak_units <= m:
            found.append(trace)
    return found


def _as_if_equal(c: _Chain, m: int) -> list:
    """Traces of the equal-chain closed form (Revolve's binomial schedules) with every element
    counted as the largest activation plus the largest scratch, so that it fits m; a few more
    slots are tried too, each schedule measured exactly by replay and kept only if it fits m.
    Cheap, and it stays feasible at tight budgets where the bounded searches may find nothing."""
    n, width = c.n, max(c.units)
    scratch = max(max(c.costs.forward_scratch), max(c.costs.backward_scratch(False)))
    low = 2 if n == 1 else 3
    base = max(low, (m - scratch) // width)
    top = min(base + 4, n + 1)
    if base > top:
        return []
    eq, found = _EqualChain(n, top), []
    for slots in range(base, top + 1):
        trace = replay(eq.ops(slots), c.costs)
        if trace.peak_units <= m:
            found.append(trace)
    return found


def _auto(c: _Chain, m: int) -> tuple:
    """(ops, False, proven_optimal) for ``method="auto"``, m units below the lean plain peak.

    Chains of up to _EXACT_MAX_LAYERS elements get the exact search, bounded in work; when it
    finishes the plan is proven optimal. Otherwise the bounded searches run, and the result is
    the cheapest of their schedules, every uniform-k schedule that fits, the equal-chain
    schedules that fit (_as_if_equal) and the minimal schedule, all measured by replay.
    """
    # The Python recursion (not built, or numbers beyond int64) is about 100x slower.
    slow = 1 if _planner is not None and _fits_int64(c) else 100
    if c.n <= _EXACT_MAX_LAYERS:
        try:
            return _recursion(c, "optimal", limit=_EXACT_LIMIT // slow).ops(m), False, True
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
        candidates += _bounded(c, m, method, fineness, count, window, limit // slow)
    # The minimal schedule (O(N^2) operations) is replayed only when nothing else fits: its
    # FLOPs are sum_i F(0, i + 1), its peak min_units() (the tests check both by replay).
    minimal = sum(sum(flops[:i + 1]) for i in range(c.n)), c.costs.min_units()
    best = min(candidates, key=lambda t: _cost_of(t, flops), default=None)
    if best is None or _cost_of(best, flops) > minimal:
        return _minimal_ops(c.n), False, False
    return list(best.ops), False, False


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def plan(chain: object, batch_size: int, budget_bytes: int, dtype: object = np.float32, *,
         method: str = "auto") -> Plan:
    """The schedule with the least forward FLOPs whose peak activation memory fits the budget.

    ``chain`` is a :class:`~ckpt.costs.ChainCosts`, N+1 widths (a Dense chain a_0 .. a_N) or N
    layers (described by their ``describe`` method, or Dense layers of their ``in_features`` /
    ``out_features``). When the budget holds plain backprop (every activation and internal
    kept), that is the plan (``keep_internals=True``); otherwise internals are recomputed in
    each backward. Elements that all cost the same, without scratch, get the exact closed form.

    ``method``:

    - ``"auto"`` (default, interactive): the exact search when the chain is short enough for it
      to finish quickly (then ``proven_optimal``), else bounded searches on memory rounded up
      to a few dozen slots, compared with every uniform schedule that fits; a 200-element
      uneven chain plans in about a second;
    - ``"optimal"``: the exact search, optimal over all legal schedules under the model of the
      module docstring (can take minutes on long uneven chains);
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
                 dtype: object = np.float32) -> Plan:
    """The classic k-uniform segment schedule (Chen et al. 2016) as a Plan, to compare at equal
    budget: the first sweep keeps the inputs of elements 0, k, 2k, ...; then each segment, last
    first, is recomputed once from its start and back-propagated. A segment's last element is
    not recomputed (its output is the next segment's start or a_N, both held). k = 1 keeps
    everything, internals included (plain backprop); k = 0 or k >= N keeps only a_0.
    ``budget_bytes`` of the result is its own peak.
    """
    c = _chain(chain, batch_size, dtype)
    if not _is_int(checkpoint_every):
        raise TypeError(f"checkpoint_every must be an int, got {checkpoint_every!r}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    ops = uniform_ops(c.n, int(checkpoint_every))
    keep = checkpoint_every == 1 or c.n == 1  # the plain schedule
    peak = replay(ops, c.costs, keep).peak_units * c.scale
    return _make_plan(c, peak, ops, keep, False, f"uniform(k={checkpoint_every})")


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
    plain, internal = sum(row_flops), sum(e.internal_flops for e in c.costs.elements)
    curve = []
    rec = None
    for budget in budgets:
        if budget >= c.plain_peak:
            curve.append((budget, 0, c.plain_peak))
            continue
        m = min(budget // c.scale, c.lean_peak_units)
        if c.closed_form:
            eq = _EqualChain(c.n, c.n + 1)
            slots = _equal_best_slots(eq, min(m // c.units[0], c.n + 1))
            cost, peak = eq.cost(slots) * row_flops[0], slots * c.units[0]
        elif method == "auto":
            trace = replay(_auto(c, m)[0], c.costs)
            cost, peak = _cost_of(trace, row_flops)
        else:
            rec = rec or _recursion(c, method)
            cost, peak = rec.value(m)
        curve.append((budget, (cost - plain + internal) * batch, peak * c.scale))
    return curve
