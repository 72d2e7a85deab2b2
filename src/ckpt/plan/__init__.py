"""Optimal checkpointing plans for a chain of elements: least recomputation within a budget.

Model
-----
A chain of N elements has activations a_0 ... a_N: a_i is the input of element i, a_0 the
network input, a_N its output. Every cost comes from the elements' descriptions
(:mod:`ckpt.costs`, one :class:`~ckpt.costs.ElementCost` per element): holding a_i costs
``|a_i| = stored_i * batch * itemsize`` bytes (``stored`` = the width for Dense); element i's
forward needs ``forward_scratch_i`` more while it runs, its backward ``backward_scratch_i`` more
plus its internals (``tape_i``), which it recomputes (``internal_flops_i``) unless the forward
that made a_{i+1} kept them beside it: then a_{i+1} costs ``|a_{i+1}| + |tape_i|`` while held
and the backward rebuilds nothing (``Plan.keep_internals`` lists those forwards; plain
backprop, where every forward keeps, is the plan whenever its peak fits the budget). A schedule
is a sequence of operations:

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
:func:`plan` returns a schedule with peak <= budget and the least total forward FLOPs, the
internals rebuilt in backwards included (its *cost*).

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

Kept internals. A tape is worth holding only beside an activation that stays held until its
element's backward: a right end a_p, or a top that ends as the position reached. So Z has a
third right end, e = 2 (a_p held with its tape; backward p-1 then costs nothing, where e = 1
costs the rebuild), and a flag t: a_r is to end held with its tape (when r = y that is the
top's own, held throughout). A push to r2 chooses t2 for a_r2 (Z(y, r2, r, 1 + t2)), the child
C(y, p, r2, e, t2) passes it to the sweep or slide that makes a_r2, whose last forward keeps;
the terminal forward-then-backward chooses whether its forward keeps; and a held a_p may also be
freed and recomputed to keep its tape (e = 1 at y = p-1, when a rebuild costs more than the
forward). Without tapes the flags vanish and so does their cost (the states are those above).
The tests compare this against exhaustive search over every schedule and every choice of kept
forwards, and check that a plan recomputes no more than the best uniform schedule (which keeps
what ``keep_internals="auto"`` keeps) within the same budget.

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
smallest feasible one to the plain peak; the Python oracle of the tests is 100-400x slower):

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

Layout
------
One job per module: ``_chain`` (inputs and the chain model), ``_recursion`` (the compiled
recursion ``ckpt._planner`` that every search runs), ``_oracle`` (the same recursion in Python,
for the tests only), ``_equal`` (the closed form), ``_search`` (the methods, the bounded
searches), ``_plan`` (:class:`Plan` and its ``explain``) and ``_api`` (the entry points below).
"""
from __future__ import annotations

from ckpt.plan._api import plan, simulate, tradeoff, uniform_plan
from ckpt.plan._plan import Plan
from ckpt.plan._search import METHODS
from ckpt.units import format_size, parse_size

__all__ = ["Plan", "METHODS", "plan", "uniform_plan", "tradeoff", "simulate", "parse_size",
           "format_size"]
