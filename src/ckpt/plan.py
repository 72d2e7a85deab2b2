"""Optimal checkpointing plans for a chain of Dense layers: least recomputation within a budget.

Model
-----
A chain of N layers has activations a_0 ... a_N: a_i is the input of layer i, a_0 the network
input, a_N its output. Holding a_i costs ``|a_i| = batch * width_i * itemsize`` bytes. A schedule
is a sequence of operations:

- ``("forward", i)``: needs a_i held and a_{i+1} not held; produces a_{i+1}; costs layer i's
  forward FLOPs, ``2 * batch * in * out`` for a Dense layer;
- ``("backward", i)``: needs a_i and a_{i+1} held and the gradient of a_{i+1}; produces the
  gradient of a_i and frees a_{i+1} *implicitly* (the schedule never frees it explicitly);
- ``("free", i)``: releases a_i.

Conventions: only a_0 is held at the start and it stays held to the end (it counts toward the
peak and is never freed); a forward counts a_i and a_{i+1} together (no in-place update); the
backwards run exactly once each, N-1 down to 0; the gradient of a_N exists once a_N has been
computed; gradients, parameters, their gradients and workspace are outside the count (a
constant). The *peak* is the most bytes of activations held at once. A budget is feasible iff it
is at least ``max_i |{a_0, a_i, a_{i+1}}|`` (backward i needs those three; recomputing from a_0
before each backward achieves it). :func:`plan` returns a schedule with peak <= budget and the
least total forward FLOPs; :func:`simulate` checks any schedule and returns its peak.

The recursion
-------------
Fix a moment right after backward p (or the start, p = N). Left of p the held activations form a
stack; only its top, a_y, is ever a source of forwards (a forward from deeper down computes
something needed only once the top is used up, so it can wait). The top either stays held until
its own backward, or is used as a stepping stone: a forward sweep from a_y frees a_y once
a_{y+1} exists and goes on, so the top *slides* right to y2, and a_y is recomputed later from
deeper down. Every activation is freed right after its last use (earlier never costs FLOPs and
never raises the peak). Normalised this way, every schedule is one of this recursion, on exact
byte counts m (the argument is a sketch; the tests check it against exhaustive search)::

    Z(y, p, r, e, m)  a_y is the top (held), a_p held iff e, backward p-1 is next; reach
                      position r (backwards p-1 .. r done) with a_r held, nothing of (r, p]
                      held and a_y freed if r > y; never hold more than m bytes of [y, p].
                      Cost = forward FLOPs.

      y = p-1:  r = y required; cost 0 if e, else f_y (compute a_p, then backward y).
      e = 1:    free a_p, then Z(y, p, r, 0, m).
      push:     min over r < r2 < p of  C(y, p, r2, e, m) + Z(y, r2, r, 1, m)
      slide:    min over y < y2 <= r of F(y, y2) + Z(y2, p, r, e, m)   (sweep frees a_y on the way)

    C(y, p, r2, e, m) = min over y < b <= r2 of F(y, b) + Z(b, p, r2, e, m - |a_y|)

C is a *child*: sweep from a_y to a_b keeping a_y, and let the child (which may slide from b to
r2) back-propagate down to r2. F(i, j) = f_i + ... + f_{j-1}. Sweeps are checked against m at
each transient moment: keeping a_y, the forward of a_k holds a_y, a_k, a_{k+1} (and a_p if e).
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

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from numbers import Integral

import numpy as np

from ckpt.schedule import uniform_ops

try:  # the compiled twin of _Recursion; absent until the package is built
    from ckpt import _planner
except ImportError:
    _planner = None

__all__ = ["Plan", "plan", "uniform_plan", "tradeoff", "simulate", "parse_size", "format_size"]

Op = tuple[str, int]
FORWARD, BACKWARD, FREE = "forward", "backward", "free"
METHODS = ("optimal", "persistent")
_INF = float("inf")
# The compiled planner works in int64: chains whose worst-case cost could overflow stay in Python.
_INT64_SAFE = 2**62


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _chain_widths(chain: object) -> tuple[int, ...]:
    """Widths a_0 .. a_N from N+1 ints or from N layer-like objects (in_features, out_features)."""
    from ckpt.costs import ChainCosts
    if isinstance(chain, ChainCosts):
        return chain.widths
    if isinstance(chain, (str, bytes)) or not isinstance(chain, Iterable):
        raise TypeError("chain must be a list of N+1 widths or of N layers, got "
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
        return tuple(int(x) for x in items)
    widths: list = []
    for i, layer in enumerate(items):
        if _is_int(layer) or not (hasattr(layer, "in_features") and hasattr(layer, "out_features")):
            raise TypeError(
                f"chain item {i} is a {type(layer).__name__}: expected ints (widths) or layers "
                "with integer in_features and out_features, not a mix")
        sizes = (layer.in_features, layer.out_features)
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
    return tuple(widths)


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
    """A validated chain with its byte sizes and FLOPs."""

    widths: tuple[int, ...]
    batch_size: int
    dtype: np.dtype

    @property
    def n(self) -> int:
        return len(self.widths) - 1

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.batch_size * w * self.dtype.itemsize for w in self.widths)

    @property
    def flops(self) -> tuple[int, ...]:
        w = self.widths
        return tuple(2 * self.batch_size * w[i] * w[i + 1] for i in range(self.n))

    @property
    def min_budget(self) -> int:
        s = self.sizes
        return max(s[0] + s[i] + s[i + 1] if i else s[0] + s[1] for i in range(self.n))

    @property
    def plain_peak(self) -> int:
        return sum(self.sizes)

    @property
    def equal(self) -> bool:
        return len(set(self.widths)) == 1


def _chain(chain: object, batch_size: object, dtype: object) -> _Chain:
    return _Chain(_chain_widths(chain), _check_batch(batch_size), _check_dtype(dtype))


def _check_feasible(c: _Chain, budget: int) -> None:
    low = c.min_budget
    if budget < low:
        raise ValueError(
            f"budget {budget} B ({format_size(budget)}) is below the smallest feasible budget "
            f"{low} B ({format_size(low)}) for this chain: backward i needs a_0, a_i and a_(i+1) "
            "held at once")


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20,
          "gb": 10**9, "gib": 2**30}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """Bytes from "4MiB", "1.5 GB", "512kb", "4096" (plain numbers are bytes).

    Units (case-insensitive): B, KB = 1000, KiB = 1024, MB, MiB, GB, GiB. Decimals are allowed;
    a fractional byte count is rounded down, so a parsed budget is never larger than asked.
    """
    if _is_int(text):
        if text < 0:
            raise ValueError(f"a size must be >= 0, got {text}")
        return int(text)
    if not isinstance(text, str):
        raise TypeError(f"a size must be a string such as '4MiB' or an int, got {text!r}")
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse size {text!r}: expected a number with an optional unit "
                         "B, KB, KiB, MB, MiB, GB or GiB, such as '4MiB' or '1.5GB'")
    return int(Decimal(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    """Human-readable binary size: 512 B, 1.5 KiB, 12.25 MiB, 2 GiB."""
    if not _is_int(n):
        raise TypeError(f"format_size needs an int number of bytes, got {n!r}")
    sign, n = ("-", -n) if n < 0 else ("", n)
    if n < 1024:
        return f"{sign}{n} B"
    unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
                       if n >= s)
    return f"{sign}{n / scale:.2f}".rstrip("0").rstrip(".") + f" {unit}"


def _format_flops(x: int) -> str:
    for unit, scale in (("TFLOP", 10**12), ("GFLOP", 10**9), ("MFLOP", 10**6), ("kFLOP", 10**3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x} FLOP"


# ---------------------------------------------------------------------------------------------
# Checking a schedule
# ---------------------------------------------------------------------------------------------


def _run(ops: Iterable[Op], sizes: Sequence[int]) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Check a schedule; return (peak bytes, forward count per layer, activations kept by the
    first sweep: those held once a_N is first computed and the frees right after it are done,
    a_N aside). Raises ValueError naming the first illegal operation."""
    n = len(sizes) - 1
    held = [False] * (n + 1)
    held[0] = True
    current = peak = sizes[0]
    counts = [0] * n
    stored: tuple[int, ...] | None = None
    next_backward = n - 1
    for step, op in enumerate(ops):
        try:
            kind, i = op
        except (TypeError, ValueError):
            raise ValueError(f"operation {step}: {op!r} is not a (kind, index) pair") from None
        if kind not in (FORWARD, BACKWARD, FREE):
            raise ValueError(f"operation {step}: unknown kind {kind!r}")
        if stored is None and counts[n - 1] and kind != FREE:  # the first sweep is over
            stored = tuple(j for j in range(n) if held[j])
        top = n if kind == FREE else n - 1
        if not _is_int(i) or not 0 <= i <= top:
            raise ValueError(f"operation {step}: {kind} {i!r} is outside a chain of {n} layers")
        if kind == FORWARD:
            if not held[i] or held[i + 1]:
                raise ValueError(
                    f"operation {step}: forward {i} needs a_{i} held and a_{i + 1} not")
            if i > next_backward:
                raise ValueError(f"operation {step}: forward {i} after backward {i}")
            held[i + 1] = True
            current += sizes[i + 1]
            peak = max(peak, current)
            counts[i] += 1
        elif kind == BACKWARD:
            if i != next_backward:
                raise ValueError(
                    f"operation {step}: backward {i}, expected backward {next_backward}")
            if not (held[i] and held[i + 1]):
                raise ValueError(f"operation {step}: backward {i} needs a_{i} and a_{i + 1} held")
            held[i + 1] = False
            current -= sizes[i + 1]
            next_backward -= 1
        else:
            if i == 0:
                raise ValueError(f"operation {step}: a_0 is held for the whole schedule")
            if not held[i]:
                raise ValueError(f"operation {step}: free {i} but a_{i} is not held")
            held[i] = False
            current -= sizes[i]
    if next_backward >= 0:
        raise ValueError(f"the schedule ends before backward {next_backward}")
    assert stored is not None  # backward N-1 came after the first sweep
    return peak, tuple(counts), stored


def simulate(ops: Iterable[Op], chain: object, batch_size: int, dtype: object = np.float32) -> int:
    """Check that ``ops`` is a legal schedule for the chain and return its peak in bytes.

    Legal: starting with only a_0 held, forward i needs a_i held and a_{i+1} not (and backward i
    not yet done); backward i comes in the order N-1 .. 0, needs a_i and a_{i+1} held (a_N held
    means its gradient exists) and frees a_{i+1}; free i needs a_i held, i > 0. Every backward
    must appear. Raises ValueError naming the first illegal operation.
    """
    c = _chain(chain, batch_size, dtype)
    return _run(ops, c.sizes)[0]


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A checkpointing schedule and what it costs under the model of this module.

    ``ops`` is the full schedule (see the module docstring); ``peak_bytes``, ``forward_counts``
    and ``stored`` are measured by running it, not assumed. ``budget_bytes`` is the budget it
    was planned for (for a uniform plan, its own peak).
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

    @property
    def n_layers(self) -> int:
        return len(self.widths) - 1

    @property
    def activation_bytes(self) -> tuple[int, ...]:
        return tuple(self.batch_size * w * self.itemsize for w in self.widths)

    @property
    def layer_flops(self) -> tuple[int, ...]:
        w = self.widths
        return tuple(2 * self.batch_size * w[i] * w[i + 1] for i in range(self.n_layers))

    @property
    def plain_forward_flops(self) -> int:
        """FLOPs of one forward pass."""
        return sum(self.layer_flops)

    @property
    def total_forward_flops(self) -> int:
        return self.plain_forward_flops + self.recompute_flops

    @property
    def plain_peak_bytes(self) -> int:
        """Peak of plain backprop, which stores every activation."""
        return sum(self.activation_bytes)

    @property
    def min_budget_bytes(self) -> int:
        s = self.activation_bytes
        return max(s[0] + s[i] + s[i + 1] if i else s[0] + s[1] for i in range(self.n_layers))

    @property
    def fixed_bytes(self) -> int:
        """Estimate of what the count leaves out: each Dense layer's weight (in x out) and bias
        (out) and their gradients, plus the two gradient buffers of the widest activation."""
        w = self.widths
        params = sum(w[i] * w[i + 1] + w[i + 1] for i in range(self.n_layers))
        return (2 * params + 2 * self.batch_size * max(w)) * self.itemsize

    def explain(self) -> str:
        """A readable table: per layer its widths, whether its input is stored by the first
        sweep and how many times its forward runs; then peak, budget and extra compute."""
        n, w = self.n_layers, self.widths
        stored = set(self.stored)
        lines = [f"Checkpointing plan ({self.method}): {n} Dense layers, batch {self.batch_size}, "
                 f"{self.dtype}",
                 f"{'layer':>6} {'in':>7} {'out':>7}  {'input stored':>12}  {'forward runs':>12}"]
        for i in range(n):
            lines.append(f"{i:>6} {w[i]:>7} {w[i + 1]:>7}  {'yes' if i in stored else '-':>12}"
                         f"  {self.forward_counts[i]:>12}")
        fwd = self.plain_forward_flops
        rows = [("predicted peak", self.peak_bytes), ("budget", self.budget_bytes),
                ("plain backprop peak", self.plain_peak_bytes),
                ("smallest feasible budget", self.min_budget_bytes)]
        lines.append("")
        for name, value in rows:
            lines.append(f"{name:<25} {format_size(value):>11}  ({value} B)")
        lines.append(
            f"{'extra compute':<25} {_format_flops(self.recompute_flops):>11}  = "
            f"{100 * self.recompute_flops / fwd:.1f}% of one forward pass, "
            f"{100 * self.recompute_flops / (3 * fwd):.1f}% of a training step "
            "(forward + two backward GEMMs = 3x forward)")
        lines.append(
            "Not counted: parameters, their gradients, the gradient buffers and BLAS workspace "
            f"(a constant, about {format_size(self.fixed_bytes)} for weights, biases and their "
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
                f"stored={shown})")


def _make_plan(c: _Chain, budget: int, ops: Sequence[Op], method: str) -> Plan:
    peak, counts, stored = _run(ops, c.sizes)
    flops = c.flops
    recompute = sum((k - 1) * f for k, f in zip(counts, flops))
    return Plan(widths=c.widths, batch_size=c.batch_size, dtype=c.dtype.name,
                itemsize=c.dtype.itemsize, budget_bytes=budget, peak_bytes=peak,
                recompute_flops=recompute, forward_counts=counts, stored=stored, method=method,
                ops=tuple(ops))


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


class _Recursion:
    """Z and C of the module docstring for one chain, memoised across budgets.

    ``slides=False`` restricts to persistent schedules (the rotor recursion).
    """

    def __init__(self, sizes: Sequence[int], flops: Sequence[int], slides: bool) -> None:
        n = self.n = len(sizes) - 1
        w = list(sizes)
        pre = [0]
        for x in flops:
            pre.append(pre[-1] + x)
        # keep[x][j]: peak of the sweep a_x -> a_j holding a_x throughout; drop[x][j]: the same
        # sweep freeing a_x (and every intermediate) as soon as the next activation exists.
        keep, drop = [], []
        for x in range(n):
            k_row, d_row = [0] * (n + 1), [0] * (n + 1)
            a = b = w[x] + w[x + 1]
            k_row[x + 1], d_row[x + 1] = a, b
            for j in range(x + 2, n + 1):
                pair = w[j - 1] + w[j]
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

        def z(y: int, p: int, r: int, e: int, m: int) -> tuple:
            own = w[y] + w[p] if e else w[y]
            if own > m:
                return none
            key = (y, p, r, e)
            hit = recall(memo_z, dead_z, key, m)
            if hit is not None:
                return hit
            if y == p - 1:
                if r != y:
                    res = none
                elif e:
                    res = (0, own, _TERMINAL)
                elif w[y] + w[p] <= m:
                    res = (pre[p] - pre[y], w[y] + w[p], _TERMINAL)
                else:
                    res = none
            else:
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
                        c2, p2, _ = z(y2, p, r, e, m)
                        cost, peak = pre[y2] - pre[y] + c2, max(sweep, p2)
                        if cost < best or (cost == best and peak < best_peak):
                            best, best_peak, best_dec = cost, peak, -y2
                res = (best, best_peak, best_dec)
            remember(memo_z, dead_z, key, m, res)
            return res

        def child(y: int, p: int, r2: int, e: int, m: int) -> tuple:
            key = (y, p, r2, e)
            hit = recall(memo_c, dead_c, key, m)
            if hit is not None:
                return hit
            row, extra, wy = keep[y], (w[p] if e else 0), w[y]
            best, best_peak, best_b = _INF, _INF, None
            for b in range(y + 1 if slides else r2, r2 + 1):
                sweep = row[b] + extra
                if sweep > m:
                    break
                c2, p2, _ = z(b, p, r2, e, m - wy)
                cost, peak = pre[b] - pre[y] + c2, max(sweep, p2 + wy)
                if cost < best or (cost == best and peak < best_peak):
                    best, best_peak, best_b = cost, peak, b
            res = (best, best_peak, best_b)
            remember(memo_c, dead_c, key, m, res)
            return res

        self._z, self._child, self._w = z, child, w

    def _deep(self):
        """Room for the recursion: depth grows by one per index step, a few frames each."""
        return _RecursionLimit(10 * self.n + 1000)

    def value(self, budget: int) -> tuple[int, int] | None:
        """(total forward FLOPs, peak) of the best schedule within budget, or None."""
        with self._deep():
            cost, peak, _ = self._z(0, self.n, 0, 0, budget)
        return None if cost == _INF else (cost, peak)

    def ops(self, budget: int) -> list:
        """The schedule behind value(budget), which must not be None."""
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


def _recursion(c: _Chain, method: str, compiled: bool | None = None):
    """The compiled Recursion when built and the numbers fit in int64, else the Python one.
    ``compiled`` forces a choice (tests compare the two)."""
    sizes, flops = c.sizes, c.flops
    # Any schedule Z considers runs each of its N sweeps over at most the whole chain.
    fits = c.n * (c.n + 1) * max(flops) < _INT64_SAFE and 4 * sum(sizes) < _INT64_SAFE
    if compiled is None:
        compiled = _planner is not None and fits
    if compiled:
        if _planner is None or not fits:
            raise RuntimeError("ckpt._planner is not built or the chain overflows int64")
        return _planner.Recursion(np.array(sizes, np.int64), np.array(flops, np.int64),
                                  method == "optimal")
    return _Recursion(sizes, flops, method == "optimal")


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
# Public entry points
# ---------------------------------------------------------------------------------------------


def plan(chain: object, batch_size: int, budget_bytes: int, dtype: object = np.float32, *,
         method: str = "optimal") -> Plan:
    """The schedule with the least forward FLOPs whose peak activation memory fits the budget.

    ``chain`` is N+1 widths (a_0 .. a_N) or N layers with ``in_features`` / ``out_features``.
    ``method="optimal"`` (default) is optimal over all legal schedules under the model of the
    module docstring; ``"persistent"`` only over schedules that keep every stored activation
    until its backward (rotor), which is much faster on long uneven chains. Raises TypeError /
    ValueError for bad inputs, and ValueError naming the smallest feasible budget when the
    budget is below it.
    """
    c = _chain(chain, batch_size, dtype)
    budget = _check_budget(budget_bytes)
    method = _check_method(method)
    _check_feasible(c, budget)
    if c.equal:
        slots = min(budget // c.sizes[0], c.n + 1)
        eq = _EqualChain(c.n, slots)
        return _make_plan(c, budget, eq.ops(_equal_best_slots(eq, slots)), method)
    rec = _recursion(c, method)
    return _make_plan(c, budget, rec.ops(min(budget, c.plain_peak)), method)


def uniform_plan(chain: object, batch_size: int, checkpoint_every: int,
                 dtype: object = np.float32) -> Plan:
    """The classic k-uniform segment schedule (Chen et al. 2016) as a Plan, to compare at equal
    budget: the first sweep keeps the inputs of layers 0, k, 2k, ...; then each segment, last
    first, is recomputed once from its start and back-propagated. A segment's last layer is not
    recomputed (its output is the next segment's start or a_N, both held). k = 1 keeps
    everything; k = 0 or k >= N keeps only a_0. ``budget_bytes`` of the result is its own peak.
    """
    c = _chain(chain, batch_size, dtype)
    if not _is_int(checkpoint_every):
        raise TypeError(f"checkpoint_every must be an int, got {checkpoint_every!r}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    ops = uniform_ops(c.n, int(checkpoint_every))
    peak = _run(ops, c.sizes)[0]
    return _make_plan(c, peak, ops, f"uniform(k={checkpoint_every})")


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
             points: object = None, *, method: str = "optimal") -> list:
    """The memory-versus-compute curve: a list of (budget_bytes, recompute_flops, peak_bytes),
    from the smallest feasible budget to the plain-backprop peak, ``peak_bytes`` being the least
    peak among the cheapest plans within the budget.

    ``points``: None (17 evenly spaced budgets), an int (that many) or a list of budgets.
    """
    c = _chain(chain, batch_size, dtype)
    method = _check_method(method)
    budgets = _budget_points(c.min_budget, c.plain_peak, points)
    plain = sum(c.flops)
    curve = []
    if c.equal:
        size, f = c.sizes[0], c.flops[0]
        eq = _EqualChain(c.n, c.n + 1)
        for budget in budgets:
            slots = _equal_best_slots(eq, min(budget // size, c.n + 1))
            curve.append((budget, eq.cost(slots) * f - plain, slots * size))
        return curve
    rec = _recursion(c, method)
    for budget in budgets:
        cost, peak = rec.value(min(budget, c.plain_peak))
        curve.append((budget, cost - plain, peak))
    return curve
