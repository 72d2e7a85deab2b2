"""ckpt.plan: optimality against exhaustive search (uneven elements with scratch and internals)
and the binomial closed form, the default method against the exact one and against uniform
schedules, legality of the schedules, the trade-off curve, sizes and bad inputs."""
from __future__ import annotations

import heapq
import random
import re
import subprocess
import sys
from math import comb
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt import plan as planmod
from ckpt.costs import ChainCosts, ElementCost
from ckpt.plan import Plan, format_size, parse_size, plan, simulate, tradeoff, uniform_plan
from ckpt.plan import _chain as chainmod
from ckpt.plan import _oracle, _recursion, _search
from ckpt.schedule import replay, uniform_ops

IMPLS = ["python", "compiled"]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def chain_of(chain, batch=1, dtype=np.float32):
    return chainmod._chain(chain, batch, dtype)


def recursion(chain, method, impl, **kwargs):
    make = _recursion._recursion if impl == "compiled" else _oracle.oracle
    return make(chain_of(chain), method, **kwargs)


def random_costs(rng, n, scratch=True):
    """A chain of n uneven elements with random stored sizes, tapes, scratch and FLOPs."""
    pool = rng.choice([list(range(1, 10)), [1, 2, 3, 20], [2, 3, 17, 18, 40], [1, 100], [4]])
    widths = [rng.choice(pool) for _ in range(n + 1)]
    elements = []
    for i in range(n):
        tape = rng.choice([0, 0, 1, 5]) if scratch else 0
        elements.append(ElementCost(
            "x", widths[i], widths[i + 1], stored=widths[i + 1],
            forward_flops=rng.randint(1, 60), backward_flops=rng.randint(1, 60), tape=tape,
            forward_scratch=rng.choice([0, 0, 1, 3, 12]) if scratch else 0,
            backward_scratch=rng.choice([0, 0, 2, 7]) if scratch else 0,
            internal_flops=rng.randint(1, 9) if tape else 0))
    return ChainCosts(tuple(elements))


def random_chains(seed, count, max_layers=5):
    """Dense chains (widths) and uneven chains with scratch, alternately."""
    rng = random.Random(seed)
    for j in range(count):
        n = rng.randint(1, max_layers)
        if j % 2:
            yield random_costs(rng, n)
        else:
            pool = rng.choice([list(range(1, 10)), [1, 2, 3, 20], [2, 3, 17, 18, 40], [1, 100],
                               [4]])
            yield [rng.choice(pool) for _ in range(n + 1)]


def brute_force(costs, budget, keep=True):
    """Least cost (per row) over ALL legal schedules within ``budget`` units (None if none
    fits), by Dijkstra over (held activations as a bit set, the held ones whose tape is kept as
    a bit set, next backward, a_N computed yet). Moves are exactly what replay() accepts:
    forward i (a_i held, a_{i+1} not, backward i not done; its scratch counts beside what is
    then held), free i (i > 0, held), backward b (a_b, a_{b+1} held; b = N-1 needs a_N
    computed; its scratch counts beside what is held, and its tape too unless it was kept).

    ``keep``: each forward may keep its element's tape beside its output (held until the output
    goes), and the cost is forward FLOPs plus the internal FLOPs of the backwards that find no
    tape kept. Without, no tape is ever kept and the cost is forward FLOPs alone."""
    costs = chainmod._chain_costs(costs)
    sizes, flops = costs.stored, costs.forward_flops
    fwd, bwd = costs.forward_scratch, costs.backward_scratch(True)
    tape = [e.tape for e in costs.elements]
    internal = [e.internal_flops if keep else 0 for e in costs.elements]
    n = costs.n

    def held(mask, kept):
        return sum(s for i, s in enumerate(sizes) if mask >> i & 1) + \
            sum(tape[i - 1] for i in range(1, n + 1) if kept >> i & 1)

    start = (1, 0, n - 1, False)
    if sizes[0] > budget:
        return None
    dist = {start: 0}
    queue = [(0, start)]
    while queue:
        cost, state = heapq.heappop(queue)
        if dist[state] < cost:
            continue
        mask, kept, b, computed = state
        if b < 0:
            return cost
        moves = []
        for i in range(min(n - 1, b) + 1):
            if mask >> i & 1 and not mask >> (i + 1) & 1:
                for k in ((0, 1) if keep and tape[i] else (0,)):
                    new, new_kept = mask | 1 << (i + 1), kept | k << (i + 1)
                    if held(new, new_kept) + fwd[i] <= budget:
                        moves.append((cost + flops[i],
                                      (new, new_kept, b, computed or i + 1 == n)))
        for i in range(1, n + 1):
            if mask >> i & 1:
                moves.append((cost, (mask & ~(1 << i), kept & ~(1 << i), b, computed)))
        if mask >> b & 1 and mask >> (b + 1) & 1 and (b < n - 1 or computed):
            found = kept >> (b + 1) & 1
            if held(mask, kept) + bwd[b] + (0 if found else tape[b]) <= budget:
                moves.append((cost + (0 if found else internal[b]),
                               (mask & ~(1 << (b + 1)), kept & ~(1 << (b + 1)), b - 1, computed)))
        for new_cost, new in moves:
            if held(new[0], new[1]) <= budget and new_cost < dist.get(new, float("inf")):
                dist[new] = new_cost
                heapq.heappush(queue, (new_cost, new))
    return None


def budgets_of(c, rng, count=5):
    """Budgets in units from the smallest feasible one to the lean plain peak."""
    low, high = c.costs.min_units(), c.lean_peak_units
    inner = rng.sample(range(low, high + 1), min(count, high - low + 1))
    return sorted(set(inner) | {low, high})


def check_plan(p: Plan, budget):
    """The schedule is legal, its replayed peak is the reported one and fits, and the reported
    counts and FLOPs are the schedule's."""
    assert simulate(p.ops, p.costs, p.batch_size, p.dtype, keep_internals=p.keep_internals) \
        == p.peak_bytes <= budget
    counts = [0] * p.n_layers
    for kind, i in p.ops:
        counts[i] += kind == "forward"
    assert tuple(counts) == p.forward_counts and min(counts) >= 1
    trace = replay(p.ops, p.costs, p.keep_internals)
    if p.keep_internals is True:
        internal = 0
    elif p.keep_internals is False:
        internal = p.batch_size * sum(e.internal_flops for e in p.costs.elements)
    else:  # those whose tape was not kept to their backward
        kept = {p.ops[q][1] for q in p.keep_internals}
        assert trace.rebuilt == tuple(i for i in reversed(range(p.n_layers))
                                      if p.costs.elements[i].tape and i not in kept)
        internal = p.batch_size * sum(e.internal_flops for i, e in enumerate(p.costs.elements)
                                      if not e.tape or i in trace.rebuilt)
    assert p.rebuilt_layers == trace.rebuilt
    assert p.rerun_flops == sum((k - 1) * f for k, f in zip(counts, p.layer_flops))
    assert p.recompute_flops == p.rerun_flops + internal and p.internal_flops == internal
    assert [i for kind, i in p.ops if kind == "backward"] == list(reversed(range(p.n_layers)))
    assert p.stored[0] == 0


def row_cost(p: Plan):
    """Forward FLOPs per row of a plan's schedule, plus the internal FLOPs its backwards
    rebuild (what the searches minimise)."""
    return (sum(k * f for k, f in zip(p.forward_counts, p.costs.forward_flops))
            + p.internal_flops // p.batch_size)


# ---------------------------------------------------------------------------------------------
# Optimality
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_recursion_matches_exhaustive_search(impl, keep):
    """Z (with slides) is complete on uneven elements with scratch and internals: no schedule in
    the whole state space is cheaper, whether forwards may keep their element's internals
    (``keep``, the planner's default) or every backward rebuilds them. Its schedules are what
    replay measures, with the kept forwards it reports."""
    rng = random.Random(1)
    for chain in random_chains(seed=2, count=90):
        c = chain_of(chain)
        rec = recursion(chain, "optimal", impl, keep=keep)
        persistent = recursion(chain, "persistent", impl, keep=keep)
        high = c.plain_trace.peak_units if keep else c.lean_peak_units
        for budget in budgets_of(c, rng) + [high]:
            best = brute_force(chain, budget, keep)
            cost, peak = rec.value(budget)
            assert cost == best, (chain, budget)
            assert peak <= budget
            assert persistent.value(budget)[0] >= best
            ops, kept = rec.schedule(budget)
            trace = replay(ops, c.costs, tuple(kept) if keep else False)
            assert trace.peak_units == peak
            assert c.cost_of(trace)[0] == cost + (0 if keep else sum(
                e.internal_flops for e in c.costs.elements))
        assert rec.value(c.costs.min_units() - 1) is None


def test_plan_matches_exhaustive_search_including_equal_layers():
    rng = random.Random(3)
    chains = list(random_chains(seed=4, count=30)) + [[3] * (n + 1) for n in range(1, 7)]
    for chain in chains:
        c = chain_of(chain, batch=3, dtype=np.float64)
        for units in budgets_of(c, rng) + [c.plain_trace.peak_units]:
            budget = units * c.scale + rng.randrange(c.scale)  # bytes round down to units
            for method in ("auto", "optimal"):
                p = plan(chain, 3, budget, np.float64, method=method)
                check_plan(p, budget)
                assert p.proven_optimal
                if budget >= c.plain_peak:
                    assert p.keep_internals is True and p.recompute_flops == 0
                else:
                    assert p.keep_internals is not True
                    assert row_cost(p) == brute_force(chain, units)


def test_sliding_a_checkpoint_beats_every_persistent_schedule():
    """The counterexample of the module docstring: a_1 is cheap to hold while a_4 and a_5 are
    live, later slides to a_2 and is recomputed from a_0; no persistent schedule fits as cheaply."""
    widths, budget = [2, 1, 2, 4, 7, 5], 15 * 4  # batch 1, float32: sizes are 4x the widths
    best = plan(widths, 1, budget, method="optimal")
    persistent = plan(widths, 1, budget, method="persistent")
    check_plan(best, budget)
    check_plan(persistent, budget)
    assert best.total_forward_flops == brute_force(widths, 15) == 2 * 87
    assert persistent.total_forward_flops == 2 * 89
    assert best.proven_optimal and not persistent.proven_optimal
    assert plan(widths, 1, budget).ops == best.ops  # auto: the exact search on a short chain
    assert best.stored == (0, 1, 4)
    position = best.ops.index(("backward", 4))
    assert best.ops[position + 1:position + 4] == (("forward", 1), ("free", 1), ("forward", 2))


def binomial_forwards(n, slots):
    """Layer forwards of the best plan for n equal layers and a budget of ``slots`` activations,
    from binomial coefficients (no recursion).

    Griewank and Walther: with s checkpoints, Revolve's least number of forward steps t(l, s)
    grows by r per extra step for beta(s, r) - beta(s, r-1) = C(s+r-1, r) consecutive lengths l,
    beta(s, r) = C(s+r, s). Translation to this model, in slots of one activation: a segment
    with both ends held and m slots has s = m - 2 free slots (everything counts: a_0, the held
    ends, the checkpoints, the activations being computed). It behaves like Revolve with s
    checkpoints, except that a sweep of two or more steps holds its source, a_k and a_{k+1} at
    once: with s = 1 no such sweep fits beside the held end, which removes the one step of
    slope 2 there; Pascal's rule carries that defect to C(s+r-4, s-2) steps of every larger s.
    So the both-ends segment has
        c_A(m, r) = C(s+r-1, r) - C(s+r-4, s-2)      (s = m - 2 >= 2),   c_A(3, r) = [r != 2]
    steps of slope r, and the whole chain (a_N not computed yet, budget K slots), which splits
    off one both-ends segment per slot it gives up, has c_B(K, r) = (K-2)[r = 1] +
    sum_{m=3..K} c_A(m, r-1). Its cost is one forward plus the n-1 cheapest of those slopes.
    """
    def count(n_, k):
        return comb(n_, k) if 0 <= k <= n_ else 0

    def c_a(m, r):
        if r == 0:
            return 0
        if m == 3:
            return int(r != 2)
        s = m - 2
        return count(s + r - 1, r) - count(s + r - 4, s - 2)

    if slots >= n + 1:
        return n
    left, total, r = n - 1, 1, 0
    while left > 0:
        r += 1
        take = min(left, (slots - 2) * (r == 1) + sum(c_a(m, r - 1) for m in range(3, slots + 1)))
        total += r * take
        left -= take
    return total


def test_equal_layers_follow_the_binomial_closed_form():
    for n in list(range(1, 40)) + [200, 1000]:
        low = 2 if n == 1 else 3 if n < 1000 else 4  # 1,000 layers in 3 slots: a 1M-op schedule
        for slots in sorted({low, low + 1, low + 2, n // 2 + 1, n, n + 1}):
            if slots < low:
                continue
            budget = slots * 8 * 4
            p = plan([8] * (n + 1), 1, budget)
            assert p.total_forward_flops == binomial_forwards(n, slots) * 2 * 8 * 8, (n, slots)
            if n <= 200:
                check_plan(p, budget)


def test_equal_layers_fast_path_matches_the_general_recursion():
    """The closed form is the recursion Z (slides included) restricted to equal sizes."""
    for n in range(1, 16):
        rec = recursion([5] * (n + 1), "optimal", "python")
        for slots in range(2 if n == 1 else 3, n + 2):
            fast = plan([5] * (n + 1), 1, slots * 20).total_forward_flops
            assert fast == rec.value(slots * 5)[0]


def test_uniform_segments_are_never_better():
    rng = random.Random(5)
    for widths in [[64] * 17, [rng.randint(8, 96) for _ in range(13)], [784, 256, 256, 128, 10]]:
        for k in range(len(widths) + 1):
            uniform = uniform_plan(widths, 4, k)
            check_plan(uniform, uniform.peak_bytes)
            best = plan(widths, 4, uniform.peak_bytes)
            assert best.recompute_flops <= uniform.recompute_flops
            assert best.peak_bytes <= uniform.peak_bytes


def test_uniform_plan_is_the_classic_schedule():
    n = 10
    assert uniform_plan([4] * (n + 1), 1, 1).recompute_flops == 0
    for k, expected in [(0, n - 1), (3, n - 4), (4, n - 3), (n, n - 1)]:  # N - ceil(N / k)
        p = uniform_plan([4] * (n + 1), 1, k)
        assert p.recompute_flops == expected * 2 * 4 * 4
        assert p.stored == tuple(range(0, n, k if k else n))
        assert p.method == f"uniform(k={k})" and p.budget_bytes == p.peak_bytes


@pytest.mark.parametrize("method", planmod.METHODS)
def test_budget_at_or_above_plain_peak_recomputes_nothing(method):
    for widths in ([7, 3, 9, 2], [16] * 9, [1, 2]):
        plain = sum(widths) * 4 * 4
        for budget in (plain, plain + 1, 10 * plain):
            p = plan(widths, 4, budget, method=method)
            assert p.recompute_flops == 0 and p.forward_counts == (1,) * (len(widths) - 1)
            assert p.peak_bytes == p.plain_peak_bytes == plain
            assert p.stored == tuple(range(len(widths) - 1))


@pytest.mark.parametrize("widths", [[7, 3, 9, 2, 5], [16] * 9, [1, 2], [5, 5, 1]])
def test_smallest_feasible_budget(widths):
    c = chain_of(widths, batch=2)
    low = c.min_budget
    expected = max(c.sizes[0] + c.sizes[i] + c.sizes[i + 1] if i else c.sizes[0] + c.sizes[1]
                   for i in range(c.n))
    assert low == expected
    check_plan(plan(widths, 2, low), low)
    with pytest.raises(ValueError) as err:
        plan(widths, 2, low - 1)
    assert f"{low} B" in str(err.value) and format_size(low) in str(err.value)


def test_compiled_and_python_recursions_agree():
    """Same values and schedules (kept forwards included), unbounded or restricted (the bounded
    searches)."""
    rng = random.Random(6)
    for j, chain in enumerate(random_chains(seed=7, count=40, max_layers=9)):
        c = chain_of(chain)
        flags = [1] + [rng.random() < 0.3 for _ in range(c.n - 1)] + [1]
        for method in ("optimal", "persistent"):
            extra = {} if j % 3 else {"allowed": flags, "window": 1}
            ours = recursion(chain, method, "compiled", **extra)
            reference = recursion(chain, method, "python", **extra)
            for budget in budgets_of(c, rng, count=3) + [c.plain_trace.peak_units - 1]:
                assert ours.value(budget) == reference.value(budget)
                if ours.value(budget) is not None:
                    assert ours.schedule(budget) == reference.schedule(budget)
                    assert ours.ops(budget) == reference.ops(budget)


def test_counts_beyond_int64_are_refused_not_planned_slowly():
    """The compiled recursion counts in int64; a chain whose costs could overflow it gets a
    clear error (no pure-Python fallback), while plans that need no search still work."""
    huge = ChainCosts(tuple(ElementCost("x", w, v, stored=v, forward_flops=2**60,
                                        backward_flops=1) for w, v in ((3, 5), (5, 2), (2, 4))))
    c = chain_of(huge)
    for method in planmod.METHODS:
        with pytest.raises(ValueError, match="too large to plan.*64-bit"):
            plan(huge, 1, c.min_budget, method=method)
        assert plan(huge, 1, c.plain_peak, method=method).recompute_flops == 0
    wide = [2**61, 1, 2**61]
    with pytest.raises(ValueError, match="too large to plan"):
        _recursion._recursion(chain_of(wide), "optimal")


def test_planning_never_imports_the_oracle():
    """The Python recursion is the tests' oracle only: planning runs the compiled one."""
    code = ("import sys, ckpt.plan as p\n"
            "p.plan([3, 9, 4, 7, 2, 8], 2, 150)\n"
            "p.tradeoff([3, 9, 4, 7, 2, 8], 2, method='persistent')\n"
            "assert 'ckpt.plan._oracle' not in sys.modules, sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_work_limit_stops_the_search(impl):
    chain = [rng_width for rng_width in random.Random(8).choices(range(1, 50), k=12)]
    c = chain_of(chain)
    full = recursion(chain, "optimal", impl)
    m = c.costs.min_units() + 10
    assert full.value(m) is not None and full.finished
    stopped = recursion(chain, "optimal", impl, limit=full.calls // 2)
    with pytest.raises(RuntimeError):
        stopped.value(m)
    assert not stopped.finished
    with pytest.raises(RuntimeError):
        stopped.ops(m)
    exact = recursion(chain, "optimal", impl, limit=full.calls)
    assert exact.value(m) == full.value(m) and exact.finished


@settings(max_examples=60, deadline=None, derandomize=True)
@given(widths=st.lists(st.integers(1, 64), min_size=2, max_size=12),
       batch=st.integers(1, 8), fraction=st.floats(0, 1.2),
       dtype=st.sampled_from([np.float32, np.float64]),
       method=st.sampled_from(planmod.METHODS))
def test_plans_are_legal_and_fit(widths, batch, fraction, dtype, method):
    c = chain_of(widths, batch, dtype)
    budget = c.min_budget + int(fraction * (c.plain_peak - c.min_budget))
    p = plan(widths, batch, budget, dtype, method=method)
    check_plan(p, budget)
    # More memory never costs more FLOPs.
    assert plan(widths, batch, budget + c.sizes[0], dtype, method=method).recompute_flops \
        <= p.recompute_flops


def test_the_executor_accepts_the_schedule():
    schedule = pytest.importorskip("ckpt.schedule")
    widths, batch = [30, 50, 20, 70, 40, 60, 10], 3
    for budget in (plan(widths, batch, 10**9).min_budget_bytes, 2400):
        p = plan(widths, batch, budget)
        compiled = schedule.compile_schedule(p.ops, widths, p.keep_internals)
        assert compiled.peak_units * batch * p.itemsize == p.peak_bytes


# ---------------------------------------------------------------------------------------------
# Trade-off curve
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("widths", [[32] * 25, [784, 512, 512, 256, 256, 128, 10]])
def test_tradeoff_curve(widths):
    curve = tradeoff(widths, 8)
    c = chain_of(widths, 8)
    assert curve[0][0] == c.min_budget and curve[-1] == (c.plain_peak, 0, c.plain_peak)
    assert len(curve) == 17
    for (b1, r1, _), (b2, r2, _) in zip(curve, curve[1:]):
        assert b1 < b2 and r1 >= r2
    for budget, recompute, peak in curve[::4]:
        p = plan(widths, 8, budget)
        assert (p.recompute_flops, p.peak_bytes) == (recompute, peak) and peak <= budget
    assert [b for b, _, _ in tradeoff(widths, 8, points=[c.plain_peak, c.min_budget])] \
        == [c.min_budget, c.plain_peak]
    assert len(tradeoff(widths, 8, points=3)) == 3
    with pytest.raises(ValueError, match="smallest feasible"):
        tradeoff(widths, 8, points=[c.min_budget - 1])
    with pytest.raises(ValueError, match="points"):
        tradeoff(widths, 8, points=1)


# ---------------------------------------------------------------------------------------------
# The Plan object
# ---------------------------------------------------------------------------------------------


class LayerLike:
    def __init__(self, fan_in, fan_out):
        self.in_features, self.out_features = fan_in, fan_out


def test_layers_or_widths():
    widths = [20, 40, 10, 30]
    layers = [LayerLike(20, 40), LayerLike(40, 10), LayerLike(10, 30)]
    assert plan(layers, 2, 10**6) == plan(widths, 2, 10**6)
    assert plan(np.array(widths), 2, 10**6).widths == tuple(widths)
    dense = pytest.importorskip("ckpt.layers").Dense
    assert plan([dense(20, 40), dense(40, 10), dense(10, 30)], 2, 10**6).widths == tuple(widths)


def test_plan_fields_and_explain():
    widths, batch = [784, 1024, 1024, 1024, 1024, 10], 16
    c = chain_of(widths, batch)
    p = plan(widths, batch, c.min_budget + 2 * batch * 1024 * 4)
    assert p.plain_forward_flops == sum(c.flops)
    assert p.total_forward_flops == p.plain_forward_flops + p.recompute_flops
    assert p.recompute_flops > 0
    assert p.plain_peak_bytes == c.plain_peak and p.itemsize == 4 and p.dtype == "float32"
    text = p.explain()
    lines = text.splitlines()
    assert len(lines) >= 2 + p.n_layers + 5
    for i in range(p.n_layers):
        row = lines[2 + i].split()
        assert row == [str(i), "dense", str(widths[i]), str(widths[i + 1]),
                       "yes" if i in p.stored else "-", str(p.forward_counts[i])]
    for needle in (format_size(p.peak_bytes), format_size(p.budget_bytes),
                   format_size(p.plain_peak_bytes), "% of one forward pass",
                   "% of a training step", "Not counted: parameters", "proven optimal",
                   "yes: no schedule", "forwarding elements again"):
        assert needle in text
    share = 100 * p.recompute_flops / p.plain_forward_flops
    step = 100 * p.recompute_flops / (p.costs.step_flops() * batch)
    assert f"{share:.1f}% of one forward" in text and f"{step:.1f}% of a training" in text
    assert p.fixed_bytes == (2 * p.costs.parameter_count() + 2 * batch * 1024) * 4
    assert p.layer_flops == tuple(batch * f for f in p.costs.forward_flops)
    assert p.proven_optimal and not p.keep_internals and p.costs == c.costs
    assert "'forward'" not in repr(p) and "peak=" in repr(p) and "stored=(0," in repr(p)
    with pytest.raises(AttributeError):
        p.peak_bytes = 0


def test_simulate_rejects_illegal_schedules():
    widths = [2, 3, 4]
    good = [("forward", 0), ("forward", 1), ("backward", 1), ("backward", 0)]
    assert simulate(good, widths, 1) == 9 * 4
    cases = {
        "needs a_1 held": [("forward", 1)],
        "expected backward 1": [("forward", 0), ("forward", 1), ("backward", 0)],
        "needs a_1 and a_2 held": [("forward", 0), ("forward", 1), ("free", 1), ("backward", 1)],
        "a_2 is not held": good[:3] + [("free", 2), ("backward", 0)],
        "held for the whole schedule": [("free", 0)],
        "ends before backward 0": good[:3],
        "unknown kind": [("recompute", 0)],
        "outside a chain": [("forward", 2)],
        "after backward 1": good[:3] + [("forward", 1)],
        "not a (kind, index) pair": ["forward"],
    }
    for message, ops in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            simulate(ops, widths, 1)


# ---------------------------------------------------------------------------------------------
# Sizes and bad inputs
# ---------------------------------------------------------------------------------------------


def test_parse_size():
    assert parse_size("4MiB") == 4 * 2**20
    assert parse_size("4 mib") == parse_size("4MIB") == 4 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("0.5 KiB") == 512 and parse_size("2kb") == 2000
    assert parse_size("4096") == parse_size("4096B") == parse_size(4096) == 4096
    assert parse_size("1.7B") == 1 and parse_size(".5 GiB") == 2**29
    for bad in ("", "MiB", "4 MiBs", "-1MB", "4 TB", "1e3", "4,5MB", "four"):
        with pytest.raises(ValueError, match="cannot parse size"):
            parse_size(bad)
    with pytest.raises(TypeError):
        parse_size(4.0)
    with pytest.raises(ValueError):
        parse_size(-1)


def test_format_size():
    assert format_size(0) == "0 B" and format_size(1023) == "1023 B"
    assert format_size(1536) == "1.5 KiB" and format_size(4 * 2**20) == "4 MiB"
    assert format_size(int(12.25 * 2**20)) == "12.25 MiB" and format_size(3 * 2**30) == "3 GiB"
    for n in (1, 999, 2**20 + 1, 5 * 2**40 + 3):
        assert parse_size(format_size(n).replace(" ", "")) == pytest.approx(n, rel=0.01)


@pytest.mark.parametrize("args, error, message", [
    (([], 1, 100), ValueError, "empty"),
    (([5], 1, 100), ValueError, "N\\+1 >= 2"),
    (([5, 0, 3], 1, 100), ValueError, "width 1 must be positive, got 0"),
    (([5, -2], 1, 100), ValueError, "width 1 must be positive, got -2"),
    (([5, 2.0], 1, 100), TypeError, "chain item 1 is a float"),
    (([5, True], 1, 100), TypeError, "chain item 1 is a bool"),
    (("abc", 1, 100), TypeError, "chain must be"),
    ((5, 1, 100), TypeError, "chain must be"),
    (([LayerLike(3, 4), LayerLike(5, 6)], 1, 100), ValueError,
     "layers 0 and 1 do not connect: layer 0 has out_features=4, layer 1 has in_features=5"),
    (([LayerLike(3, 4.0)], 1, 100), TypeError, "layer 0: out_features must be an int"),
    (([LayerLike(0, 4)], 1, 100), ValueError, "layer 0: in_features must be positive"),
    (([LayerLike(3, 4), 4], 1, 100), TypeError, "chain item 1"),
    (([3, 4], 0, 100), ValueError, "batch_size must be positive, got 0"),
    (([3, 4], 2.0, 100), TypeError, "batch_size must be an int"),
    (([3, 4], 1, -1), ValueError, "budget_bytes must be >= 0, got -1"),
    (([3, 4], 1, 100.0), TypeError, "budget_bytes must be an int"),
    (([3, 4], 1, "4MiB"), TypeError, "parse_size"),
    (([3, 4], 1, 100, np.float16), ValueError, "float32 or float64, got float16"),
    (([3, 4], 1, 100, np.int32), ValueError, "float32 or float64, got int32"),
    (([3, 4], 1, 100, None), TypeError, "float32 or float64, got None"),
    (([3, 4], 1, 100, "nonsense"), TypeError, "float32 or float64"),
])
def test_bad_inputs(args, error, message):
    with pytest.raises(error, match=message):
        plan(*args)


def test_bad_method_and_uniform_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        plan([3, 4], 1, 100, method="rotor")
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0, got -1"):
        uniform_plan([3, 4], 1, -1)
    with pytest.raises(TypeError, match="checkpoint_every must be an int"):
        uniform_plan([3, 4], 1, 1.5)


# ---------------------------------------------------------------------------------------------
# Element costs: internals, scratch, the closed form
# ---------------------------------------------------------------------------------------------


def block(width, tape, internal_flops, fwd=0, bwd=0):
    """A compound element (like a residual block): internals kept only by plain backprop."""
    return ElementCost("block", width, width, stored=width, forward_flops=10 * width,
                       backward_flops=20 * width, tape=tape, forward_scratch=fwd,
                       backward_scratch=bwd, internal_flops=internal_flops, parameter_count=7)


def test_plain_backprop_keeps_internals_only_when_it_fits():
    costs = ChainCosts((block(4, 12, 30),) * 6)
    c = chain_of(costs, batch=2)
    plain = c.plain_peak
    assert plain == replay(uniform_ops(6, 1), costs, keep_internals=True).peak_units * 8
    for method in planmod.METHODS:
        p = plan(costs, 2, plain, method=method)
        check_plan(p, plain)
        assert p.keep_internals and p.recompute_flops == 0 and p.peak_bytes == plain
        assert p.ops == tuple(uniform_ops(6, 1)) and p.proven_optimal
        below = plan(costs, 2, plain - 1, method=method)
        check_plan(below, plain - 1)
        # One byte short of plain backprop: one block rebuilds, the other five keep theirs.
        assert below.keep_internals is not True and below.internal_flops == 2 * 1 * 30
        assert below.rebuilt_layers == (0,) and len(below.keep_internals) == 5
        assert below.rerun_flops == 0  # k = 1 without internals fits: 4 units a block
        assert "recomputing internals" in below.explain()
        assert "internals kept            5 of 6 compound elements" in below.explain()
    assert plan(costs, 2, plain).plain_peak_bytes == plain
    assert uniform_plan(costs, 2, 1).keep_internals is True
    assert uniform_plan(costs, 2, 2, keep_internals=False).keep_internals is False
    # By default a uniform plan keeps what SegmentCheckpointer(checkpoint_every=k) keeps.
    auto = uniform_plan(costs, 2, 2)
    ops = uniform_ops(6, 2)
    trace = replay(ops, costs, "auto")
    assert auto.keep_internals == tuple(q for q, ev in enumerate(trace.events) if ev[4])
    assert auto.peak_bytes == trace.peak_units * 8 and auto.rebuilt_layers == trace.rebuilt
    assert auto.internal_flops == 2 * 30 * len(trace.rebuilt) < 2 * 6 * 30
    with pytest.raises(ValueError, match="keep_internals"):
        uniform_plan(costs, 2, 2, keep_internals="sometimes")


def test_closed_form_only_for_truly_uniform_costs():
    """Equal widths with scratch or internals are not an equal chain: the recursion plans them
    (exactly, checked by exhaustive search); truly equal elements use the closed form."""
    equal = ChainCosts.from_widths([6] * 8)
    assert chain_of(equal).closed_form
    variants = [ChainCosts((block(6, 0, 0, fwd=5),) * 7),
                ChainCosts((block(6, 0, 0, bwd=4),) * 7),
                ChainCosts((block(6, 3, 9),) * 7),
                ChainCosts((block(6, 0, 0),) * 6 + (block(6, 0, 0, fwd=1),))]
    for costs in variants:
        c = chain_of(costs)
        assert not c.closed_form
        for units in range(costs.min_units(), c.lean_peak_units + 1, 3):
            p = plan(costs, 1, units * 4)
            check_plan(p, units * 4)
            assert row_cost(p) == brute_force(costs, units) and p.proven_optimal
    # Scratch changes the answer: the closed form would ignore it.
    tight = ChainCosts((block(6, 0, 0, fwd=5),) * 7).min_units()
    assert tight > ChainCosts((block(6, 0, 0),) * 7).min_units()


def test_uniform_peak_matches_replay():
    rng = random.Random(11)
    for n in (1, 2, 7, 23):
        costs = random_costs(rng, n)
        c = chain_of(costs)
        for k in range(0, n + 2):
            expected = replay(uniform_ops(n, k), costs).peak_units
            kk = n if k <= 0 or k > n else k
            assert c.uniform_peaks[kk - 1] == expected == chainmod._uniform_peak(costs, k)


def test_minimal_schedule_fits_the_smallest_budget():
    rng = random.Random(12)
    for n in (1, 2, 5, 17):
        costs = random_costs(rng, n)
        trace = replay(_search._minimal_ops(n), costs)
        assert trace.peak_units == costs.min_units()
        flops = costs.forward_flops
        assert chain_of(costs).cost_of(trace)[0] == sum(sum(flops[:i + 1]) for i in range(n)) \
            + sum(e.internal_flops for e in costs.elements)


class Describing:
    """A layer that describes its own costs (as ckpt's layers do)."""

    def __init__(self, cost):
        self.cost = cost

    def describe(self, width):
        return self.cost


def test_layers_that_describe_themselves():
    costs = ChainCosts((block(5, 2, 3, fwd=4), block(5, 0, 0, bwd=9), block(5, 1, 1)))
    layers = [Describing(e) for e in costs.elements]
    budget = costs.min_units() * 4 + 8
    assert plan(layers, 1, budget) == plan(costs, 1, budget)
    assert plan(layers, 1, budget).costs == costs


# ---------------------------------------------------------------------------------------------
# The default method: interactive, near the exact optimum, never worse than uniform
# ---------------------------------------------------------------------------------------------


def test_auto_is_the_exact_search_on_short_chains():
    rng = random.Random(13)
    for chain in random_chains(seed=14, count=20, max_layers=12):
        c = chain_of(chain)
        for units in budgets_of(c, rng, count=2):
            auto, exact = plan(chain, 1, units * 4), plan(chain, 1, units * 4, method="optimal")
            assert auto.ops == exact.ops and auto.proven_optimal and auto.method == "auto"


def bounded_only(monkeypatch):
    """Skip the exact search, so that auto runs its bounded searches on short chains."""
    monkeypatch.setattr(_search, "_EXACT_MAX_LAYERS", 0)


def test_auto_bounded_is_within_5_percent_of_the_optimum(monkeypatch):
    """The bounded searches alone (what long chains get) against the exact optimum: the
    recomputation (FLOPs beyond one forward pass) within 5%."""
    rng = random.Random(15)
    bench_plan = pytest.importorskip("bench_plan")
    chains = [random_costs(rng, rng.randint(3, 14)) for _ in range(30)]
    chains += [rng.choices(range(1, 60), k=rng.randint(8, 20)) for _ in range(10)]
    chains += [bench_plan.tapered(60), [rng.choice([256, 1024, 4096]) for _ in range(31)]]
    worst = 0.0
    for chain in chains:
        c = chain_of(chain)
        plain_row = sum(c.costs.forward_flops)
        for fraction in (0.1, 0.4, 0.8):
            units = c.costs.min_units() + int(fraction * (c.lean_peak_units
                                                          - c.costs.min_units()))
            exact = plan(chain, 1, units * 4, method="optimal")
            with monkeypatch.context() as patch:
                bounded_only(patch)
                auto = plan(chain, 1, units * 4)
            check_plan(auto, units * 4)
            assert not auto.proven_optimal and "not proven" in auto.explain()
            extra, best = row_cost(auto) - plain_row, row_cost(exact) - plain_row
            assert extra <= 1.05 * best, (chain, fraction, extra, best)
            worst = max(worst, extra / best if best else 1.0)
    assert worst >= 1.0


@pytest.mark.parametrize("shape", ["tapered", "random"])
def test_auto_on_200_elements_is_never_worse_than_uniform(shape):
    bench_plan = pytest.importorskip("bench_plan")
    widths = bench_plan.tapered(200) if shape == "tapered" else bench_plan.random_widths(200)
    batch = 64
    uniform = [uniform_plan(widths, batch, k) for k in range(1, 201)]
    c = chain_of(widths, batch)
    for fraction in (0.05, 0.3, 0.7):
        budget = c.min_budget + int(fraction * (c.plain_peak - c.min_budget))
        p = plan(widths, batch, budget)
        check_plan(p, budget)
        fitting = [u.recompute_flops for u in uniform if u.peak_bytes <= budget]
        if fitting:
            assert p.recompute_flops <= min(fitting)
